"""Any folder of ``root/<identity>/<image>`` is a dataset: scan it into a :class:`Manifest`.

Scanning reads and fully decodes every candidate image once, so that a corrupt, truncated, empty or
mislabelled file is found here, reported as a :class:`Problem` naming its path, and left out, instead of
crashing a benchmark halfway. What counts as a candidate:

- a file inside an identity folder whose extension is one of :data:`IMAGE_EXTENSIONS` (any case);
- names starting with ``.`` (``.DS_Store``, ``.ipynb_checkpoints``, editor swap files) are ignored
  silently, at every level;
- everything else that is visible is a problem: files directly in ``root``, files with another
  extension, folders nested inside an identity folder, special files, and identity folders that end up
  with no usable image.

Identity names are the folder names in Unicode NFC (they may look like ``../x`` or ``<script>``): they are
data, never joined onto output paths by this module, and callers must escape them when they render them. A
folder named in NFD (as macOS file systems store names) is the same identity as its NFC spelling; two folders
whose names differ only in normalisation are refused (:class:`DatasetError`), since they would look alike in
every message and table. Image ids keep the names as they are on disk. Every message and log line that quotes
a path or name passes it through :func:`safe_text`, so control characters in file names (ANSI escapes,
carriage returns, newlines) are shown escaped, never sent to a terminal.

An entry that cannot even be looked at (a symbolic-link loop, a dangling link, a file that cannot be read) is a
:class:`Problem` like any other unusable file, never a reason to refuse the dataset.

Identity display names (a suite's ``dataset.names: FILE``). Datasets often name their folders by id
(VGGFace2's ``n000001``, CelebA's numbers), and a real name may hold characters no folder name can (``/``).
:func:`read_identity_names` reads a UTF-8 CSV file whose header row has the columns ``folder`` and ``name``
(other columns are ignored; blank lines are skipped; a byte-order mark is allowed), one row per renamed
identity folder, and :func:`rename_identities` gives each record of a manifest the name of its folder
(:attr:`ImageRecord.folder`); folders the file does not list keep their folder name. The file is refused,
with a :class:`DatasetError` naming the file, the line and the value, when it is missing or not UTF-8, when
its header lacks a column, and for a row whose folder is empty, listed twice or not an identity folder of
the dataset, or whose name is empty, holds a control character, starts or ends with white space, or is
also the name of another identity folder (renamed or not: two folders never merge into one identity).
Image ids keep the folder (``"<folder>/<file>"``). The names are data exactly as folder names are (a name
such as ``<script>alert(1)</script>`` or ``AC/DC`` is fine): never joined onto paths. Everything keyed by
identity (splits, protected identities, cloak cache keys) sees the names, and :attr:`Manifest.digest`
covers them. The file is read again on every call (it is small); only the scan is cached.

The scan result is cached as JSON under ``<cache>/manifests/``, keyed by a hash of the absolute root and
the sorted ``(relative path, size, mtime_ns)`` of every visible entry, so rescanning an unchanged folder
only lists and stats it. Any change to a file's size or modification time, or any added, removed or
renamed entry, gives a new key and a full rescan. (A change that keeps both size and mtime_ns, which
needs a deliberate ``touch -d``, is not detected; :attr:`Manifest.digest` still describes what was hashed.)
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import itertools
import json
import logging
import os
import stat
import time
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import UnidentifiedImageError

from cloakbench.cache import atomic_path, atomic_write_text, cache_dir
from cloakbench.csv_safe import safe_cell
from cloakbench.errors import DatasetError, ImageContractError
from cloakbench.images import decode_image, load_image, stack_images

if TYPE_CHECKING:
    from cloakbench.datasets.splits import Split

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".pgm", ".bmp", ".webp"})
"""Lower-case file extensions read as images (compared case-insensitively)."""

SCAN_FORMAT = 2
"""Version of the scan rules and of the cached JSON; bump it when either changes (2: identities in NFC, images
decoded by :func:`~cloakbench.images.decode_image`, unreadable links listed as problems)."""

_PROBLEMS_IN_WARNING = 5


@dataclass(frozen=True, kw_only=True)
class ImageRecord:
    """One usable image of a dataset."""

    image_id: str
    """``"<folder>/<filename>"``: the POSIX path relative to the dataset root; unique in a manifest."""
    identity: str
    """The identity's name: its folder name, or the name ``dataset.names`` gives that folder."""
    path: Path
    """Absolute path of the file."""
    sha256: str
    """SHA-256 of the file's bytes, as hashed while scanning."""

    @property
    def folder(self) -> str:
        """The identity folder holding the file (the first part of :attr:`image_id`)."""
        return self.image_id.split("/", 1)[0]


