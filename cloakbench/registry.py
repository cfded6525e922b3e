"""One registry per kind of component (defenses, recognizers, transforms, ...).

An entry is a name bound to a factory, default keyword arguments (so presets such as ``fawkes-high``
are registered names bound to config values, not if/elif chains) and metadata (paper, year, venue,
licence and origin of weights). Registering a name twice is an error; asking for an unknown name is an
error that lists the close matches.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from cloakbench.errors import RegistryError

T = TypeVar("T")


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


class Registry(Generic[T]):
    """A named collection of factories of one kind."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(
        self,
        name: str,
        factory: Callable[..., T],
        *,
        meta: EntryMeta,
        defaults: Mapping[str, Any] | None = None,
        config: type | None = None,
        runtime_args: tuple[str, ...] = (),
    ) -> Entry[T]:
        if not name or name != name.strip() or any(c.isspace() for c in name):
            raise RegistryError(f"{self.kind} registry: invalid name {name!r}")
        if name in self._entries:
            raise RegistryError(f"{self.kind} registry: {name!r} is already registered")
        entry = Entry(
            name=name,
            factory=factory,
            defaults=MappingProxyType(dict(defaults or {})),
            meta=meta,
            config=config,
            runtime_args=runtime_args,
        )
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> Entry[T]:
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
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries[n] for n in sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)
