"""Plug-ins: defenses, recognizers, transforms and adaptations from outside cloakbench.

Two ways in (``docs/plugins.md`` is the author's guide):

- **Installed plug-ins** declare entry points in one of the groups of
  :data:`~cloakbench.registry.ENTRY_POINT_GROUPS` (``cloakbench.defenses``, ``cloakbench.recognizers``,
  ``cloakbench.transforms``, ``cloakbench.adaptations``). An entry point names a callable that receives the
  group's registry (``my_pkg:register_defenses``, called as ``register_defenses(registry)``) and registers into
  it; an entry point that names a module (``my_pkg.defenses``) is imported, and its import registers. They are
  loaded by :func:`load_entry_points` the first time their registry is read, after the built-in entries; their
  entries' origin is ``entry point <dist-name> <version>``. ``CLOAKBENCH_DISABLE_PLUGINS=1`` skips them all.
- **Suite plug-ins**: a suite's ``plugins:`` key lists files (``my_cloak.py``, relative to the suite file) and
  modules (``my_pkg.cloaks``, importable from ``sys.path``) whose import registers components. They are loaded
  (:func:`load_plugins`) before the suite's names are checked, and each is recorded in the suite as a
  :class:`PluginRef` with the SHA-256 of its source (a file's bytes; a module's file; a package's ``.py`` files),
  so the suite's digest changes with the plug-in's code and a run refuses to resume into rows made by other code.

Every failure is a :class:`PluginError` (a :class:`~cloakbench.errors.ConfigError`: exit 2, before any work)
naming the plug-in: a missing file or module, an import that raises (its exception on one line, with the
plug-in's line), a name that clashes with an entry already registered (the error says by whom). A plug-in that
fails registers nothing (what it registered before failing is removed). Loading the same plug-in again in one
process is a no-op; loading it after its source changed replaces what it registered (notebooks, tests).

A suite plug-in is code: loading a suite that names one runs it, as running a Python script would.
"""

from __future__ import annotations

import enum
import hashlib
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import sys
import threading
import traceback
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloakbench.config import quote
from cloakbench.errors import ConfigError, RegistryError
from cloakbench.registry import (
    Origin,
    OriginKind,
    Registry,
    registering_as,
    registries,
    remove_origin,
)

__all__ = [
    "ENV_DISABLE",
    "LoadedPlugin",
    "PluginError",
    "PluginKind",
    "PluginRef",
    "forget",
    "load_entry_points",
    "load_plugin",
    "load_plugins",
    "loaded_plugins",
]

log = logging.getLogger(__name__)

ENV_DISABLE = "CLOAKBENCH_DISABLE_PLUGINS"
"""Set to ``1`` (or ``true``/``yes``) to load no installed (entry-point) plug-in; suite plug-ins still load."""

_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_LINE = 300  # the most characters of an exception's message an error repeats


class PluginError(ConfigError):
    """A plug-in is missing, fails to import, or registers a name that is already taken."""


class PluginKind(enum.Enum):
    FILE = "file"  # a Python file, executed as a module of its own
    MODULE = "module"  # an importable module or package, imported by its dotted name


@dataclass(frozen=True, kw_only=True)
class PluginRef:
    """A suite plug-in as the suite records it (``to_dict`` writes these three keys; a suite may give them)."""

    source: str
    """A file plug-in's resolved absolute path, or a module plug-in's dotted name."""
    kind: PluginKind
    sha256: str
    """SHA-256 of the plug-in's source: a file's (or a single-file module's) bytes, as ``sha256sum`` prints it;
    for a package, of its ``.py`` files' relative names and bytes."""

    @property
    def origin(self) -> Origin:
        kind = OriginKind.PLUGIN_FILE if self.kind is PluginKind.FILE else OriginKind.PLUGIN_MODULE
        return Origin(kind, self.source)


@dataclass(frozen=True, kw_only=True)
class LoadedPlugin:
    """A plug-in loaded in this process and what it registered (``cloakbench list plugins``)."""

    origin: Origin
    version: str  # an installed plug-in's distribution version, or a suite plug-in's SHA-256
    registered: tuple[tuple[str, str], ...]  # (kind, name)