@dataclass(frozen=True, kw_only=True)
class Problem:
    """A visible entry of the dataset folder that was left out, and why."""

    path: Path
    reason: str


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """The usable images of a dataset folder (sorted by ``image_id``) and the problems found in it."""

    root: Path
    records: tuple[ImageRecord, ...]
    problems: tuple[Problem, ...]

    def __post_init__(self) -> None:
        ids = [r.image_id for r in self.records]
        for before, after in itertools.pairwise(ids):
            if not before < after:
                raise DatasetError(
                    f"manifest of {safe_text(self.root)}: records must be sorted by image_id without duplicates "
                    f"({before!r} comes before {after!r})"
                )

    @functools.cached_property
    def identities(self) -> tuple[str, ...]:
        """Sorted names of the identities that have at least one usable image."""
        return tuple(sorted({r.identity for r in self.records}))

    def by_identity(self) -> dict[str, tuple[ImageRecord, ...]]:
        """Records grouped by identity (identities sorted; records in ``image_id`` order)."""
        groups: dict[str, list[ImageRecord]] = {name: [] for name in self.identities}
        for record in self.records:
            groups[record.identity].append(record)
        return {name: tuple(recs) for name, recs in groups.items()}

    @functools.cached_property
    def digest(self) -> str:
        """SHA-256 over the sorted ``(image_id, sha256)`` pairs and the renamed identities: identifies the
        content, not the location.

        Each pair contributes ``image_id`` (UTF-8) + NUL + the hex SHA-256 + newline, in ``image_id``
        order; moving the folder or touching files leaves it unchanged, changing any byte does not. A record
        whose identity is not its folder name in NFC (renamed by ``dataset.names``) adds NUL + its identity as a
        JSON string before the newline, so renaming changes the digest and a manifest without renames keeps the
        digest it always had.
        """
        h = hashlib.sha256()
        for record in self.records:
            renamed = (
                b""
                if record.identity == identity_name(record.folder)
                else b"\0" + json.dumps(record.identity).encode("ascii")
            )
            h.update(_encode(record.image_id) + b"\0" + record.sha256.encode("ascii") + renamed + b"\n")
        return h.hexdigest()

    def write_csv(self, path: Path | str, *, splits: Mapping[str, Split] | None = None) -> None:
        """Write one row per record: ``image_id, identity, path, sha256`` (+ ``split`` when given).

        The file is written atomically. With ``splits`` (from :func:`split_per_identity`) every record
        must have an entry.
        """
        out = Path(path)
        header = ["image_id", "identity", "path", "sha256"]
        if splits is not None:
            missing = [r.image_id for r in self.records if r.image_id not in splits]
            if missing:
                raise DatasetError(
                    f"write_csv {safe_text(out)}: no split for {len(missing)} record(s), e.g. {missing[0]!r}"
                )
            header.append("split")
        rows = [header]
        for r in self.records:
            row = [r.image_id, r.identity, str(r.path), r.sha256]
            if splits is not None:
                row.append(splits[r.image_id].value)
            rows.append(row)
        with (
            atomic_path(out) as tmp,
            tmp.open("w", newline="", encoding="utf-8", errors="surrogateescape") as fh,
        ):
            csv.writer(fh).writerows([safe_cell(c) for c in row] for row in rows)  # no spreadsheet formula


@dataclass(frozen=True, kw_only=True)
class FolderEntry:
    """A file inside an identity folder with an image extension (not yet read)."""

    identity: str
    """The identity folder's name in NFC."""
    path: Path
    rel: str
    """``"<folder>/<file>"`` as on disk (the image id)."""


@dataclass(frozen=True, kw_only=True)
class FolderListing:
    """What listing ``root/<identity>/<file>`` found, before any file is read (shared with alignment)."""

    candidates: tuple[FolderEntry, ...]
    problems: tuple[Problem, ...]
    identities: tuple[str, ...]
    """The NFC name of every identity folder that could be listed, sorted (with or without image files)."""
    folders: tuple[str, ...] = ()
    """The names of those folders as they are on disk, in the order of :attr:`identities`."""
    fingerprint: tuple[tuple[str, int, int], ...]
    """Sorted (relative path, size, mtime_ns) of every visible entry (folders end with ``/``)."""


