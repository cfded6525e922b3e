"""The alignment stage (align_dataset): unaligned photos -> cached aligned faces, with a detector fallback.

The photos are made from celeb24 crops, enlarged and pasted into larger pictures at offsets, so the right
answer is known: aligning them again must give back (nearly) the crop. Measured numbers in comments were
taken on the 2-core development CPU while writing these tests.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import cloakbench.datasets.stage as stage_module
from cloakbench.cache import ENV_CACHE, cache_root
from cloakbench.datasets import (
    ARCFACE_TEMPLATE_112,
    DLIB_SHAPE5_PINNED,
    YUNET_PINNED,
    AlignmentReport,
    Detection,
    DlibDetector,
    FaceDetector,
    YuNetDetector,
    align_dataset,
    scan_folder,
)
from cloakbench.datasets.demo import load_photo
from cloakbench.errors import ConfigError, DatasetError
from cloakbench.images import load_image

YUNET = "yunet-2023mar-int8bq"
DLIB = "dlib-hog+shape5"


class BlindYuNet:
    """YuNet that sees no face in the photos whose pixels hash to ``blind`` (to exercise the fallback)."""

    def __init__(self, inner: YuNetDetector, blind: set[str]) -> None:
        self.inner = inner
        self.blind = blind
        self.calls = 0

    def describe(self) -> dict[str, object]:
        return {**self.inner.describe(), "blind": sorted(self.blind)}

    def detect(self, image_rgb: np.ndarray) -> list[Detection]:
        self.calls += 1
        if hashlib.sha256(np.ascontiguousarray(image_rgb).tobytes()).hexdigest() in self.blind:
            return []
        return self.inner.detect(image_rgb)


class Exploding:
    """Describes itself as ``inner`` does (same cache key) but fails if asked to detect anything."""

    def __init__(self, inner: FaceDetector) -> None:
        self.inner = inner

    def describe(self) -> dict[str, object]:
        return self.inner.describe()

    def detect(self, image_rgb: np.ndarray) -> list[Detection]:
        raise AssertionError("a cached align_dataset call ran a detector")


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache, seeded with the YuNet and dlib landmark files when the user's cache has them."""
    cache = tmp_path / "cache"
    for pinned in (YUNET_PINNED, DLIB_SHAPE5_PINNED):
        if pinned.cache_path.is_file():
            dest = cache / pinned.cache_path.relative_to(cache_root())
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(pinned.cache_path, dest)
    monkeypatch.setenv(ENV_CACHE, str(cache))
    return cache


@pytest.fixture(scope="module")
def dlib_detector() -> DlibDetector:
    return DlibDetector()


