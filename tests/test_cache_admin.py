"""``cloakbench cache info | prune``: counts, sizes, least-recently-used pruning, and what is never touched."""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cloakbench.attacks.adaptation.checkpoints import FileCheckpoints
from cloakbench.bench.cache import ArtifactCache
from cloakbench.cache_admin import IN_FLIGHT, CacheKindInfo, cache_info, prune
from cloakbench.cli import EXIT_BAD_INPUT, EXIT_OK, main
from cloakbench.errors import ConfigError

DAY = 86400.0
OLD = 40  # days since the "old" entries were last used


def _age(path: Path, days: float) -> None:
    t = time.time() - days * DAY
    os.utime(path, (t, t), follow_symlinks=False)


def _never(*_: object) -> np.ndarray:
    raise AssertionError("a cache hit must not compute")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A cache under tmp_path: 3 cloaks (2 old), 2 embeddings (1 old), 2 checkpoints (1 old), a manifest, model
    files, the demo set and an aligned dataset (all old); returns the interesting paths."""
    root = tmp_path / "cache"
    monkeypatch.setenv("CLOAKBENCH_CACHE", str(root))
    arts = ArtifactCache()
    assert arts.root == root / "artifacts"
    paths: dict[str, Path] = {"root": root}
    for i in range(3):
        arts.get_or_compute("cloaks", ["cloak", i], functools.partial(np.full, (2, 3, 8, 8), i, dtype=np.float32))
        paths[f"cloak{i}"] = arts.path("cloaks", ["cloak", i])
    for i in range(2):
        arts.get_or_compute("embeddings", ["emb", i], functools.partial(np.full, (5, 128), i, dtype=np.float32))
        paths[f"emb{i}"] = arts.path("embeddings", ["emb", i])
    ckpt = FileCheckpoints()
    for key in ("fresh", "stale"):
        ckpt.save(key, {"weight": torch.zeros(16, 16)})
        paths[f"ckpt_{key}"] = ckpt.path(key)
    files = {
        "manifest": root / "manifests" / "abc.json",
        "download": root / "downloads" / "pkg-1.0-py3-none-any.whl",
        "converted": root / "converted" / "sface-0123-v1.pt",
        "weights": root / "files" / "pkg-1.0" / "model.onnx",
        "demo": root / "datasets" / "celeb5-aligned-v1" / "alice" / "0.png",
        "demo_report": root / "datasets" / "celeb5-aligned-v1.json",
        "aligned": root / "datasets" / "faces-aligned-0123456789abcdef" / "bob" / "0.png",
        "aligned_report": root / "datasets" / "faces-aligned-0123456789abcdef.json",
        "lock": root / "datasets" / ".celeb5-v1.lock",
    }
    for name, path in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 100)
        paths[name] = path
    for name in ("cloak0", "cloak1", "emb0", "ckpt_stale", *files):
        _age(paths[name], OLD)
    return paths


def _by_kind(root: Path) -> dict[str, CacheKindInfo]:
    return {k.kind: k for k in cache_info(root)}


def test_info_counts_entries_bytes_and_last_use(cache: dict[str, Path]) -> None:
    info = _by_kind(cache["root"])
    cloaks = info["cloaks"]
    assert cloaks.folder == "artifacts/cloaks" and cloaks.default_prune
    assert cloaks.entries == cloaks.files == 3
    assert cloaks.bytes == sum(cache[f"cloak{i}"].stat().st_size for i in range(3))
    assert cloaks.bytes > 3 * 2 * 3 * 8 * 8 * 4  # float32 payload plus the .npy headers
    assert cloaks.oldest_use is not None and cloaks.newest_use is not None
    now = dt.datetime.now(dt.timezone.utc)
    assert OLD - 1 < (now - cloaks.oldest_use).total_seconds() / DAY < OLD + 1
    assert (now - cloaks.newest_use).total_seconds() < 600
    assert info["embeddings"].entries == 2
    assert info["checkpoints"].entries == 2 and info["checkpoints"].default_prune
    assert info["cloak_seconds"].entries == 0 and info["cloak_seconds"].oldest_use is None
    # a dataset folder and its report are one entry; the lock file is not an entry
    assert (info["demo"].entries, info["demo"].files, info["demo"].bytes) == (1, 2, 200)
    assert (info["aligned"].entries, info["aligned"].files) == (1, 2)
    assert info["files"].entries == 1 and info["downloads"].entries == 1
    assert not any(info[k].default_prune for k in ("aligned", "demo", "converted", "files", "downloads", "other"))
    assert info["other"].entries == 0


def test_prune_older_than_removes_only_old_entries_of_the_default_kinds(cache: dict[str, Path]) -> None:
    report = prune(cache["root"], older_than=dt.timedelta(days=30))
    assert report.kinds == ("cloak_seconds", "cloaks", "embeddings", "checkpoints", "manifests")
    gone = {"cloak0", "cloak1", "emb0", "ckpt_stale", "manifest"}
    for name, path in cache.items():
        if name != "root":
            assert path.exists() == (name not in gone), name
    assert {e.path for e in report.removed} == {cache[n].relative_to(cache["root"]).as_posix() for n in gone}
    assert report.files_removed == 5
    assert report.bytes_freed == sum(e.bytes for e in report.removed) > 0
    assert report.skipped == ()
    assert _by_kind(cache["root"])["cloaks"].entries == 1


def test_dry_run_removes_nothing_and_reports_the_same(cache: dict[str, Path]) -> None:
    before = sorted(p for p in cache["root"].rglob("*"))
    dry = prune(cache["root"], older_than=dt.timedelta(days=30), dry_run=True)
    assert sorted(p for p in cache["root"].rglob("*")) == before
    assert dry.dry_run and dry.files_removed == 5
    real = prune(cache["root"], older_than=dt.timedelta(days=30))
    assert [e.path for e in real.removed] == [e.path for e in dry.removed]
    assert real.bytes_freed == dry.bytes_freed


def test_a_cache_hit_refreshes_last_use_so_the_entry_survives(cache: dict[str, Path]) -> None:
    arts = ArtifactCache()
    value = arts.get_or_compute("cloaks", ["cloak", 0], _never)  # old entry, used now
    assert arts.hits == 1 and float(value.ravel()[0]) == 0.0
    assert time.time() - cache["cloak0"].stat().st_mtime < 600
    ckpt = FileCheckpoints()
    state = ckpt.load("stale")
    assert state is not None and ckpt.hits == 1
    assert time.time() - cache["ckpt_stale"].stat().st_mtime < 600
    prune(cache["root"], older_than=dt.timedelta(days=30))
    assert cache["cloak0"].exists() and cache["ckpt_stale"].exists()
    assert not cache["cloak1"].exists()


def test_default_prune_leaves_model_files_and_datasets_alone(cache: dict[str, Path]) -> None:
    report = prune(cache["root"])  # everything of the default kinds, whatever its age
    assert not any(cache[n].exists() for n in ("cloak0", "cloak2", "emb1", "ckpt_fresh", "manifest"))
    for name in ("download", "converted", "weights", "demo", "demo_report", "aligned", "aligned_report", "lock"):
        assert cache[name].exists(), name
    assert {e.kind for e in report.removed} == {"cloaks", "embeddings", "checkpoints", "manifests"}


def test_named_kinds_are_pruned_as_whole_entries(cache: dict[str, Path]) -> None:
    report = prune(cache["root"], kinds=["downloads", "files", "aligned", "demo"])
    assert report.kinds == ("downloads", "files", "aligned", "demo")
    for name in ("download", "weights", "demo", "demo_report", "aligned", "aligned_report"):
        assert not cache[name].exists(), name
    assert not (cache["root"] / "files" / "pkg-1.0").exists()
    assert not (cache["root"] / "datasets" / "celeb5-aligned-v1").exists()
    assert cache["lock"].exists() and cache["converted"].exists() and cache["cloak0"].exists()
    demo = next(e for e in report.removed if e.kind == "demo")
    assert demo.path == "datasets/celeb5-aligned-v1.json" and demo.files == 2  # the report goes first
    artifacts = prune(cache["root"], kinds=["artifacts"], older_than=dt.timedelta(days=30))
    assert artifacts.kinds == ("cloak_seconds", "cloaks", "embeddings") and artifacts.files_removed == 3


def test_temporary_files_of_writes_in_progress_are_left_alone(cache: dict[str, Path]) -> None:
    folder = cache["cloak0"].parent
    young = folder / ".abc.npy.k2j3.tmp"
    old = folder / ".def.npy.x8y9.tmp"
    build = cache["root"] / "datasets" / ".faces-aligned-0123-build-42-xyz" / "aligned" / "a.png"
    build.parent.mkdir(parents=True)
    for path in (young, old, build):
        path.write_bytes(b"t" * 10)
    _age(old, 2 * IN_FLIGHT.total_seconds() / DAY)
    info = _by_kind(cache["root"])
    assert info["cloaks"].in_flight == 1 and info["aligned"].in_flight == 1
    report = prune(cache["root"], kinds=["cloaks", "aligned"])
    assert young.exists() and build.exists() and not old.exists()
    assert sorted(reason for _, reason in report.skipped) == ["write in progress", "write in progress"]


def test_symbolic_links_are_never_followed_out_of_the_root(cache: dict[str, Path], tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "models").mkdir(parents=True)
    target = outside / "precious.npy"
    np.save(target, np.ones(3))
    (outside / "models" / "model.pt").write_bytes(b"m" * 50)
    link = cache["cloak0"].parent / "link.npy"
    link.symlink_to(target)
    os.utime(link, (0, 0), follow_symlinks=False)
    # a kind folder that is a link to a folder elsewhere is reported, not scanned
    (cache["root"] / "converted").rename(tmp_path / "converted-moved")
    (cache["root"] / "converted").symlink_to(outside / "models", target_is_directory=True)
    info = _by_kind(cache["root"])
    assert info["converted"].entries == 0 and "symbolic link" in info["converted"].note
    report = prune(cache["root"], kinds=["cloaks", "converted"])
    assert not link.is_symlink() and target.exists()  # the link went, its target stayed
    assert (outside / "models" / "model.pt").exists()
    assert ("converted", "converted/ is a symbolic link; not followed") in report.skipped


def test_unknown_or_negative_arguments_are_config_errors(cache: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"unknown cache kind 'cloak'; known kinds: cloak_seconds, cloaks, "):
        prune(cache["root"], kinds=["cloak"])
    with pytest.raises(ConfigError, match=r"'other' \(counted by 'cache info', never pruned\)"):
        prune(cache["root"], kinds=["other"])
    with pytest.raises(ConfigError, match="older_than must not be negative"):
        prune(cache["root"], older_than=dt.timedelta(days=-1))
    assert cache["cloak0"].exists()


def test_missing_root_is_empty_and_not_created(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    assert all(k.entries == 0 for k in cache_info(root))
    assert prune(root).removed == ()
    assert not root.exists()


def test_cli_cache_info(cache: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cache", "info"]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith(f"cache: {cache['root']}\n")
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert rows["cloaks"][1] == "3" and rows["cloaks"][-2:] == ["by", "default"]
    assert rows["downloads"][-2:] == ["when", "named"] and rows["other"][-1] == "never"
    assert rows["total"][1] == str(3 + 2 + 2 + 1 + 1 + 1 + 1 + 1 + 1)
    assert main(["cache", "info", "--json"]) == EXIT_OK
    doc = json.loads(capsys.readouterr().out)
    kinds = {k["kind"]: k for k in doc["kinds"]}
    assert doc["root"] == str(cache["root"])
    assert kinds["cloaks"]["entries"] == 3 and kinds["cloaks"]["bytes"] > 0
    assert doc["total"]["bytes"] == sum(k["bytes"] for k in doc["kinds"])
    dt.datetime.fromisoformat(kinds["cloaks"]["oldest_use"])


def test_cli_cache_prune(cache: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cache", "prune", "--older-than", "30", "--dry-run"]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith("would remove 5 entries (5 files, ")
    assert "not used for 30 days" in out and out.rstrip().endswith("dry run: nothing was removed")
    assert cache["cloak0"].exists()
    assert main(["cache", "prune", "--older-than", "30", "--kind", "cloaks", "--kind", "downloads", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["kinds"] == ["cloaks", "downloads"] and doc["older_than_days"] == 30 and not doc["dry_run"]
    assert sorted(e["kind"] for e in doc["removed"]) == ["cloaks", "cloaks", "downloads"]
    assert doc["files_removed"] == 3 and doc["bytes_freed"] == sum(e["bytes"] for e in doc["removed"])
    assert not cache["cloak0"].exists() and not cache["download"].exists() and cache["emb0"].exists()


def test_cli_cache_prune_rejects_bad_input(cache: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cache", "prune", "--kind", "checkpoint"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "unknown cache kind 'checkpoint'" in err and "checkpoints, manifests, aligned, demo" in err
    assert main(["cache", "prune", "--older-than", "-2"]) == EXIT_BAD_INPUT
    assert "--older-than takes a number of days >= 0, got -2.0" in capsys.readouterr().err
    assert main(["cache", "prune", "--older-than", "nan"]) == EXIT_BAD_INPUT
    assert cache["cloak0"].exists() and cache["ckpt_stale"].exists()
