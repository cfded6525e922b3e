"""One registry per kind of component (defenses, recognizers, transforms, ...).

An entry is a name bound to a factory, default keyword arguments (so presets such as ``fawkes-high``
are registered names bound to config values, not if/elif chains) and metadata (paper, year, venue,
licence and origin of weights). Registering a name twice is an error; asking for an unknown name is an
error that lists the close matches.

Every entry records its :class:`Origin`: built into cloakbench, registered by an installed plug-in (an entry
point of :data:`ENTRY_POINT_GROUPS`), by a suite's plug-in file or module, or by other code at run time.
The four plug-in kinds (defense, recognizer, transform, adaptation) load their group's entry points the first
time the registry is read (:meth:`Registry.get`, ``list``, ``in``, iteration), after every built-in entry has
been registered, so a plug-in can neither take a built-in name nor be missed by a lookup; the loading itself is
:func:`cloakbench.plugins.load_entry_points` (see ``docs/plugins.md``).
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import enum
import fnmatch
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from cloakbench.errors import RegistryError

T = TypeVar("T")

ENTRY_POINT_GROUPS: Mapping[str, str] = MappingProxyType(
    {
        "defense": "cloakbench.defenses",
        "recognizer": "cloakbench.recognizers",
        "transform": "cloakbench.transforms",
        "adaptation": "cloakbench.adaptations",
    }
)
"""Registry kind -> the entry-point group whose plug-ins register into it."""


class OriginKind(enum.Enum):
    BUILTIN = "built-in"
    ENTRY_POINT = "entry point"  # an installed distribution's entry point (source: "dist-name x.y")
    PLUGIN_FILE = "plug-in file"  # a suite's ``plugins:`` file (source: its resolved path)
    PLUGIN_MODULE = "plug-in module"  # a suite's ``plugins:`` module (source: its dotted name)
    RUNTIME = "runtime"  # code outside cloakbench and outside any plug-in loader (source: that code's module)


@dataclass(frozen=True)
class Origin:
    """Where an entry came from (shown by ``cloakbench list``)."""

    kind: OriginKind
    source: str = ""
    detail: str = ""  # an entry point: 'group: name = module:attr' (two entry points of one distribution differ)

    def __str__(self) -> str:
        return f"{self.kind.value} {self.source}".rstrip()


BUILTIN = Origin(OriginKind.BUILTIN)

_REGISTERING: contextvars.ContextVar[Origin | None] = contextvars.ContextVar("cloakbench_registering", default=None)


@contextlib.contextmanager
def registering_as(origin: Origin) -> Iterator[None]:
    """Every entry registered inside this block (by a plug-in being loaded) records ``origin``."""
    token = _REGISTERING.set(origin)
    try:
        yield
    finally:
        _REGISTERING.reset(token)


def current_origin() -> Origin | None:
    """The origin of the plug-in being loaded right now (None outside any plug-in loader)."""
    return _REGISTERING.get()


def caller_origin(depth: int = 1) -> Origin:
    """The origin of a registration made by the function ``depth`` frames above the caller: built-in for
    cloakbench's own modules (also when a plug-in being loaded imports one of them for the first time, which
    registers its built-in entries), else the plug-in being loaded, else runtime (with the module's name)."""
    module = str(sys._getframe(depth + 1).f_globals.get("__name__", "?"))
    if module == "cloakbench" or module.startswith("cloakbench."):
        return BUILTIN
    loading = _REGISTERING.get()
    return loading if loading is not None else Origin(OriginKind.RUNTIME, module)


@dataclass(frozen=True, kw_only=True)
class EntryMeta:
    """Facts a user needs to cite and trust an entry."""

    summary: str
    paper: str = ""
    year: int | None = None
    venue: str = ""
    license: str = ""
    weights_origin: str = ""
    tags: tuple[str, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)
    """Kind-specific facts shown by ``cloakbench list`` without building the component (input spec, ...)."""
    is_cached: Callable[[], bool] | None = None
    """Whether the entry's weights are already in the local cache (None: it has no weights to fetch)."""


@dataclass(frozen=True, kw_only=True)
class NoParams:
    """The config of components that take no parameters."""


@dataclass(frozen=True, kw_only=True)
class Entry(Generic[T]):
    name: str
    factory: Callable[..., T]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    meta: EntryMeta
    config: type | None = None  # the frozen config dataclass its parameters must fit (checked early)
    runtime_args: tuple[str, ...] = ()  # arguments that are objects, not config (surrogates, name)
    origin: Origin = BUILTIN  # who registered it: built-in, an entry point, a suite plug-in, runtime code

    def create(self, **overrides: Any) -> T:
        kwargs = {**self.defaults, **overrides}
        return self.factory(**kwargs)

    def check_params(self, params: Mapping[str, Any], *, where: str) -> None:
        """Validate parameters against :attr:`config` without building anything (suite validation)."""
        if self.config is None:
            return
        from cloakbench.config import build

        merged = {k: v for k, v in {**self.defaults, **params}.items() if k not in self.runtime_args}
        build(self.config, merged, where=where)


_ALL: weakref.WeakSet[Registry[Any]] = weakref.WeakSet()
_LOCK = threading.RLock()  # entry-point loading and removal (a plug-in may read another registry while loading)


class Registry(Generic[T]):
    """A named collection of factories of one kind."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.group = ENTRY_POINT_GROUPS.get(kind)
        self._entries: dict[str, Entry[T]] = {}
        self._plugins_state = "none" if self.group else "done"  # none -> loading -> done
        _ALL.add(self)

    def _load_plugins(self) -> None:
        """Load this kind's entry-point plug-ins once, on first read (see the module docstring)."""
        if self._plugins_state != "none":
            return
        with _LOCK:
            if self._plugins_state != "none":  # loaded by another thread, or being loaded by this one
                return
            self._plugins_state = "loading"
            try:
                from cloakbench.plugins import load_entry_points

                load_entry_points(self)
            except BaseException:
                self._plugins_state = "none"  # the next read tries again (and raises the same error)
                raise
            self._plugins_state = "done"

    def register(
        self,
        name: str,
        factory: Callable[..., T],
        *,
        meta: EntryMeta,
        defaults: Mapping[str, Any] | None = None,
        config: type | None = None,
        runtime_args: tuple[str, ...] = (),
        origin: Origin | None = None,
    ) -> Entry[T]:
        """Add ``name``; ``origin`` defaults to the plug-in being loaded, else to the calling code's
        (:func:`caller_origin`). A name already registered, whatever its origin, is an error naming that origin."""
        origin = origin if origin is not None else caller_origin(1)
        if origin.kind is not OriginKind.BUILTIN:
            self._load_plugins()  # installed plug-ins first: a later suite plug-in then clashes, not the reverse
        if not name or name != name.strip() or any(c.isspace() for c in name):
            raise RegistryError(f"{self.kind} registry: invalid name {name!r}")
        if name in self._entries:
            held = self._entries[name].origin
            raise RegistryError(f"{self.kind} registry: {name!r} is already registered ({held})")
        entry = Entry(
            name=name,
            factory=factory,
            defaults=MappingProxyType(dict(defaults or {})),
            meta=meta,
            config=config,
            runtime_args=runtime_args,
            origin=origin,
        )
        self._entries[name] = entry
        return entry

    def remove_origin(self, origin: Origin) -> list[str]:
        """Remove every entry ``origin`` registered (a plug-in being reloaded or rolled back); their names."""
        with _LOCK:
            gone = [n for n, e in self._entries.items() if e.origin == origin]
            for n in gone:
                del self._entries[n]
        return gone

    def get(self, name: str) -> Entry[T]:
        self._load_plugins()
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._entries, n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise RegistryError(f"unknown {self.kind} {name!r}{hint} (known: {known})") from None

    def create(self, name: str, /, **overrides: Any) -> T:
        return self.get(name).create(**overrides)

    def list(self, pattern: str = "*") -> list[str]:
        self._load_plugins()
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: object) -> bool:
        self._load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        self._load_plugins()
        return iter([self._entries[n] for n in sorted(self._entries)])

    def __len__(self) -> int:
        self._load_plugins()
        return len(self._entries)


def registries() -> list[Registry[Any]]:
    """Every registry created in this process (the plug-in loader removes a plug-in's entries from all)."""
    return list(_ALL)


def remove_origin(origin: Origin) -> list[tuple[str, str]]:
    """Remove ``origin``'s entries from every registry; the (kind, name) pairs removed."""
    return [(r.kind, n) for r in registries() for n in r.remove_origin(origin)]