_LOCK = threading.RLock()
_SUITE_LOADED: dict[tuple[PluginKind, str], str] = {}  # (kind, source) -> sha256 of the source that was loaded
_ENTRY_POINTS_LOADED: dict[Origin, str] = {}  # origin -> distribution version


def _disabled() -> bool:
    return os.environ.get(ENV_DISABLE, "").strip().lower() in ("1", "true", "yes", "on")


def _one_line(exc: BaseException, path: Path | None = None) -> str:
    """``Type: first line of the message`` (and the plug-in file's line where it was raised)."""
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    if path is not None and not isinstance(exc, SyntaxError):  # a SyntaxError's message has the line already
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == str(path)]
        if frames:
            line += f" ({path.name}, line {frames[-1].lineno})"
    return line if len(line) <= _LINE else line[: _LINE - 3] + "..."


# ----------------------------------------------------------------------------------------------------------------
# installed plug-ins (entry points)


def _distribution(ep: importlib.metadata.EntryPoint) -> tuple[str, str]:
    dist = ep.dist
    if dist is None:
        return "an unknown distribution", ""
    return str(dist.metadata["Name"] or dist.name), str(dist.version)


def load_entry_points(registry: Registry[Any]) -> None:
    """Load the entry points of ``registry``'s group into it (the registry calls this on its first read).

    Entry points are loaded in the order of their distribution's name, then their own. If one fails, every
    entry this call registered is removed again and :class:`PluginError` names the distribution and the entry
    point; the registry's next read tries again."""
    group = registry.group
    if group is None or _disabled():
        return
    eps = sorted(importlib.metadata.entry_points(group=group), key=lambda e: (_distribution(e)[0].lower(), e.name))
    done: list[Origin] = []
    for ep in eps:
        dist, version = _distribution(ep)
        origin = Origin(OriginKind.ENTRY_POINT, f"{dist} {version}".strip(), detail=f"{group}: {ep.name} = {ep.value}")
        what = f"installed plug-in {dist} {version} (entry point {ep.name!r} = {ep.value!r} in group {group!r})"
        try:
            with registering_as(origin):
                target = ep.load()
                if not isinstance(target, types.ModuleType):
                    if not callable(target):
                        raise TypeError(f"{ep.value} is a {type(target).__name__}, not a callable or a module")
                    target(registry)
        except Exception as exc:
            for o in [*done, origin]:
                remove_origin(o)
                _ENTRY_POINTS_LOADED.pop(o, None)
            hint = f"set {ENV_DISABLE}=1 to run without installed plug-ins, or uninstall {dist}"
            if isinstance(exc, RegistryError):
                raise PluginError(f"{what}: {exc}; {hint}") from exc
            raise PluginError(f"{what} cannot be loaded: {_one_line(exc)}; {hint}") from exc
        done.append(origin)
        _ENTRY_POINTS_LOADED[origin] = version
        log.debug("loaded %s", what)


# ----------------------------------------------------------------------------------------------------------------
# suite plug-ins (files and modules)


