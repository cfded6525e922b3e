"""Hardening of the inputs (issue 18): converted weights are verified, every image mode loads by its true range,
EXIF orientation is honoured everywhere, unreadable entries are left out and listed, and names are normalised and
escaped in messages.

Every image here is written by a real codec (Pillow, OpenCV, or zlib for a PNG layout neither writes); the
faces are celeb24 crops.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import struct
import unicodedata
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

from cloakbench.cache import ENV_CACHE, overlay_cache
from cloakbench.datasets import align_folder, load_images, scan_folder
from cloakbench.datasets.detect import YuNetDetector
from cloakbench.errors import DatasetError
from cloakbench.images import load_image, stack_images

HALF_LEVEL = 0.5 / 255 + 1e-6


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv(ENV_CACHE, str(cache))
    return cache


def _faces(celeb24_root: Path, n: int = 4) -> torch.Tensor:
    paths = [sorted((celeb24_root / folder).iterdir())[0] for folder in sorted(os.listdir(celeb24_root))[:n]]
    return stack_images([load_image(p) for p in paths])


def _face(celeb24_root: Path, identity: str = "Barack_Obama", index: int = 0) -> np.ndarray:
    return load_image(sorted((celeb24_root / identity).iterdir())[index])


# --------------------------------------------------------------------------------------------------------------
# item 2: converted weights are verified on load, re-converted on a mismatch, and identified by their content
# --------------------------------------------------------------------------------------------------------------


def _negated_state(path: Path) -> bytes:
    state = torch.load(path, map_location="cpu", weights_only=True)
    key = next(k for k, v in state.items() if k.endswith("weight") and v.ndim == 4)  # the first convolution
    state[key] = -state[key]
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _negated_onnx(path: Path) -> bytes:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    tensor = next(t for t in model.graph.initializer if t.name.endswith("batchnorm_gamma"))  # the first one
    tensor.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(tensor), tensor.name))
    return model.SerializeToString()


@pytest.mark.parametrize(("name", "tamper"), [("sface", _negated_state), ("sface-onnx", _negated_onnx)])
def test_a_tampered_conversion_is_converted_again(
    name: str,
    tamper: Callable[[Path], bytes],
    celeb24_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from cloakbench.attacks.recognizers import RECOGNIZERS
    from cloakbench.attacks.recognizers import sface as sface_module

    faces = _faces(celeb24_root)
    genuine = RECOGNIZERS.create(name)
    expected = genuine.embed(faces)
    path = sface_module.state_dict_path() if name == "sface" else sface_module.onnx_path()
    cache = overlay_cache(tmp_path / "cache", replace={path.name: tamper(path)})
    monkeypatch.setenv(ENV_CACHE, str(cache))
    with caplog.at_level(logging.WARNING, logger="cloakbench.fetch"):
        loaded = RECOGNIZERS.create(name)
    assert torch.equal(loaded.embed(faces), expected)
    assert loaded.weights_id == genuine.weights_id == sface_module.WEIGHTS_ID
    assert any(path.name in r.getMessage() and "converting it again" in r.getMessage() for r in caplog.records)
    again = cache / "converted" / path.name
    assert not again.is_symlink() and again.read_bytes() != tamper(path)


def test_the_weights_id_follows_the_weights(
    celeb24_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A converted file whose record was rewritten to match it (so nothing can tell it apart from a conversion) is
    still told apart by the weights id: cloaks and embeddings are never cached under the genuine weights' id."""
    from cloakbench.attacks.recognizers import RECOGNIZERS
    from cloakbench.attacks.recognizers import sface as sface_module
    from cloakbench.fetch import conversion_record_path

    path = sface_module.state_dict_path()
    record = conversion_record_path(path)
    tampered = _negated_state(path)
    doc = json.loads(record.read_text())
    doc["sha256"] = hashlib.sha256(tampered).hexdigest()
    cache = overlay_cache(tmp_path / "cache", replace={path.name: tampered, record.name: json.dumps(doc).encode()})
    genuine = RECOGNIZERS.create("sface")
    monkeypatch.setenv(ENV_CACHE, str(cache))
    with caplog.at_level(logging.WARNING, logger="cloakbench.fetch"):
        forged = RECOGNIZERS.create("sface")
    faces = _faces(celeb24_root, 2)
    assert not torch.allclose(forged.embed(faces), genuine.embed(faces), atol=1e-3)  # the forged weights are used
    assert genuine.weights_id == sface_module.WEIGHTS_ID
    assert forged.weights_id != genuine.weights_id and forged.weights_id.startswith(sface_module.WEIGHTS_ID)
    assert any("differ from the reference conversion" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------------------------------
# item 4: every mode loads by its true range
# --------------------------------------------------------------------------------------------------------------

RAMP16 = np.array([[0, 2770, 32768, 65535], [257, 1000, 40000, 65000]], dtype=np.uint16)
"""16-bit values; 2770 = 257 * 10 + 200 is 10.78 levels (the high byte, 10, is a level off)."""
RAMP8 = np.array([[0, 60, 128, 255], [1, 90, 200, 254]], dtype=np.uint8)
COLOUR = (200, 100, 50)


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def _cv2(array: np.ndarray, ext: str) -> bytes:
    ok, buffer = cv2.imencode(ext, array)
    assert ok
    return buffer.tobytes()


def _png(width: int, height: int, depth: int, colour_type: int, rows: list[bytes]) -> bytes:
    """A PNG file by the specification (a layout neither Pillow nor OpenCV writes, such as 16-bit grey+alpha)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    pixels = zlib.compress(b"".join(b"\0" + row for row in rows))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def _grey16(mode: str) -> Image.Image:
    order = ">" if mode == "I;16B" else "<"
    return Image.frombytes(mode, (4, 2), RAMP16.astype(f"{order}u2").tobytes())


def _grey(expected: np.ndarray) -> np.ndarray:
    return np.repeat(expected[:, :, None], 3, axis=2)


def _rgb16() -> np.ndarray:
    rgb = np.stack([RAMP16, RAMP16[::-1], np.full_like(RAMP16, 2770)], axis=2)
    return rgb


def _lab() -> Image.Image:
    from PIL import ImageCms

    transform = ImageCms.buildTransformFromOpenProfiles(
        ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB"
    )
    lab = ImageCms.applyTransform(Image.new("RGB", (4, 2), COLOUR), transform)
    assert lab is not None
    return lab


def _mode_cases() -> dict[str, tuple[Callable[[], bytes], np.ndarray, float]]:
    """name -> (encoded file, expected RGB in [0, 1] [H, W, 3], tolerance)."""
    ramp16 = _grey(RAMP16 / 65535)
    ramp8 = _grey(RAMP8 / 255)
    colour = np.broadcast_to(np.array(COLOUR) / 255, (2, 4, 3))
    rgb16 = _rgb16()
    floats = np.array([[0.0, 0.1, 0.5, 1.0], [0.25, 0.75, 0.333, 0.9]], dtype=np.float32)
    ints = np.array([[0, 2**20, 2**30, 2**31 - 1], [5, 2**16, 2**24, 2**31 - 2**20]], dtype=np.int64)
    alpha16 = [np.array([[v, 65535] for v in row], dtype=">u2").tobytes() for row in RAMP16]
    return {
        "1 PNG": (lambda: _encode(Image.fromarray(RAMP8 > 127).convert("1"), "PNG"), _grey(RAMP8 > 127), 0),
        "L PNG": (lambda: _encode(Image.fromarray(RAMP8), "PNG"), ramp8, 0),
        "LA PNG": (lambda: _encode(Image.fromarray(RAMP8).convert("LA"), "PNG"), ramp8, 0),
        "P PNG": (
            lambda: _encode(Image.new("RGB", (4, 2), COLOUR).convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
            colour,
            0,
        ),
        "RGB PNG": (lambda: _encode(Image.new("RGB", (4, 2), COLOUR), "PNG"), colour, 0),
        "RGBA PNG": (lambda: _encode(Image.new("RGBA", (4, 2), (*COLOUR, 128)), "PNG"), colour, 0),
        "I;16 PNG": (lambda: _encode(_grey16("I;16"), "PNG"), ramp16, HALF_LEVEL),
        "I;16B PNG": (lambda: _encode(_grey16("I;16B"), "PNG"), ramp16, HALF_LEVEL),
        "I;16 TIFF": (lambda: _encode(_grey16("I;16"), "TIFF"), ramp16, HALF_LEVEL),
        "I;16B TIFF": (lambda: _encode(_grey16("I;16B"), "TIFF"), ramp16, HALF_LEVEL),
        "I;16L TIFF": (lambda: _encode(_grey16("I;16L"), "TIFF"), ramp16, HALF_LEVEL),
        "16-bit PGM (I)": (lambda: _encode(_grey16("I;16"), "PPM"), ramp16, HALF_LEVEL),
        "16-bit PNG by OpenCV": (lambda: _cv2(RAMP16, ".png"), ramp16, HALF_LEVEL),
        "48-bit RGB PNG": (lambda: _cv2(rgb16[:, :, ::-1], ".png"), rgb16 / 65535, HALF_LEVEL),
        "48-bit RGB TIFF": (lambda: _cv2(rgb16[:, :, ::-1], ".tiff"), rgb16 / 65535, HALF_LEVEL),
        "64-bit RGBA PNG": (
            lambda: _cv2(np.dstack([rgb16[:, :, ::-1], np.full_like(RAMP16, 9)]), ".png"),
            rgb16 / 65535,
            HALF_LEVEL,
        ),
        "32-bit grey+alpha PNG": (lambda: _png(4, 2, 16, 4, alpha16), ramp16, HALF_LEVEL),
        "I TIFF (32-bit)": (
            lambda: _encode(Image.frombytes("I", (4, 2), ints.astype("<i4").tobytes()), "TIFF"),
            _grey(ints / (2**31 - 1)),
            HALF_LEVEL,
        ),
        "F TIFF in [0, 1]": (
            lambda: _encode(Image.frombytes("F", (4, 2), floats.astype("<f4").tobytes()), "TIFF"),
            _grey(floats),
            HALF_LEVEL,
        ),
        "F TIFF in [0, 255]": (
            lambda: _encode(Image.fromarray(RAMP8).convert("F"), "TIFF"),
            ramp8,
            HALF_LEVEL,
        ),
        "CMYK TIFF": (lambda: _encode(Image.new("RGB", (4, 2), COLOUR).convert("CMYK"), "TIFF"), colour, 0),
        "CMYK JPEG": (
            lambda: _encode(Image.new("RGB", (4, 2), COLOUR).convert("CMYK"), "JPEG", quality=100),
            colour,
            3 / 255,
        ),
        "YCbCr TIFF": (lambda: _encode(Image.new("RGB", (4, 2), COLOUR).convert("YCbCr"), "TIFF"), colour, 2 / 255),
        "LAB TIFF": (lambda: _encode(_lab(), "TIFF"), colour, 2 / 255),
        "L JPEG": (
            lambda: _encode(Image.new("L", (8, 8), 90), "JPEG", quality=100),
            _grey(np.full((8, 8), 90 / 255)),
            0,
        ),
        "RGBA WebP": (
            lambda: _encode(Image.new("RGBA", (4, 2), (*COLOUR, 255)), "WEBP", lossless=True),
            colour,
            0,
        ),
        "BMP": (lambda: _encode(Image.new("RGB", (4, 2), COLOUR), "BMP"), colour, 0),
    }


MODE_CASES = _mode_cases()


@pytest.mark.parametrize("case", sorted(MODE_CASES))
def test_every_mode_loads_by_its_true_range(case: str, tmp_path: Path) -> None:
    encode, expected, tolerance = MODE_CASES[case]
    path = tmp_path / "image.png"
    path.write_bytes(encode())
    loaded = load_image(path)
    assert loaded.dtype == np.uint8 and loaded.shape == (*expected.shape[:2], 3)
    np.testing.assert_allclose(loaded / 255.0, expected, atol=tolerance + 1e-9, rtol=0)


@pytest.mark.parametrize("mode", ["I;16N", "HSV", "PA"])
def test_modes_no_format_writes_load_by_their_true_range(mode: str) -> None:
    """Modes Pillow holds in memory but writes to no file format: decoders hand them over too."""
    from cloakbench.images import to_rgb_uint8

    if mode == "I;16N":
        img = Image.frombytes(mode, (4, 2), RAMP16.astype("=u2").tobytes())
        expected = _grey(RAMP16 / 65535)
    elif mode == "HSV":
        img = Image.new("RGB", (4, 2), COLOUR).convert("HSV")
        expected = np.broadcast_to(np.array(COLOUR) / 255, (2, 4, 3))
    else:
        img = Image.frombytes(mode, (4, 2), bytes([7, 255] * 8))
        img.putpalette([*COLOUR] * 256)
        expected = np.broadcast_to(np.array(COLOUR) / 255, (2, 4, 3))
    np.testing.assert_allclose(to_rgb_uint8(img) / 255.0, expected, atol=HALF_LEVEL, rtol=0)


@pytest.mark.parametrize(
    ("what", "encode"),
    [
        ("F with values above 255", lambda: _encode(Image.frombytes("F", (2, 1), struct.pack("<2f", 1, 300)), "TIFF")),
        ("F with NaN", lambda: _encode(Image.frombytes("F", (2, 1), struct.pack("<2f", 0.5, float("nan"))), "TIFF")),
        ("I with negative values", lambda: _encode(Image.frombytes("I", (2, 1), struct.pack("<2i", -5, 9)), "TIFF")),
    ],
)
def test_pixels_without_a_known_range_are_left_out(
    what: str, encode: Callable[[], bytes], celeb24_root: Path, tmp_path: Path, tmp_cache: Path
) -> None:
    root = tmp_path / "faces"
    (root / "a").mkdir(parents=True)
    Image.fromarray(_face(celeb24_root)).save(root / "a" / "good.png")
    (root / "a" / "odd.png").write_bytes(encode())
    manifest = scan_folder(root)
    assert [r.path.name for r in manifest.records] == ["good.png"]
    [problem] = manifest.problems
    assert problem.path.name == "odd.png" and problem.reason.startswith("cannot decode:"), what


def test_a_16bit_png_face_is_a_face_not_a_white_square(celeb24_root: Path, tmp_path: Path, tmp_cache: Path) -> None:
    """A 16-bit greyscale face in a dataset and in ``protect --aligned`` loads as its grey levels (it was white)."""
    from cloakbench.protect import protect_folder

    grey8 = np.asarray(Image.fromarray(_face(celeb24_root)).convert("L"), dtype=np.uint16)
    grey16 = grey8 * 257 + 100  # a little below the next level: truncation and rounding agree, clipping does not
    root = tmp_path / "faces"
    (root / "a").mkdir(parents=True)
    Image.frombytes("I;16", (112, 112), grey16.astype("<u2").tobytes()).save(root / "a" / "deep.png")
    manifest = scan_folder(root)
    [loaded] = load_images(manifest.records)
    np.testing.assert_allclose(loaded.numpy(), np.broadcast_to(grey8 / 255.0, (3, 112, 112)), atol=HALF_LEVEL)

    report = protect_folder(root / "a", defense="noise", aligned=True, out_dir=tmp_path / "out")
    [photo] = report.photos
    assert photo.status == "cloaked" and photo.output is not None
    cloaked = load_image(photo.output)
    assert np.abs(cloaked[:, :, 0].astype(int) - grey8).max() <= 9  # noise of 8/255 around the face, not 255


# --------------------------------------------------------------------------------------------------------------
# item 5: EXIF orientation in every loader
# --------------------------------------------------------------------------------------------------------------


def test_exif_orientation_is_honoured_in_a_folder_that_is_not_aligned(
    celeb24_root: Path, tmp_path: Path, tmp_cache: Path
) -> None:
    upright = _face(celeb24_root)[:, 8:104]  # 112 high, 96 wide: a rotation shows in the shape too
    root = tmp_path / "faces"
    (root / "a").mkdir(parents=True)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # "rotate 90 degrees clockwise to display"
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # what a sideways camera stores
    stored.save(root / "a" / "phone.jpg", format="JPEG", quality=98, exif=exif)
    Image.fromarray(upright).save(root / "a" / "plain.png")
    manifest = scan_folder(root)
    images = load_images(manifest.records)  # one batch: both upright, so both 112x96
    assert tuple(images.shape) == (2, 3, 112, 96)
    expected = torch.from_numpy(np.array(upright)).permute(2, 0, 1).float() / 255
    assert float((images[0] - expected).abs().mean()) < 2 / 255  # JPEG at quality 98
    assert torch.equal(images[1], expected)


# --------------------------------------------------------------------------------------------------------------
# item 12: symbolic-link loops, dangling links and unreadable files are left out and listed
# --------------------------------------------------------------------------------------------------------------


def _unreadable(path: Path) -> None:
    if os.geteuid() != 0:
        path.write_bytes(b"x")
        path.chmod(0)
    else:  # root reads any file: a link to a file whose read fails (stat says regular file)
        path.symlink_to("/proc/self/mem")


BAD_ENTRIES: dict[str, Callable[[Path], None]] = {
    "a symbolic-link loop": lambda p: p.symlink_to(p.name),
    "a dangling link": lambda p: p.symlink_to("nowhere.png"),
    "an unreadable file": _unreadable,
}


@pytest.mark.parametrize("kind", sorted(BAD_ENTRIES))
@pytest.mark.parametrize("where", ["identity folder", "dataset root"])
def test_a_bad_entry_is_left_out_and_listed(
    kind: str, where: str, celeb24_root: Path, tmp_path: Path, tmp_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "faces"
    for identity in ("Barack_Obama", "Halle_Berry"):
        (root / identity).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(_face(celeb24_root, identity, i)).save(root / identity / f"{i}.png")
    bad = (root / "Barack_Obama" if where == "identity folder" else root) / "bad.png"
    BAD_ENTRIES[kind](bad)
    with caplog.at_level(logging.WARNING):
        manifest = scan_folder(root)
    assert len(manifest.records) == 4 and manifest.identities == ("Barack_Obama", "Halle_Berry")
    [problem] = manifest.problems
    assert problem.path == bad.parent.resolve() / "bad.png"
    if where == "identity folder":
        assert problem.reason.startswith(("cannot read", "cannot decode")), problem.reason
    assert any("bad.png" in r.getMessage() for r in caplog.records)

    if where == "identity folder":  # align: true lists it as well, and aligns the rest
        report = align_folder(root, tmp_path / "aligned", YuNetDetector())
        assert report.n_aligned == 4
        assert [o.source for o in report.outcomes if o.status != "aligned"] in ([], ["Barack_Obama/bad.png"])


# --------------------------------------------------------------------------------------------------------------
# item 14: identity names in NFC; control characters escaped in messages
# --------------------------------------------------------------------------------------------------------------


def test_identity_names_are_nfc(celeb24_root: Path, tmp_path: Path, tmp_cache: Path) -> None:
    root = tmp_path / "faces"
    nfd = unicodedata.normalize("NFD", "José")
    (root / nfd).mkdir(parents=True)
    for i in range(2):
        Image.fromarray(_face(celeb24_root, index=i)).save(root / nfd / f"{i}.png")
    manifest = scan_folder(root)
    assert manifest.identities == ("José",) and unicodedata.is_normalized("NFC", manifest.identities[0])
    assert {r.image_id.split("/")[0] for r in manifest.records} == {nfd}  # ids keep the path as it is on disk


def test_folders_that_differ_only_in_normalisation_are_refused(
    celeb24_root: Path, tmp_path: Path, tmp_cache: Path
) -> None:
    root = tmp_path / "faces"
    for name in (unicodedata.normalize("NFC", "José"), unicodedata.normalize("NFD", "José")):
        (root / name).mkdir(parents=True)
        Image.fromarray(_face(celeb24_root)).save(root / name / "0.png")
    with pytest.raises(DatasetError) as info:
        scan_folder(root)
    message = str(info.value)
    assert "\n" not in message and "differ only in Unicode normalisation" in message
    assert "Jos\\xe9" in message and "Jose\\u0301" in message


def test_control_characters_in_names_are_escaped_in_messages(
    celeb24_root: Path, tmp_path: Path, tmp_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "faces"
    folder = root / "evil\x1b[2J\rname"
    folder.mkdir(parents=True)
    Image.fromarray(_face(celeb24_root)).save(folder / "0.png")
    (folder / "bad\nfile\x1b[31m.png").write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING, logger="cloakbench.datasets.folder"):
        manifest = scan_folder(root)
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings and all("\x1b" not in w and "\r" not in w and "\n" not in w for w in warnings)
    assert any("evil\\x1b[2J\\rname/bad\\nfile\\x1b[31m.png" in w for w in warnings)

    [record] = manifest.records
    record.path.write_bytes(b"changed since the scan")
    with pytest.raises(DatasetError) as info:
        load_images([record])
    assert "\x1b" not in str(info.value) and "\r" not in str(info.value) and "evil\\x1b[2J\\rname" in str(info.value)


def test_a_16bit_png_sent_to_a_service_is_decoded_by_its_true_range() -> None:
    """The services decode PNG bytes with the one image loader: a 16-bit grey face is grey, not white."""
    from cloakbench.attacks.services.base import decode_png

    grey = np.full((48, 48), 32768, dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    rgb = decode_png(buf.getvalue())
    assert rgb.shape == (48, 48, 3) and int(rgb.min()) == int(rgb.max()) == round(32768 / 257)


@pytest.mark.parametrize("kind", ["loop", "dangling"])
def test_protect_reports_a_looping_or_dangling_link_as_unreadable(
    celeb24_root: Path, tmp_path: Path, kind: str
) -> None:
    """`protect` used to drop such a link without a word; it is now one of the photos it could not read."""
    from cloakbench.protect import UNREADABLE, protect_folder

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(_face(celeb24_root)).save(folder / "face.png")
    link = folder / "broken.jpg"
    if kind == "loop":
        link.symlink_to(link)
    else:
        link.symlink_to(folder / "missing.jpg")
    report = protect_folder(folder, defense="noise", aligned=True, out_dir=tmp_path / "out")
    statuses = {p.source.name: p.status for p in report.photos}
    assert statuses == {"broken.jpg": UNREADABLE, "face.png": "cloaked"}