def safe_text(value: object) -> str:
    """``str(value)`` fit for one line of a message: a backslash, and every character that is not printable
    (control characters such as ESC, CR and LF, bidirectional overrides, undecodable bytes of a file name) are
    shown as Python escapes (``\\x1b``, ``\\r``, ``\\u202e``, ``\\udcff``); everything else as it is."""
    text = str(value)
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode("ascii") for c in text)


def identity_name(folder: str) -> str:
    """The identity name of an identity folder: its name in Unicode NFC."""
    return unicodedata.normalize("NFC", folder)


def _check_normalisation(root: Path, folders: Sequence[str]) -> None:
    """Refuse two identity folders whose names are one name in NFC, in one line showing their code points."""
    seen: dict[str, str] = {}
    for folder in folders:
        first = seen.setdefault(identity_name(folder), folder)
        if first != folder:
            raise DatasetError(
                f"dataset folder {safe_text(root)}: identity folders {first!a} and {folder!a} "
                "differ only in Unicode normalisation (both are "
                f"{identity_name(folder)!a} in NFC); rename or merge one of them"
            )


def _encode(text: str) -> bytes:
    # file names on POSIX are bytes; undecodable ones arrive as lone surrogates and must survive hashing
    return text.encode("utf-8", errors="surrogateescape")


def _visible_entries(folder: Path) -> list[os.DirEntry[str]]:
    with os.scandir(folder) as it:
        return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)


def _is_dir(entry: os.DirEntry[str]) -> bool:
    """Whether ``entry`` is a folder or a link to one; False for a link that loops or leads nowhere."""
    try:
        return entry.is_dir()
    except OSError:  # ELOOP: DirEntry.is_dir() lets only "not found" pass as False
        return False


def list_folder(root: Path) -> FolderListing:
    """List ``root/<identity>/<file>`` by the rules of the module docstring; no file content is read.

    Raises ``OSError`` when ``root`` itself cannot be listed and :class:`DatasetError` when two identity folders
    differ only in Unicode normalisation.
    """
    candidates: list[FolderEntry] = []
    problems: list[Problem] = []
    identities: list[tuple[str, str]] = []  # (NFC name, name on disk)
    fingerprint: list[tuple[str, int, int]] = []
    tops = _visible_entries(root)
    _check_normalisation(root, [top.name for top in tops if _is_dir(top)])
    for top in tops:
        path = root / top.name
        if not _is_dir(top):
            try:
                st = top.stat()
                fingerprint.append((top.name, st.st_size, st.st_mtime_ns))
            except OSError as exc:  # a dangling symbolic link, a link loop
                fingerprint.append((top.name, -2, -2))
                problems.append(Problem(path=path, reason=f"cannot read: {exc.strerror or exc}"))
                continue
            problems.append(Problem(path=path, reason="file outside an identity folder"))
            continue
        folder = top.name
        identity = identity_name(folder)
        fingerprint.append((folder + "/", -1, -1))
        try:
            entries = _visible_entries(path)
        except OSError as exc:
            problems.append(Problem(path=path, reason=f"cannot list folder: {exc.strerror or exc}"))
            continue
        identities.append((identity, folder))
        for entry in entries:
            file_path = path / entry.name
            rel = f"{folder}/{entry.name}"
            if _is_dir(entry):
                fingerprint.append((rel + "/", -1, -1))
                problems.append(Problem(path=file_path, reason="folder inside an identity folder (not scanned)"))
                continue
            try:
                st = entry.stat()
            except OSError as exc:  # e.g. a dangling symbolic link
                fingerprint.append((rel, -2, -2))
                problems.append(Problem(path=file_path, reason=f"cannot read: {exc.strerror or exc}"))
                continue
            fingerprint.append((rel, st.st_size, st.st_mtime_ns))
            if not stat.S_ISREG(st.st_mode):
                problems.append(Problem(path=file_path, reason="not a regular file"))
                continue
            suffix = Path(entry.name).suffix
            if suffix.lower() not in IMAGE_EXTENSIONS:
                what = f"({suffix})" if suffix else "(no extension)"
                problems.append(Problem(path=file_path, reason=f"not an image file {what}"))
                continue
            candidates.append(FolderEntry(identity=identity, path=file_path, rel=rel))
    return FolderListing(
        candidates=tuple(candidates),
        problems=tuple(problems),
        identities=tuple(name for name, _ in sorted(identities)),
        folders=tuple(folder for _, folder in sorted(identities)),
        fingerprint=tuple(sorted(fingerprint)),
    )