def _photo(face: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The 112x112 crop enlarged 2-3x into a larger noisy picture at a random offset."""
    side = int(rng.integers(224, 336))
    height, width = side + int(rng.integers(40, 200)), side + int(rng.integers(40, 200))
    photo = rng.integers(90, 160, (height, width, 3), dtype=np.uint8)
    ox, oy = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
    photo[oy : oy + side, ox : ox + side] = cv2.resize(face, (side, side), interpolation=cv2.INTER_CUBIC)
    return photo


def _make_photos(celeb24_root: Path, src: Path) -> tuple[dict[str, np.ndarray], str]:
    """3 identities x 3 photos (JPEG and PNG), a blank picture, and one photo YuNet will be blind to.

    Returns the source crop of every photo (by report source path) and the hash of the blind photo.
    """
    rng = np.random.default_rng(7)
    crops: dict[str, np.ndarray] = {}
    for identity in ("Keanu_Reeves", "Tina_Fey", "Will_Smith"):
        for k, index in enumerate((3, 17, 31)):
            face = load_image(celeb24_root / identity / f"{index:04d}.png")
            name = f"{identity}/photo{k}.{'jpg' if k else 'png'}"
            (src / identity).mkdir(parents=True, exist_ok=True)
            Image.fromarray(_photo(face, rng)).save(src / name, quality=95)
            crops[name] = face
    Image.fromarray(np.full((300, 260, 3), 200, np.uint8)).save(src / "Tina_Fey" / "blank.jpg")
    fallback = _photo(load_image(celeb24_root / "Will_Smith" / "0045.png"), rng)
    Image.fromarray(fallback).save(src / "Will_Smith" / "fallback.png")
    crops["Will_Smith/fallback.png"] = load_image(celeb24_root / "Will_Smith" / "0045.png")
    blind = hashlib.sha256(load_photo(src / "Will_Smith" / "fallback.png").tobytes()).hexdigest()
    return crops, blind


def test_stage_aligns_records_detectors_and_caches(
    celeb24_root: Path, tmp_path: Path, fresh_cache: Path, dlib_detector: DlibDetector
) -> None:
    src = tmp_path / "photos"
    crops, blind_hash = _make_photos(celeb24_root, src)
    yunet = BlindYuNet(YuNetDetector(), {blind_hash})
    root, report = align_dataset(src, detectors=(yunet, dlib_detector))

    assert isinstance(report, AlignmentReport)
    assert root.parent == fresh_cache.resolve() / "datasets"
    assert root.name.startswith("photos-aligned-")
    by_source = {o.source: o for o in report.outcomes}
    assert sorted(by_source) == sorted([*crops, "Tina_Fey/blank.jpg"])
    assert report.counts() == {"photos": 11, "aligned": 10, "no_face": 1, "unreadable": 0, "multi_face": 0}
    blank = by_source["Tina_Fey/blank.jpg"]
    assert (blank.status, blank.detector, blank.output) == ("no_face", "", None)
    assert YUNET in blank.detail and DLIB in blank.detail  # both were tried
    assert by_source["Will_Smith/fallback.png"].detector == DLIB  # only the fallback saw that face
    assert {o.detector for s, o in by_source.items() if s not in ("Will_Smith/fallback.png", "Tina_Fey/blank.jpg")} == {
        YUNET
    }
    assert stage_module.detector_counts(report) == {DLIB: 1, YUNET: 9}

    # the aligned faces are the celeb24 crops again, up to the detectors' landmark noise: YuNet finds the
    # eyes of every output near the template (measured 1.7-5.5 px, mean 3.2), and the face region
    # matches the source crop (mean absolute difference measured 10-21 levels, mean 15; edges moved by
    # a pixel or two dominate it; another person's crop differs by 40 or more, median 60)
    yunet_plain = yunet.inner
    eye_errors, diffs = [], []
    for source, crop in crops.items():
        outcome = by_source[source]
        assert outcome.output is not None and outcome.output.parent.parent == root
        aligned = load_image(outcome.output)
        assert aligned.shape == (112, 112, 3)
        eyes = yunet_plain.detect(aligned)[0].landmarks[:2]
        eye_errors.append(float(np.linalg.norm(eyes - ARCFACE_TEMPLATE_112[:2], axis=1).mean()))
        diffs.append(float(np.abs(aligned[20:100, 20:92].astype(float) - crop[20:100, 20:92]).mean()))
    assert max(eye_errors) < 7.0 and float(np.mean(eye_errors)) < 4.5, eye_errors
    assert max(diffs) < 30.0 and float(np.mean(diffs)) < 20.0, diffs
    manifest = scan_folder(root)
    assert {r.path for r in manifest.records} == {o.output for o in report.outcomes if o.output is not None}
    doc = json.loads(root.with_name(root.name + ".json").read_text())
    assert doc["aligned_by"] == {DLIB: 1, YUNET: 9}
    assert [d["detector"] for d in doc["detectors"]] == [YUNET, DLIB]
    assert doc["manifest_digest"] == scan_folder(src).digest

    # a second call does no detection and returns the same report
    calls = yunet.calls
    root2, report2 = align_dataset(src, detectors=(Exploding(yunet), Exploding(dlib_detector)))
    assert (root2, report2) == (root, report)
    assert yunet.calls == calls
    # the key is the content: a copy of the folder elsewhere reuses it; other settings do not
    copy = tmp_path / "elsewhere" / "photos"
    shutil.copytree(src, copy)
    assert align_dataset(copy, detectors=(Exploding(yunet), Exploding(dlib_detector)))[0] == root
    with pytest.raises(AssertionError, match="ran a detector"):
        align_dataset(src, detectors=(Exploding(yunet), Exploding(dlib_detector)), size=128)
    # a deleted output or a missing report is noticed and the folder aligned again, with the same result
    next(root.glob("Tina_Fey/*.png")).unlink()
    assert align_dataset(src, detectors=(yunet, dlib_detector)) == (root, report)
    assert yunet.calls > calls
    # a changed photo is a new dataset
    Image.fromarray(np.full((300, 260, 3), 90, np.uint8)).save(src / "Tina_Fey" / "blank.jpg")
    root3, report3 = align_dataset(src, detectors=(yunet, dlib_detector))
    assert root3 != root and report3.counts() == report.counts()


def test_default_detectors_load_dlib_only_when_needed(
    celeb24_root: Path, tmp_path: Path, fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "few"
    rng = np.random.default_rng(3)
    for identity, index in (("Hugh_Laurie", 5), ("Hugh_Laurie", 9), ("Halle_Berry", 2)):
        (src / identity).mkdir(parents=True, exist_ok=True)
        face = load_image(celeb24_root / identity / f"{index:04d}.png")
        Image.fromarray(_photo(face, rng)).save(src / identity / f"{index}.jpg", quality=95)
    root, report = align_dataset(src, size=128)  # YuNet, then dlib: YuNet finds all three
    assert report.counts()["aligned"] == 3
    assert {o.detector for o in report.outcomes} == {YUNET}
    assert all(load_image(o.output).shape == (128, 128, 3) for o in report.outcomes if o.output is not None)

    # building the default detectors does not load dlib's models (~2 s): a cached call never does
    def no_loading(self: DlibDetector) -> tuple[object, object]:
        raise AssertionError("dlib's models were loaded")

    monkeypatch.setattr(DlibDetector, "_models", no_loading)
    assert align_dataset(src, size=128) == (root, report)
    assert align_dataset(src, size=128, detectors=(YuNetDetector(),))[0] != root  # another key


def test_stage_errors(tmp_path: Path, fresh_cache: Path, dlib_detector: DlibDetector) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        align_dataset(tmp_path / "missing", detectors=(dlib_detector,))
    src = tmp_path / "faceless"
    (src / "nobody").mkdir(parents=True)
    Image.fromarray(np.full((200, 200, 3), 30, np.uint8)).save(src / "nobody" / "dark.png")
    (src / "nobody" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(DatasetError, match="no face aligned"):
        align_dataset(src, detectors=(YuNetDetector(), dlib_detector))
    with pytest.raises(ConfigError, match="at least one"):
        align_dataset(src, detectors=())
    with pytest.raises(ConfigError, match="size"):
        align_dataset(src, detectors=(dlib_detector,), size=8)


def test_a_suite_on_unaligned_photos_aligns_them_and_records_outcomes(
    celeb24_root: Path, tmp_path: Path, fresh_cache: Path
) -> None:
    """`dataset: {source: folder, align: true}` runs the stage before the protocol; the run folder keeps
    every photo's outcome (the blank picture is reported and left out)."""
    from cloakbench.bench.output import write_run
    from cloakbench.bench.runner import run_suite
    from cloakbench.bench.suite import parse_suite

    src = tmp_path / "photos"
    _make_photos(celeb24_root, src)
    suite = parse_suite(
        {
            "name": "unaligned",
            "dataset": {"source": "folder", "path": str(src), "align": True},
            "protected": {"count": 1},
            "defenses": ["noise"],
            "recognizers": ["sface"],
            "classifiers": ["nearest-neighbour"],
            "device": "cpu",
        },
        where="unaligned suite",
    )
    result = run_suite(suite)
    assert result.alignment is not None
    statuses = {p["source"]: p["status"] for p in result.alignment["photos"]}
    assert statuses["Tina_Fey/blank.jpg"] == "no_face"
    assert sum(s == "aligned" for s in statuses.values()) == 10
    assert len(result.manifest.records) == 10 and result.summary[0]["status"] == "ok"
    write_run(result, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "alignment.json").read_text())
    assert saved["counts"]["no_face"] == 1
