"""celeb24, the project's test set: its manifest, a check of any copy, and a build from its public source.

celeb24 is 1,839 aligned 112x112 PNG faces of 24 people (a sample of the Glint360k training set as the public
GitHub repository ElisonSherton/Face-Applications publishes it, folder ``datasets/celebrity_images/``, at commit
:data:`SOURCE_COMMIT`; non-commercial research use). The repository ships no face: it ships
``celeb24.sha256`` beside this module, one line ``<sha256>  celeb24/<Identity>/<NNNN>.png`` per file (the format
``sha256sum -c`` reads).

- :func:`verify` checks a copy against the manifest: every file present, none extra, every SHA-256 equal. The
  tests check ``../shared/datasets/celeb24`` this way before they read it (``tests/conftest.py``).
- :func:`build` makes a copy from the source: the commit's archive downloaded from GitHub (where the network
  allows), a local archive of it, or a checkout. Each identity's files are taken in numeric order
  (``0.png, 1.png, 2.png, ..., 10.png``), as many as the manifest lists for it, renamed ``0000.png`` onwards
  (the folder ``Barack Obama`` becomes ``Barack_Obama``), and each one's SHA-256 is checked before it is written;
  the folder appears only when every file was right. ``cloakbench data celeb24 --dest DIR`` runs it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

from cloakbench.errors import DatasetError

SOURCE_REPOSITORY = "ElisonSherton/Face-Applications"
SOURCE_COMMIT = "a575801921a3bbffd09129a959c24af04d447478"
SOURCE_FOLDER = "datasets/celebrity_images"
ARCHIVE_URL = f"https://codeload.github.com/{SOURCE_REPOSITORY}/tar.gz/{SOURCE_COMMIT}"
MANIFEST = Path(__file__).with_name("celeb24.sha256")
MAX_LISTED = 5


def manifest() -> dict[str, str]:
    """``<Identity>/<NNNN>.png`` -> SHA-256 (hex), from the shipped manifest."""
    out: dict[str, str] = {}
    for number, line in enumerate(MANIFEST.read_text(encoding="ascii").splitlines(), 1):
        digest, _, path = line.partition("  ")
        if len(digest) != 64 or not path.startswith("celeb24/") or path.count("/") != 2:
            raise DatasetError(f"{MANIFEST}:{number}: not a '<sha256>  celeb24/<identity>/<file>' line: {line!r}")
        out[path.removeprefix("celeb24/")] = digest
    return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _listed(kind: str, items: list[str]) -> str:
    more = f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"{len(items)} {kind}: {', '.join(items[:MAX_LISTED])}{more}"


def verify(root: Path) -> list[str]:
    """What is wrong with the copy of celeb24 at ``root`` (empty: every file of the manifest, none else, every
    SHA-256 equal); each item names the files."""
    root = Path(root)
    if not root.is_dir():
        return [f"{root} is not a folder"]
    expected = manifest()
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    missing = sorted(set(expected) - present)
    extra = sorted(present - set(expected))
    changed = sorted(rel for rel in set(expected) & present if _sha256((root / rel).read_bytes()) != expected[rel])
    problems = []
    if missing:
        problems.append(_listed("file(s) missing", missing))
    if changed:
        problems.append(_listed("file(s) whose SHA-256 differs from the manifest", changed))
    if extra:
        problems.append(_listed("file(s) not in the manifest", extra))
    return [f"{root}: {p}" for p in problems]


def plan(source_names: Mapping[str, list[str]]) -> dict[str, tuple[str, str]]:
    """Target ``<Identity>/<NNNN>.png`` -> (source identity folder, source file name), from the source's file
    names per identity folder: numeric order, as many as the manifest lists for the identity."""
    counts: dict[str, int] = {}
    for rel in manifest():
        ident = rel.split("/")[0]
        counts[ident] = counts.get(ident, 0) + 1
    by_target = {folder.replace(" ", "_"): folder for folder in source_names}
    missing = sorted(set(counts) - set(by_target))
    if missing:
        raise DatasetError(f"the source has no folder for {_listed('identity(ies)', missing)}")
    out: dict[str, tuple[str, str]] = {}
    for ident, n in sorted(counts.items()):
        folder = by_target[ident]
        numbered = [name for name in source_names[folder] if name.endswith(".png") and name[:-4].isdigit()]
        numbered.sort(key=lambda name: int(name[:-4]))
        if len(numbered) < n:
            raise DatasetError(f"the source folder {folder!r} has {len(numbered)} numbered PNG files; {n} are needed")
        for i, name in enumerate(numbered[:n]):
            out[f"{ident}/{i:04d}.png"] = (folder, name)
    return out


def _from_folder(root: Path) -> tuple[dict[str, list[str]], dict[tuple[str, str], Path]]:
    base = root / SOURCE_FOLDER if (root / SOURCE_FOLDER).is_dir() else root
    names: dict[str, list[str]] = {}
    paths: dict[tuple[str, str], Path] = {}
    for folder in sorted(p for p in base.iterdir() if p.is_dir()):
        names[folder.name] = sorted(p.name for p in folder.iterdir() if p.is_file())
        for name in names[folder.name]:
            paths[(folder.name, name)] = folder / name
    return names, paths


def _tar_members(archive: Path) -> Iterator[tuple[str, str, tarfile.TarInfo]]:
    """(identity folder, file name, member) of the archive's files under the source folder."""
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            parts = member.name.split("/")
            marker = SOURCE_FOLDER.split("/")
            for start in range(len(parts) - len(marker)):
                if parts[start : start + len(marker)] == marker and len(parts) == start + len(marker) + 2:
                    if member.isfile():
                        yield parts[-2], parts[-1], member
                    break