def _check_file(path: Path) -> tuple[str | None, str]:
    """Read and fully decode one file: ``(sha256, "")`` when usable, ``(None, reason)`` when not."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, f"cannot read: {exc.strerror or exc}"
    if not data:
        return None, "empty file"
    digest = hashlib.sha256(data).hexdigest()
    try:
        decode_image(data)  # exactly what loading will do, so a file that passes here loads later
    except UnidentifiedImageError:
        return None, "cannot decode: not a recognised image format"
    except Exception as exc:  # any decoder failure on untrusted bytes is a problem, never a crash
        return None, f"cannot decode: {exc}"
    return digest, ""


def _cache_key(root: Path, walk: FolderListing) -> str:
    payload = json.dumps(
        {"format": SCAN_FORMAT, "root": str(root), "entries": walk.fingerprint},
        ensure_ascii=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("ascii")).hexdigest()


def _to_json(manifest: Manifest) -> str:
    root = manifest.root
    doc = {
        "format": SCAN_FORMAT,
        "root": str(root),
        "records": [[r.image_id, r.identity, r.sha256] for r in manifest.records],
        "problems": [[p.path.relative_to(root).as_posix(), p.reason] for p in manifest.problems],
    }
    return json.dumps(doc, ensure_ascii=True, indent=0)


def _from_json(text: str, root: Path) -> Manifest | None:
    """The cached manifest, or None when the text is not a valid cache entry for ``root``."""
    try:
        doc: Any = json.loads(text)
        if doc["format"] != SCAN_FORMAT or doc["root"] != str(root):
            return None
        records = tuple(
            ImageRecord(image_id=str(i), identity=str(n), path=root / str(i), sha256=str(s))
            for i, n, s in doc["records"]
        )
        problems = tuple(Problem(path=root / str(p), reason=str(r)) for p, r in doc["problems"])
        return Manifest(root=root, records=records, problems=problems)
    except (ValueError, KeyError, TypeError, DatasetError):
        return None


def _warn_problems(manifest: Manifest) -> None:
    if not manifest.problems:
        return
    shown = "; ".join(
        f"{safe_text(p.path.relative_to(manifest.root).as_posix())}: {safe_text(p.reason)}"
        for p in manifest.problems[:_PROBLEMS_IN_WARNING]
    )
    more = len(manifest.problems) - _PROBLEMS_IN_WARNING
    log.warning(
        "%s: %d problem(s), left out of the dataset: %s%s",
        safe_text(manifest.root),
        len(manifest.problems),
        shown,
        f" (and {more} more; see Manifest.problems)" if more > 0 else "",
    )


def resolve_root(root: Path | str) -> Path:
    """``root`` made absolute; :class:`DatasetError` naming it when it is missing or not a folder."""
    path = Path(root).expanduser()
    if not path.exists():
        raise DatasetError(f"dataset folder {safe_text(path)} does not exist")
    if not path.is_dir():
        raise DatasetError(f"dataset folder {safe_text(path)} is not a directory")
    return path.resolve()


def scan_folder(root: Path | str) -> Manifest:
    """Scan ``root/<identity>/<image>`` into a :class:`Manifest` (cached; see the module docstring).

    Raises :class:`DatasetError` naming the path when ``root`` does not exist, is not a directory or
    holds no usable image at all. Every other defect is a :class:`Problem` in the result, and a warning
    summarising them is logged.
    """
    start = time.perf_counter()
    resolved = resolve_root(root)
    try:
        walk = list_folder(resolved)
    except OSError as exc:
        raise DatasetError(f"dataset folder {safe_text(resolved)} cannot be listed: {safe_text(exc)}") from exc
    try:
        cache_file: Path | None = cache_dir("manifests") / f"{_cache_key(resolved, walk)}.json"
    except OSError as exc:  # an unwritable cache slows scanning down; it never stops it
        log.warning("manifest cache unavailable (%s); scanning %s without it", safe_text(exc), safe_text(resolved))
        cache_file = None
    manifest: Manifest | None = None
    if cache_file is not None and cache_file.is_file():
        try:
            manifest = _from_json(cache_file.read_text(encoding="utf-8"), resolved)
        except OSError:
            manifest = None
        if manifest is None:
            log.warning("%s: unreadable manifest cache entry, scanning again", safe_text(cache_file))
    from_cache = manifest is not None
    if manifest is None:
        manifest = _scan(resolved, walk)
    if not from_cache and cache_file is not None:
        try:
            atomic_write_text(cache_file, _to_json(manifest))
        except OSError as exc:
            log.warning(
                "could not cache the manifest of %s at %s: %s",
                safe_text(resolved),
                safe_text(cache_file),
                safe_text(exc),
            )
    if not manifest.records:
        raise DatasetError(
            f"dataset folder {safe_text(resolved)} has no usable image (expected root/<identity>/<image> with "
            f"extensions {', '.join(sorted(IMAGE_EXTENSIONS))}; {len(manifest.problems)} problem(s) found)"
        )
    _warn_problems(manifest)
    log.info(
        "scanned %s: %d images of %d identities, %d problem(s) in %.3f s%s",
        safe_text(resolved),
        len(manifest.records),
        len(manifest.identities),
        len(manifest.problems),
        time.perf_counter() - start,
        " (from cache)" if from_cache else "",
    )
    return manifest


def _scan(root: Path, walk: FolderListing) -> Manifest:
    records: list[ImageRecord] = []
    problems = list(walk.problems)
    folders = dict(zip(walk.identities, walk.folders, strict=True))
    for cand in walk.candidates:
        digest, reason = _check_file(cand.path)
        if digest is None:
            problems.append(Problem(path=cand.path, reason=reason))
            continue
        records.append(ImageRecord(image_id=cand.rel, identity=cand.identity, path=cand.path, sha256=digest))
    with_images = {r.identity for r in records}
    for name in walk.identities:
        if name in with_images:
            continue
        problems.append(Problem(path=root / folders[name], reason="identity folder has no usable images"))
    records.sort(key=lambda r: r.image_id)
    problems.sort(key=lambda p: p.path.relative_to(root).as_posix())
    return Manifest(root=root, records=tuple(records), problems=tuple(problems))


NAMES_COLUMNS = ("folder", "name")
"""The columns a ``dataset.names`` file's header row must have (in any order, among others)."""


