"""celeb24's manifest, the check of a copy, and the build from its source layout (issue 21).

The source is the commit's ``datasets/celebrity_images/<Identity Name>/<n>.png`` (spaces in folder names, numbers
without padding, hundreds of photos per identity). The tests lay out such a source from the shared copy's own files
(renamed back, with decoy files after the ones celeb24 keeps and numbers whose text order is not their numeric
order), so the build's selection, renaming and verification run on the real bytes; a real build from the commit's
archive (220 MB from GitHub; here from a local mirror) took 4.3 s on the 2-core Intel Xeon of 2026-12-02.
"""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import pytest

from cloakbench.cli import EXIT_BAD_INPUT, EXIT_OK, main
from cloakbench.datasets import celeb24
from cloakbench.errors import DatasetError


def test_the_shipped_manifest_is_the_shared_copys(celeb24_root: Path) -> None:
    listed = celeb24.manifest()
    assert len(listed) == 1839 and len({rel.split("/")[0] for rel in listed}) == 24
    shared = (celeb24_root.parent / "celeb24.sha256").read_text(encoding="ascii")
    assert shared == celeb24.MANIFEST.read_text(encoding="ascii")
    assert celeb24.verify(celeb24_root) == []


def _source(celeb24_root: Path, root: Path, *, decoys: int = 3) -> Path:
    """The source repository's layout made from the shared files: identity ``i``'s photo ``k`` saved as ``<k>.png``
    in a folder named with spaces, plus ``decoys`` later-numbered files of other bytes."""
    base = root / celeb24.SOURCE_FOLDER
    for rel in celeb24.manifest():
        ident, name = rel.split("/")
        folder = base / ident.replace("_", " ")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(celeb24_root / rel, folder / f"{int(name[:-4])}.png")
    for folder in base.iterdir():
        n = len(list(folder.iterdir()))
        for k in range(decoys):
            (folder / f"{n + k}.png").write_bytes(b"not this photo " + bytes([k]))
    return root


def test_build_from_a_checkout_takes_the_numeric_order_and_verifies(celeb24_root: Path, tmp_path: Path) -> None:
    source = _source(celeb24_root, tmp_path / "checkout")
    names = sorted(p.name for p in (source / celeb24.SOURCE_FOLDER / "Barack Obama").iterdir())
    assert names[:3] == ["0.png", "1.png", "10.png"]  # text order is not the numeric order the build follows
    dest = celeb24.build(tmp_path / "celeb24", source=source)
    assert celeb24.verify(dest) == []
    assert (dest / "Lindsay_Lohan" / "0021.png").read_bytes() == (celeb24_root / "Lindsay_Lohan/0021.png").read_bytes()
    assert not (dest / "Lindsay_Lohan" / "0022.png").exists()  # the decoys after the 22 kept photos


def test_build_from_the_commits_archive(celeb24_root: Path, tmp_path: Path) -> None:
    source = _source(celeb24_root, tmp_path / "checkout", decoys=1)
    archive = tmp_path / "source.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:  # GitHub's archive holds the tree under one top folder
        tar.add(source / "datasets", arcname=f"Face-Applications-{celeb24.SOURCE_COMMIT}/datasets")
    assert celeb24.verify(celeb24.build(tmp_path / "celeb24", source=archive)) == []


def test_a_wrong_source_file_fails_the_build_and_leaves_nothing(celeb24_root: Path, tmp_path: Path) -> None:
    source = _source(celeb24_root, tmp_path / "checkout", decoys=0)
    (source / celeb24.SOURCE_FOLDER / "Tom Hanks" / "7.png").write_bytes(b"tampered")
    with pytest.raises(DatasetError, match=r"Tom Hanks/7\.png \(for Tom_Hanks/0007\.png\)"):
        celeb24.build(tmp_path / "celeb24", source=source)
    assert not (tmp_path / "celeb24").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["checkout"]  # no half-built folder either


def test_verify_names_missing_changed_and_extra_files(celeb24_root: Path, tmp_path: Path) -> None:
    copy = tmp_path / "celeb24"
    shutil.copytree(celeb24_root, copy)
    (copy / "Tina_Fey" / "0003.png").unlink()
    (copy / "Will_Smith" / "0000.png").write_bytes(b"x")
    (copy / "Will_Smith" / "notes.txt").write_text("hi")
    problems = " | ".join(celeb24.verify(copy))
    assert "1 file(s) missing: Tina_Fey/0003.png" in problems
    assert "differs from the manifest: Will_Smith/0000.png" in problems
    assert "not in the manifest: Will_Smith/notes.txt" in problems


def test_cli_verifies_and_refuses_with_one_line(
    celeb24_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["data", "celeb24", "--verify", str(celeb24_root)]) == EXIT_OK
    assert "all 1839 files match" in capsys.readouterr().out
    broken = tmp_path / "celeb24"
    shutil.copytree(celeb24_root / "Tom_Hanks", broken / "Tom_Hanks")
    assert main(["data", "celeb24", "--verify", str(broken)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0] and str(broken) in err[0]
    # an existing folder is checked, never overwritten
    assert main(["data", "celeb24", "--dest", str(broken)]) == EXIT_BAD_INPUT
    assert "exists and is not celeb24" in capsys.readouterr().err
