"""Identity display names (``dataset.names``): a CSV file renames identity folders for everything downstream.

The dataset is the session's ``names_dataset`` (4 celeb24 folders x 8 photos, copied; Barack_Obama renamed to
``<script>alert(1)</script>``, Daniel_Radcliffe to a non-ASCII name with a '/'). Every malformed names file is
refused by ``cloakbench validate`` with exit code 2 and one exact line naming the suite, the key, the file, the
line and the value.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from cloakbench.bench.executors import load_layout, suite_digest
from cloakbench.bench.runner import load_manifest, load_suite_data
from cloakbench.bench.suite import load_suite, parse_suite
from cloakbench.cache import ENV_CACHE, cache_root
from cloakbench.cli import EXIT_BAD_INPUT, EXIT_OK, main
from cloakbench.config import stable_hash
from cloakbench.datasets import read_identity_names, rename_identities, scan_folder, split_per_identity
from cloakbench.errors import ConfigError, DatasetError

USER_CACHE = cache_root()  # before any test points the cache elsewhere
SCRIPT = "<script>alert(1)</script>"
UNICODE = "Dániel Rádcliffe/ダニエル"
NAMES = {"Barack_Obama": SCRIPT, "Daniel_Radcliffe": UNICODE}
FOLDERS = ("Barack_Obama", "Daniel_Radcliffe", "Drew_Barrymore", "Gwyneth_Paltrow")


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cloakbench cache for each test (scans of temporary folders stay out of the user's cache)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(ENV_CACHE, str(cache))
    return cache


def _suite(tmp_path: Path, root: Path, names: str | None, **extra: Any) -> Path:
    """A one-defense suite on ``root`` (absolute) with ``dataset.names: names`` (as written), saved in tmp_path."""
    dataset: dict[str, Any] = {"source": "folder", "path": str(root)}
    if names is not None:
        dataset["names"] = names
    data: dict[str, Any] = {
        "name": "names",
        "dataset": dataset,
        "defenses": ["noise"],
        "recognizers": ["sface"],
        "classifiers": ["nearest-neighbour"],
        "device": "cpu",
        **extra,
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def test_the_names_file_reads_as_written(names_dataset: tuple[Path, Path]) -> None:
    root, names_csv = names_dataset
    assert read_identity_names(names_csv, root) == {"Barack_Obama": SCRIPT, "Daniel_Radcliffe": UNICODE}


def test_the_manifest_identities_are_the_mapped_names(names_dataset: tuple[Path, Path], tmp_path: Path) -> None:
    root, names_csv = names_dataset
    suite = load_suite(_suite(tmp_path, root, str(names_csv), protected={"identities": [SCRIPT, UNICODE]}))
    manifest, alignment = load_suite_data(suite)
    assert alignment is None
    assert manifest.identities == tuple(sorted([SCRIPT, UNICODE, "Drew_Barrymore", "Gwyneth_Paltrow"]))
    assert len(manifest.records) == 32
    for record in manifest.records:  # image ids and paths keep the folder; only the identity is renamed
        assert record.image_id.startswith(f"{record.folder}/") and record.folder in FOLDERS
        assert record.path == root / record.image_id
        assert record.identity == NAMES.get(record.folder, record.folder)
    assert {k: len(v) for k, v in manifest.by_identity().items()} == dict.fromkeys(manifest.identities, 8)

    splits = split_per_identity(manifest, train_fraction=0.7, seed=10)
    assert set(splits) == {r.image_id for r in manifest.records}
    out = tmp_path / "manifest.csv"
    manifest.write_csv(out, splits=splits)
    with out.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["identity"] for r in rows} == set(manifest.identities)


def test_the_digest_follows_the_names(names_dataset: tuple[Path, Path]) -> None:
    root, _ = names_dataset
    plain = scan_folder(root)
    assert rename_identities(plain, {}).digest == plain.digest  # no names: the digest it always had
    assert rename_identities(plain, {"Drew_Barrymore": "Drew_Barrymore"}).digest == plain.digest
    one = rename_identities(plain, {"Barack_Obama": SCRIPT})
    other = rename_identities(plain, {"Barack_Obama": UNICODE})
    swapped = rename_identities(plain, {"Drew_Barrymore": "Gwyneth_Paltrow", "Gwyneth_Paltrow": "Drew_Barrymore"})
    assert len({plain.digest, one.digest, other.digest, swapped.digest}) == 4
    assert rename_identities(one, {"Barack_Obama": SCRIPT}) == one  # names apply to folders: no double renaming
    with pytest.raises(DatasetError, match="folders 'Barack_Obama' and 'Drew_Barrymore' would both be identity 'x'"):
        rename_identities(plain, {"Barack_Obama": "x", "Drew_Barrymore": "x"})


def test_renaming_reseeds_the_identity_split_only(names_dataset: tuple[Path, Path]) -> None:
    """Splits are seeded by the identity's name: the renamed identity gets its own draw, the others keep theirs."""
    root, _ = names_dataset
    plain = scan_folder(root)
    renamed = rename_identities(plain, {"Barack_Obama": SCRIPT})
    before = split_per_identity(plain, seed=10)
    after = split_per_identity(renamed, seed=10)
    for record in plain.records:
        if record.folder != "Barack_Obama":
            assert before[record.image_id] is after[record.image_id]