def identity_folders(root: Path | str) -> tuple[str, ...]:
    """The visible folders directly in ``root`` (its identity folders), sorted; no file is read.

    Raises ``OSError`` when ``root`` cannot be listed.
    """
    return tuple(e.name for e in _visible_entries(Path(root)) if _is_dir(e))


def read_identity_names(path: Path | str, root: Path | str) -> dict[str, str]:
    """Read a ``dataset.names`` CSV file: identity folder name -> identity name, for the dataset at ``root``.

    Folders and names are compared and returned in Unicode NFC (:func:`identity_name`), as identities are named,
    so a file written on another system finds its folders. See the module docstring for the format and what is
    refused; every refusal is a one-line
    :class:`DatasetError` naming ``path``, the line and the value. Only the folder names of ``root`` are
    listed; no image is read.
    """
    file = Path(path)
    shown = safe_text(file)
    if not file.is_file():
        raise DatasetError(f"{shown}: identity names file {'is not a file' if file.exists() else 'not found'}")
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{shown}: cannot read identity names: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DatasetError(f"{shown}: line {line}: not UTF-8 text (byte {data[exc.start]:#04x})") from None
    try:
        folders = frozenset(identity_name(f) for f in identity_folders(root))
    except OSError as exc:
        raise DatasetError(f"dataset folder {safe_text(root)} cannot be listed: {safe_text(exc)}") from None
    rows = [(line, identity_name(folder), identity_name(name)) for line, folder, name in _names_rows(file, text)]
    names: dict[str, str] = {}
    line_of: dict[str, int] = {}  # folder -> its row's line
    owner: dict[str, str] = {}  # name -> the folder given it
    for line, folder, name in rows:
        where = f"{shown}: line {line}"
        if not folder:
            raise DatasetError(f"{where}: empty folder")
        if folder in line_of:
            raise DatasetError(f"{where}: folder {folder!r} is listed again (first on line {line_of[folder]})")
        if folder not in folders:
            raise DatasetError(f"{where}: folder {folder!r} is not an identity folder in {safe_text(root)}")
        if not name.strip():
            raise DatasetError(f"{where}: empty name for folder {folder!r}")
        if any(unicodedata.category(c) == "Cc" for c in name):
            raise DatasetError(f"{where}: name {name!r} of folder {folder!r} holds a control character")
        if name != name.strip():
            raise DatasetError(f"{where}: name {name!r} of folder {folder!r} starts or ends with white space")
        if name in owner:
            other = owner[name]
            raise DatasetError(
                f"{where}: name {name!r} of folder {folder!r} is also the name of folder {other!r} "
                f"(line {line_of[other]})"
            )
        names[folder], line_of[folder], owner[name] = name, line, folder
    for folder, name in names.items():
        if name != folder and name in folders and name not in names:
            raise DatasetError(
                f"{shown}: line {line_of[folder]}: name {name!r} of folder {folder!r} is also the name of "
                f"identity folder {name!r}, which this file does not rename"
            )
    return names