def _parse_item(item: Any, where: str) -> tuple[str, PluginKind, str | None]:
    """(source as given, kind, pinned sha256 or None) of one ``plugins:`` item."""
    if isinstance(item, PluginRef):
        return item.source, item.kind, item.sha256
    pin: str | None = None
    kind: PluginKind | None = None
    if isinstance(item, Mapping):
        unknown = sorted(str(k) for k in item if k not in ("source", "kind", "sha256"))
        if unknown:
            raise PluginError(
                f"{where}: unknown key(s) {', '.join(map(quote, unknown))} (allowed: kind, sha256, source)"
            )
        if "source" not in item:
            raise PluginError(f"{where}: missing required key 'source' (a plug-in file or module)")
        if "kind" in item:
            try:
                kind = PluginKind(item["kind"])
            except ValueError:
                raise PluginError(f"{where}.kind: {quote(item['kind'])} is not one of 'file', 'module'") from None
        pin = item.get("sha256")
        if pin is not None and (not isinstance(pin, str) or not _SHA256.fullmatch(pin)):
            raise PluginError(f"{where}.sha256: expected 64 lowercase hex digits, got {quote(pin)}")
        item = item["source"]
    if not isinstance(item, str) or not item.strip() or "\0" in item:
        raise PluginError(
            f"{where}: expected a plug-in file (ending in .py) or a module name, got {type(item).__name__} "
            f"{quote(item)}"
        )
    if kind is None:
        kind = PluginKind.FILE if item.endswith(".py") or "/" in item or os.sep in item else PluginKind.MODULE
    if kind is PluginKind.FILE and not item.endswith(".py"):
        raise PluginError(f"{where}: a plug-in file is a Python file ending in .py, got {quote(item)}")
    if kind is PluginKind.MODULE and not _MODULE_NAME.fullmatch(item):
        raise PluginError(
            f"{where}: {quote(item)} is neither a plug-in file (ending in .py) nor a module name (dotted identifiers)"
        )
    return item, kind, pin