def test_validate_accepts_a_suite_protecting_a_script_name(
    names_dataset: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, names_csv = names_dataset
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "names.csv").write_bytes(names_csv.read_bytes())
    path = _suite(tmp_path, root, "meta/names.csv", protected={"identities": [SCRIPT, UNICODE]})

    assert main(["validate", str(path)]) == EXIT_OK
    assert "valid suite 'names'" in capsys.readouterr().out

    suite = load_suite(path)
    assert suite.dataset.names == (tmp_path / "meta" / "names.csv").resolve()  # relative to the suite file
    assert suite.protected.identities == (SCRIPT, UNICODE)
    assert parse_suite(suite.to_dict(), where="config.yaml") == suite  # the resolved suite re-runs as is


def test_the_dry_run_protects_the_names(
    names_dataset: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`run --dry-run` builds the run's layout (scan, split, protected choice) from the renamed identities."""
    root, names_csv = names_dataset
    path = _suite(tmp_path, root, str(names_csv), protected={"count": 4})
    layout = load_layout(load_suite(path))
    assert layout.shape.protected == tuple(sorted([SCRIPT, UNICODE, "Drew_Barrymore", "Gwyneth_Paltrow"]))
    assert set(layout.shape.train_photos) == set(layout.shape.protected)
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--dry-run", "--json"]) == EXIT_OK
    assert not out.exists()
    assert json.loads(capsys.readouterr().out)["suite"] == "names"


def test_protecting_a_renamed_folder_by_its_folder_name_is_refused(
    names_dataset: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, names_csv = names_dataset
    path = _suite(tmp_path, root, str(names_csv), protected={"identities": ["Drew_Barrymore", "Barack_Obama"]})
    usable = ", ".join(sorted([SCRIPT, UNICODE, "Drew_Barrymore", "Gwyneth_Paltrow"]))
    expected = (
        f"{path}: protected.identities[1]: 'Barack_Obama' is a folder in {root} that dataset.names renames to "
        f"{SCRIPT!r}; use that name (identities with 2+ photos: {usable})"
    )
    assert main(["validate", str(path)]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err == f"cloakbench: error: {expected}\n"

    path = _suite(tmp_path, root, str(names_csv), protected={"identities": ["Nobody"]})
    assert main(["validate", str(path)]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err == (
        f"cloakbench: error: {path}: protected.identities[0]: 'Nobody' is not an identity folder in {root} nor a "
        f"name from dataset.names (identities with 2+ photos: {usable})\n"
    )


def test_names_are_only_for_folder_datasets(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"x: dataset: 'names' is only for source 'folder'"):
        parse_suite(
            {"name": "n", "dataset": {"names": "names.csv"}, "defenses": ["noise"], "recognizers": ["sface"]},
            where="x",
        )


def test_the_suite_digest_pins_the_names(names_dataset: tuple[Path, Path], tmp_path: Path) -> None:
    """A results folder is bound to the names the file gives (a changed file must not resume into old rows); a
    suite without dataset.names keeps the digest it had before the key existed."""
    root, names_csv = names_dataset
    plain = load_suite(_suite(tmp_path, root, None))
    before_names_existed = plain.to_dict()
    del before_names_existed["dataset"]["names"]
    for defense in before_names_existed["defenses"]:  # cloak_fraction (default 1) came later still
        del defense["cloak_fraction"]
    assert suite_digest(plain) == stable_hash(before_names_existed, length=24)

    own = tmp_path / "names.csv"
    own.write_bytes(names_csv.read_bytes())
    named = load_suite(_suite(tmp_path, root, str(own)))
    first = suite_digest(named)
    assert first != suite_digest(plain)
    own.write_text(f"folder,name\nBarack_Obama,{UNICODE}\n", encoding="utf-8")
    assert suite_digest(named) != first
    own.write_text(f"name,folder,extra\r\n{UNICODE},Daniel_Radcliffe,1\r\n{SCRIPT},Barack_Obama,2\r\n", "utf-8")
    assert suite_digest(named) == first  # the same names, written otherwise


# (case id, the names file: text, bytes or None (no file), the error after "<names file>: ")
MALFORMED: list[tuple[str, str | bytes | None, str]] = [
    ("missing file", None, "identity names file not found"),
    ("empty file", "\n\n", "no header row (expected a header row 'folder,name')"),
    (
        "header lacks a column",
        "folder,nom\nBarack_Obama,Barack\n",
        "line 1: header row 'folder,nom' lacks column 'name' (expected a header row 'folder,name'; other columns "
        "are ignored)",
    ),
    (
        "header lacks the folder column",
        "\nClass_ID,Name\nn000001,x\n",
        "line 2: header row 'Class_ID,Name' lacks column 'folder' (expected a header row 'folder,name'; other "
        "columns are ignored)",
    ),
    (
        "header lacks both columns",
        "id,display\nBarack_Obama,x\n",
        "line 1: header row 'id,display' lacks columns 'folder', 'name' (expected a header row 'folder,name'; "
        "other columns are ignored)",
    ),
    (
        "header repeats a column",
        "folder,name,name\nBarack_Obama,a,b\n",
        "line 1: header row 'folder,name,name' has column 'name' twice",
    ),
    (
        "folder not in the dataset",
        "folder,name\nBarack_Obama,Barack\nTom_Hanks,Tom\n",
        "line 3: folder 'Tom_Hanks' is not an identity folder in {root}",
    ),
    ("empty folder", "folder,name\n,Somebody\n", "line 2: empty folder"),
    ("empty name", "folder,name\nDrew_Barrymore,Drew\nBarack_Obama,\n", "line 3: empty name for folder 'Barack_Obama'"),
    ("missing name cell", "folder,name\nBarack_Obama\n", "line 2: empty name for folder 'Barack_Obama'"),
    (
        "two folders with one name",
        "folder,name\nBarack_Obama,Same\nDrew_Barrymore,Same\n",
        "line 3: name 'Same' of folder 'Drew_Barrymore' is also the name of folder 'Barack_Obama' (line 2)",
    ),
    (
        "name of an unrenamed folder",
        "folder,name\nDrew_Barrymore,Drew\nBarack_Obama,Gwyneth_Paltrow\n",
        "line 3: name 'Gwyneth_Paltrow' of folder 'Barack_Obama' is also the name of identity folder "
        "'Gwyneth_Paltrow', which this file does not rename",
    ),
    (
        "duplicate folder row",
        "folder,name\nBarack_Obama,A\n\nBarack_Obama,B\n",
        "line 4: folder 'Barack_Obama' is listed again (first on line 2)",
    ),
    (
        "name with surrounding space",
        "folder,name\nBarack_Obama, Barack\n",
        "line 2: name ' Barack' of folder 'Barack_Obama' starts or ends with white space",
    ),
    (
        "unclosed quote",
        'folder,name\nBarack_Obama,"Barack\nDrew_Barrymore,Drew\n',
        "line 2: name 'Barack\\nDrew_Barrymore,Drew\\n' of folder 'Barack_Obama' holds a control character",
    ),
    ("not UTF-8", b"folder,name\nBarack_Obama,Ob\xe1ma\n", "line 2: not UTF-8 text (byte 0xe1)"),
]


@pytest.mark.parametrize(("case", "text", "expected"), MALFORMED, ids=[c[0] for c in MALFORMED])
def test_a_malformed_names_file_is_refused_with_file_line_and_value(
    case: str,
    text: str | bytes | None,
    expected: str,
    names_dataset: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, _ = names_dataset
    names = tmp_path / "names.csv"
    if isinstance(text, bytes):
        names.write_bytes(text)
    elif text is not None:
        names.write_text(text, encoding="utf-8", newline="")
    path = _suite(tmp_path, root, "names.csv", protected={"identities": ["Gwyneth_Paltrow"]})
    message = f"{path}: dataset.names: {names}: {expected.replace('{root}', str(root))}"

    assert main(["validate", str(path)]) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"cloakbench: error: {message}\n"

    with pytest.raises(DatasetError) as caught:  # what a run reads, by the same rules
        read_identity_names(names, root)
    assert str(caught.value) == f"{names}: {expected.replace('{root}', str(root))}"


def test_a_names_folder_is_not_a_file(names_dataset: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = names_dataset
    (tmp_path / "names.csv").mkdir()
    path = _suite(tmp_path, root, "names.csv")
    with pytest.raises(ConfigError) as caught:
        load_suite(path)
    assert str(caught.value) == f"{path}: dataset.names: {tmp_path / 'names.csv'}: identity names file is not a file"


def test_swapped_names_are_allowed(names_dataset: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = names_dataset
    names = tmp_path / "names.csv"
    names.write_text("folder,name\nDrew_Barrymore,Gwyneth_Paltrow\nGwyneth_Paltrow,Drew_Barrymore\n", "utf-8")
    suite = load_suite(_suite(tmp_path, root, "names.csv"))
    manifest, _ = load_manifest(suite)
    assert {r.folder: r.identity for r in manifest.records if r.folder.startswith(("D", "G"))} == {
        "Daniel_Radcliffe": "Daniel_Radcliffe",
        "Drew_Barrymore": "Gwyneth_Paltrow",
        "Gwyneth_Paltrow": "Drew_Barrymore",
    }


def test_aligned_photos_get_the_names(celeb24_root: Path, tmp_path: Path, own_cache: Path) -> None:
    """`align: true`: the photos are aligned (cached by the photos alone), then the aligned folders renamed; the
    alignment report names the identities as the manifest does, its source paths keep the folders."""
    import shutil

    import cv2
    from PIL import Image

    from cloakbench.datasets import DLIB_SHAPE5_PINNED, YUNET_PINNED
    from cloakbench.images import load_image

    for pinned in (YUNET_PINNED, DLIB_SHAPE5_PINNED):  # the user's fetched detector files, when there
        user_copy = USER_CACHE / pinned.cache_path.relative_to(own_cache)
        if user_copy.is_file():
            shutil.copy(user_copy, pinned.cache_path)

    rng = np.random.default_rng(3)
    src = tmp_path / "photos"
    for folder in ("Keanu_Reeves", "Tina_Fey", "Will_Smith"):
        (src / folder).mkdir(parents=True)
        for index in (3, 17, 31):  # each aligned crop enlarged into a larger noisy picture
            photo = rng.integers(90, 160, (330, 300, 3), dtype=np.uint8)
            face = cv2.resize(load_image(celeb24_root / folder / f"{index:04d}.png"), (240, 240))
            photo[40:280, 30:270] = face
            Image.fromarray(photo).save(src / folder / f"{index}.jpg", quality=95)
    names = tmp_path / "names.csv"
    names.write_text(f"folder,name\nKeanu_Reeves,{SCRIPT}\nTina_Fey,{UNICODE}\n", encoding="utf-8")
    suite = parse_suite(
        {
            "name": "aligned",
            "dataset": {"source": "folder", "path": str(src), "align": True, "names": str(names)},
            "defenses": ["noise"],
            "recognizers": ["sface"],
        },
        where="aligned suite",
    )
    manifest, alignment = load_manifest(suite)
    assert alignment is not None
    assert manifest.root != src  # the aligned copy
    assert manifest.identities == tuple(sorted([SCRIPT, UNICODE, "Will_Smith"]))
    assert {r.folder for r in manifest.records} == {"Keanu_Reeves", "Tina_Fey", "Will_Smith"}
    photos = alignment["photos"]
    assert {p["source"].split("/")[0]: p["identity"] for p in photos} == {
        "Keanu_Reeves": SCRIPT,
        "Tina_Fey": UNICODE,
        "Will_Smith": "Will_Smith",
    }
    assert sum(p["status"] == "aligned" for p in photos) == len(manifest.records) == 9


def test_a_run_stores_the_names_and_never_makes_paths_of_them(
    names_dataset: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`cloakbench run` on the renamed dataset: the stored rows name the identities by their names; no file or
    folder of the run is named after one."""
    monkeypatch.setenv(ENV_CACHE, str(USER_CACHE))  # the recognizer's fetched weights
    root, names_csv = names_dataset
    path = _suite(tmp_path, root, str(names_csv), protected={"identities": [SCRIPT, UNICODE]})
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--json"]) == EXIT_OK
    capsys.readouterr()
    with (out / "manifest.csv").open(encoding="utf-8", newline="") as fh:
        assert {r["image_id"].split("/")[0]: r["identity"] for r in csv.DictReader(fh)} == {
            "Barack_Obama": SCRIPT,
            "Daniel_Radcliffe": UNICODE,
            "Drew_Barrymore": "Drew_Barrymore",
            "Gwyneth_Paltrow": "Gwyneth_Paltrow",
        }
    with (out / "queries.csv").open(encoding="utf-8", newline="") as fh:
        assert {r["protected_identity"] for r in csv.DictReader(fh)} == {SCRIPT, UNICODE}
    with (out / "cloaks.csv").open(encoding="utf-8", newline="") as fh:
        assert {r["identity"] for r in csv.DictReader(fh)} == {SCRIPT, UNICODE}
    made = [p.relative_to(out).as_posix() for p in out.rglob("*")]
    assert made and not [p for p in made if "script" in p or "ダニエル" in p or "Barack" in p]