def _names_rows(file: Path, text: str) -> list[tuple[int, str, str]]:
    """``(line, folder, name)`` of every data row of a names file (header checked; blank lines skipped)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[tuple[int, str, str]] = []
    columns: dict[str, int] | None = None
    while True:
        line = reader.line_num + 1  # where the next row starts (a quoted field may span lines)
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DatasetError(f"{safe_text(file)}: line {line}: not valid CSV: {exc}") from None
        if not row or not any(cell.strip() for cell in row):
            continue
        if columns is None:
            header = [cell.strip().lower() for cell in row]
            shown = ",".join(row)
            missing = [c for c in NAMES_COLUMNS if c not in header]
            if missing:
                raise DatasetError(
                    f"{safe_text(file)}: line {line}: header row {shown!r} "
                    f"lacks column{'s' if len(missing) > 1 else ''} "
                    f"{', '.join(map(repr, missing))} (expected a header row 'folder,name'; other columns are ignored)"
                )
            repeated = [c for c in NAMES_COLUMNS if header.count(c) > 1]
            if repeated:
                raise DatasetError(
                    f"{safe_text(file)}: line {line}: header row {shown!r} has column {repeated[0]!r} twice"
                )
            columns = {c: header.index(c) for c in NAMES_COLUMNS}
            continue
        cells = [row[columns[c]] if columns[c] < len(row) else "" for c in NAMES_COLUMNS]
        rows.append((line, cells[0], cells[1]))
    if columns is None:
        raise DatasetError(f"{safe_text(file)}: no header row (expected a header row 'folder,name')")
    return rows


def rename_identities(manifest: Manifest, names: Mapping[str, str]) -> Manifest:
    """``manifest`` with each record's identity set to the name ``names`` gives its folder (unlisted folders
    keep their folder name, in NFC); ``names`` comes from :func:`read_identity_names` (keys in NFC). Image ids,
    paths and problems are unchanged; :attr:`Manifest.digest` changes with the names.

    Raises :class:`DatasetError` when two folders of the manifest would get one name.
    """
    records = tuple(
        replace(r, identity=names.get(identity_name(r.folder), identity_name(r.folder))) for r in manifest.records
    )
    folder_of: dict[str, str] = {}
    for record in records:
        first = folder_of.setdefault(record.identity, record.folder)
        if first != record.folder:
            raise DatasetError(
                f"manifest of {safe_text(manifest.root)}: folders {first!r} and {record.folder!r} would both be "
                f"identity {record.identity!r}"
            )
    return Manifest(root=manifest.root, records=records, problems=manifest.problems)


def load_images(records: Sequence[ImageRecord]) -> torch.Tensor:
    """Load records as one canonical float32 ``[B, 3, H, W]`` RGB batch in [0, 1].

    All images must have one size (aligned faces do); otherwise :class:`ImageContractError` names the
    first file whose size differs from the first record's. A file that can no longer be read raises
    :class:`DatasetError` naming it.
    """
    arrays: list[np.ndarray] = []
    for record in records:
        try:
            array = load_image(record.path)
        except (OSError, SyntaxError, ValueError) as exc:
            raise DatasetError(f"{safe_text(record.path)}: cannot load image: {safe_text(exc)}") from exc
        if arrays and array.shape != arrays[0].shape:
            h0, w0 = arrays[0].shape[:2]
            h, w = array.shape[:2]
            raise ImageContractError(
                f"{safe_text(record.path)}: image is {w}x{h}, but {safe_text(records[0].path)} is {w0}x{h0}; "
                "a batch needs one size (align the faces first)"
            )
        arrays.append(array)
    return stack_images(arrays, what="load_images")