def _sha256_files(files: Sequence[Path], root: Path | None) -> str:
    if len(files) == 1 and root is None:
        return hashlib.sha256(files[0].read_bytes()).hexdigest()
    h = hashlib.sha256()
    for path in files:
        label = path.relative_to(root).as_posix() if root is not None else path.name
        h.update(label.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _module_digest(name: str, shown: str) -> str:
    """SHA-256 of a module's source without importing it (a package's parents are imported to find it)."""
    try:
        spec = importlib.util.find_spec(name)
    except Exception as exc:  # a parent package that fails to import, or is not a package
        raise PluginError(f"{shown}: cannot be imported: {_one_line(exc)}") from exc
    if spec is None:
        raise PluginError(
            f"{shown}: no module named {name!r} (a plug-in module must be importable: installed, or on PYTHONPATH; "
            "a plug-in file is a path ending in .py)"
        )
    locations = list(spec.submodule_search_locations or [])
    try:
        if locations:  # a package: every .py file under it
            files = sorted(p for loc in locations for p in Path(loc).rglob("*.py"))
            root = Path(os.path.commonpath([str(Path(loc)) for loc in locations]))
            return _sha256_files(files, root)
        if spec.origin and Path(spec.origin).is_file():
            return _sha256_files([Path(spec.origin)], None)
    except OSError as exc:
        raise PluginError(f"{shown}: its source cannot be read: {exc}") from exc
    raise PluginError(f"{shown}: module {name!r} has no source file to pin ({spec.origin or 'built in'})")


def _file_module_name(path: Path) -> str:
    stem = re.sub(r"\W", "_", path.stem) or "plugin"
    return f"cloakbench_plugin_{stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:10]}"


def _exec_file(path: Path) -> None:
    name = _file_module_name(path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses, pickling and inspect.getsource find the module by its name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise


def _import_module(name: str, *, reload: bool) -> None:
    if reload and name in sys.modules:
        importlib.reload(sys.modules[name])
    else:
        importlib.import_module(name)


def load_plugin(
    item: str | Mapping[str, Any] | PluginRef, *, base: Path | None = None, where: str = "plugin"
) -> PluginRef:
    """Load one suite plug-in (a ``plugins:`` item: a file path, relative to ``base``, a module name, or a
    mapping ``{source, kind, sha256}``; a given ``sha256`` must match the source) and return its record.

    Loading a plug-in already loaded with the same source is a no-op; after its source changed, what it
    registered is removed and it is loaded again. Errors are :class:`PluginError` starting with ``where``."""
    source, kind, pin = _parse_item(item, where)
    shown = f"{where} ({source})"
    if kind is PluginKind.FILE:
        path = Path(source).expanduser()
        if not path.is_absolute():
            path = (base if base is not None else Path.cwd()) / path
        path = path.resolve()
        if not path.is_file():
            problem = "is not a file" if path.exists() else "not found"
            raise PluginError(f"{shown}: plug-in file {path} {problem} (a relative path is relative to the suite file)")
        try:
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as exc:
            raise PluginError(f"{shown}: plug-in file {path} cannot be read: {exc.strerror or exc}") from None
        ref = PluginRef(source=str(path), kind=kind, sha256=sha)
    else:
        ref = PluginRef(source=source, kind=kind, sha256=_module_digest(source, shown))
    if pin is not None and pin != ref.sha256:
        raise PluginError(
            f"{shown}: its source has SHA-256 {ref.sha256}, but {pin} is pinned (the plug-in changed since the suite "
            "was written)"
        )
    key = (ref.kind, ref.source)
    with _LOCK:
        before = _SUITE_LOADED.get(key)
        if before == ref.sha256:
            return ref
        origin = ref.origin
        if before is not None:  # the source changed since it was loaded: forget what the old code registered
            remove_origin(origin)
            del _SUITE_LOADED[key]
        try:
            with registering_as(origin):
                if ref.kind is PluginKind.FILE:
                    _exec_file(Path(ref.source))
                else:
                    _import_module(ref.source, reload=before is not None)
        except RegistryError as exc:
            remove_origin(origin)
            raise PluginError(f"{shown}: {exc}; give it another name") from exc
        except Exception as exc:
            remove_origin(origin)
            where_in = Path(ref.source) if ref.kind is PluginKind.FILE else None
            raise PluginError(f"{shown}: cannot be imported: {_one_line(exc, where_in)}") from exc
        _SUITE_LOADED[key] = ref.sha256
    registered = [f"{kind_} {name}" for kind_, name in _registered_by(origin)]
    log.info("loaded plug-in %s (sha256 %s): %s", ref.source, ref.sha256[:12], ", ".join(registered) or "nothing")
    return ref


def load_plugins(items: Any, *, base: Path | None = None, where: str = "plugins") -> tuple[PluginRef, ...]:
    """Load a suite's ``plugins:`` list in order (see :func:`load_plugin`); the same plug-in twice is an error."""
    if isinstance(items, (str, Mapping)) or not isinstance(items, (list, tuple)):
        raise PluginError(
            f"{where}: expected a list of plug-in files (.py, relative to the suite file) or module names, got "
            f"{type(items).__name__} {quote(items)}"
        )
    refs: list[PluginRef] = []
    for i, item in enumerate(items):
        ref = load_plugin(item, base=base, where=f"{where}[{i}]")
        for j, other in enumerate(refs):
            if (other.kind, other.source) == (ref.kind, ref.source):
                raise PluginError(f"{where}[{i}]: {quote(ref.source)} repeats {where}[{j}]")
        refs.append(ref)
    return tuple(refs)


def _registered_by(origin: Origin) -> list[tuple[str, str]]:
    return sorted((r.kind, e.name) for r in registries() for e in _entries(r) if e.origin == origin)


def _entries(registry: Registry[Any]) -> Iterable[Any]:
    return list(registry._entries.values())  # no read hook: listing must not load plug-ins by itself


def loaded_plugins() -> list[LoadedPlugin]:
    """Every plug-in loaded in this process, installed ones first, and the entries each registered."""
    out = [
        LoadedPlugin(origin=o, version=v, registered=tuple(_registered_by(o)))
        for o, v in sorted(_ENTRY_POINTS_LOADED.items(), key=lambda kv: (kv[0].source, kv[0].detail))
    ]
    for (kind, source), sha in sorted(_SUITE_LOADED.items(), key=lambda kv: (kv[0][0].value, kv[0][1])):
        origin = PluginRef(source=source, kind=kind, sha256=sha).origin
        out.append(LoadedPlugin(origin=origin, version=sha, registered=tuple(_registered_by(origin))))
    return out


def forget(ref: PluginRef) -> list[tuple[str, str]]:
    """Remove what a suite plug-in registered and mark it unloaded, its module too, so that loading it again
    imports it again (tests; a notebook starting over)."""
    with _LOCK:
        _SUITE_LOADED.pop((ref.kind, ref.source), None)
        name = _file_module_name(Path(ref.source)) if ref.kind is PluginKind.FILE else ref.source
        sys.modules.pop(name, None)
        return remove_origin(ref.origin)