def _read_archive(archive: Path, chosen: set[tuple[str, str]]) -> dict[tuple[str, str], bytes]:
    out: dict[tuple[str, str], bytes] = {}
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            parts = member.name.split("/")
            key = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", "")
            if key in chosen and member.isfile() and SOURCE_FOLDER in member.name:
                handle = tar.extractfile(member)
                if handle is not None:
                    out[key] = handle.read()
    return out


def _download(url: str, into: Path) -> Path:
    target = into / "celeb24-source.tar.gz"
    try:
        with urllib.request.urlopen(url, timeout=60) as response, target.open("wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
    except OSError as exc:
        raise DatasetError(
            f"could not download celeb24's source {url} ({exc}); give a local copy of the archive or a checkout of "
            f"{SOURCE_REPOSITORY} at {SOURCE_COMMIT[:12]} with --source"
        ) from None
    return target


def build(dest: Path, *, source: Path | None = None, url: str = ARCHIVE_URL) -> Path:
    """Make celeb24 at ``dest`` from ``source`` (a checkout of the source repository, its ``celebrity_images``
    folder, or the commit's ``.tar.gz``; default: download ``url``), verifying every file (module docstring).
    A ``dest`` that already exists is verified, not overwritten. Raises :class:`DatasetError` naming what is wrong;
    nothing is left at ``dest`` then."""
    dest = Path(dest)
    if dest.exists():
        problems = verify(dest)
        if problems:
            raise DatasetError(f"{dest} exists and is not celeb24: {'; '.join(problems)}")
        return dest
    expected = manifest()
    with tempfile.TemporaryDirectory(prefix="celeb24-") as tmp:
        if source is not None and Path(source).is_dir():
            names, paths = _from_folder(Path(source))
            todo = plan(names)
            data = {key: paths[key].read_bytes() for key in todo.values()}
        else:
            archive = Path(source) if source is not None else _download(url, Path(tmp))
            if not archive.is_file():
                raise DatasetError(f"celeb24 source {archive} is neither a folder nor an archive file")
            names = {}
            for folder, name, _member in _tar_members(archive):
                names.setdefault(folder, []).append(name)
            todo = plan(names)
            data = _read_archive(archive, set(todo.values()))
        wrong = sorted(
            f"{folder}/{name} (for {rel})" for rel, (folder, name) in todo.items()
            if _sha256(data.get((folder, name), b"")) != expected[rel]
        )  # fmt: skip
        if wrong:
            raise DatasetError(f"celeb24 source: {_listed('file(s) whose SHA-256 is not the manifest', wrong)}")
        staging = dest.parent / f".{dest.name}.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            for rel, key in todo.items():
                target = staging / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data[key])
            problems = verify(staging)
            if problems:
                raise DatasetError("; ".join(problems))
            staging.rename(dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return dest
