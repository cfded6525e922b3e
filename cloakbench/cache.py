"""Where cloakbench keeps fetched weights, converted models, aligned faces and other derived files.

The root is ``$CLOAKBENCH_CACHE`` when set, else ``$XDG_CACHE_HOME/cloakbench``, else
``~/.cache/cloakbench``. Every write is atomic (a unique temporary file renamed into place), so a killed
process or two processes racing never leave a half-written file under a final name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

ENV_CACHE = "CLOAKBENCH_CACHE"


def cache_root() -> Path:
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "cloakbench").resolve()


def cache_dir(*parts: str) -> Path:
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it; put back at once (module import is single-threaded)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_read_umask()


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success it is renamed onto ``final``. The file gets the mode a
    plain ``open(..., "w")`` would give it (mkstemp's 0600 would hide reports and run folders from other users)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.fchmod(fd, _FILE_MODE)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def touch(path: Path) -> None:
    """Set ``path``'s modification time to now: a cache hit is a use (see :mod:`cloakbench.cache_admin`).

    Best effort: a read-only cache still serves its entries.
    """
    with contextlib.suppress(OSError):
        os.utime(path)


def atomic_write_bytes(final: Path, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(final: Path, text: str) -> None:
    atomic_write_bytes(final, text.encode("utf-8"))


MODEL_DIRS = ("downloads", "files", "converted", "datasets", "manifests")  # fetched or derived from fetched files


def overlay_cache(root: Path, *, source: Path | None = None, replace: dict[str, bytes] | None = None) -> Path:
    """Make ``root`` a cache root whose model files and datasets are ``source``'s (symlinked: nothing is fetched
    again) and whose artifacts and checkpoints start empty, so a run there computes every cloak, embedding and
    retrained model itself (cold-artifact timings, resume and executor comparisons).

    ``replace``: file names under ``converted/`` whose content differs in this cache only (a corrupt model file
    for fault-injection checks); the source's files are never written."""
    source = source if source is not None else cache_root()
    root.mkdir(parents=True, exist_ok=True)
    for name in MODEL_DIRS:
        if not (source / name).exists():
            continue
        if name == "converted" and replace:
            (root / name).mkdir(exist_ok=True)
            for f in (source / name).iterdir():
                target = root / name / f.name
                if f.name in replace:
                    target.write_bytes(replace[f.name])
                else:
                    target.symlink_to(f)
        else:
            (root / name).symlink_to(source / name)
    return root
