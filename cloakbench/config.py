"""Frozen, validated configuration.

Every configurable component has a ``@dataclass(frozen=True, kw_only=True)`` config whose
``__post_init__`` validates values. :func:`build` turns a mapping (from YAML, the CLI or code) into such a
config and rejects unknown keys by name, saying where they came from.

Config values come from untrusted files, so :func:`build` also holds the limits every value shares, whatever
its field: keys are strings; integers fit 64 bits (SQLite, numpy and torch seeds hold them; a larger one used to
crash the results store after the cloaks were made); floats are finite unless the field's metadata is
:data:`ALLOW_INFINITE` (``.inf`` as a penalty or a rate limit used to run "ok" with a meaningless result); a
path holds no NUL. Values quoted in a message go through :func:`quote`, which never builds the repr of a huge
value (an alias-expanded list, a megabyte string), so every message is one short line.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import reprlib
import types
import typing
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from cloakbench.errors import ConfigError

C = TypeVar("C")

INT_MAX = 2**63 - 1
"""The largest integer a config takes (SQLite's INTEGER; numpy and torch seeds hold it too)."""
INT_MIN = -(2**63)

ALLOW_INFINITE: Mapping[str, bool] = MappingProxyType({"allow_infinite": True})
"""Field metadata (``field(metadata=ALLOW_INFINITE)``) for a float that may be ``.inf`` (no limit); NaN never is."""

QUOTE_LIMIT = 80
"""The most characters of a value an error message shows."""


class _ShortRepr(reprlib.Repr):
    """reprlib's bounded repr, also for integers Python will not turn into text (more than 4300 digits)."""

    def repr_int(self, x: int, level: int) -> str:
        return _big_int(x) if x.bit_length() > 256 else super().repr_int(x, level)


def _big_int(x: int) -> str:
    digits = int(abs(x).bit_length() * math.log10(2))  # the exact count is this or one more
    digits += 1 if abs(x) >= 10**digits else 0
    return f"{'a negative' if x < 0 else 'an'} integer of {digits} digits"


_SHORT = _ShortRepr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 3, QUOTE_LIMIT - 10, QUOTE_LIMIT, 40
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxset = _SHORT.maxfrozenset = _SHORT.maxdict = 6


def quote(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` for an error message, at most ``limit`` characters (``...`` marks a cut); the repr is built
    bounded (reprlib), never in full, so a billion-item value costs nothing."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return _big_int(value)
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def build(cls: type[C], data: Mapping[str, Any] | None, *, where: str) -> C:
    """Construct config dataclass ``cls`` from ``data``; unknown keys and bad values are errors naming ``where``."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    odd = sorted(quote(k) for k in data if not isinstance(k, str))
    if odd:
        example = next(iter(fields), "name")
        raise ConfigError(
            f"{where}: key(s) {', '.join(odd)} are not strings (keys are names such as {example!r}; quote a key "
            "that YAML reads as something else, e.g. 'true')"
        )
    unknown = sorted(set(data) - set(fields))
    if unknown:
        hint, allowed = _did_you_mean(unknown, fields), ", ".join(sorted(fields))
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(quote, unknown))}{hint} (allowed: {allowed})")
    missing = sorted(
        name
        for name, f in fields.items()
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {', '.join(map(repr, missing))}")
    hints = typing.get_type_hints(cls)
    sep = "." if ": " in where else ": "  # "file.yaml: defenses[0].params" / "file.yaml: seeds"
    coerced = {
        k: _coerce(v, hints.get(k, Any), f"{where}{sep}{k}", infinite=bool(fields[k].metadata.get("allow_infinite")))
        for k, v in data.items()
    }
    try:
        return cls(**coerced)
    except (ConfigError, TypeError, ValueError) as exc:
        raise ConfigError(_locate(str(exc), where, sep, fields)) from None


def _did_you_mean(unknown: list[str], known: Mapping[str, Any]) -> str:
    """``"; did you mean 'x'?"`` for the unknown keys that are close to a known one (empty when none is)."""
    close = {k: m[0] for k in unknown if len(k) <= QUOTE_LIMIT and (m := difflib.get_close_matches(k, known, n=1))}
    if not close:
        return ""
    if len(unknown) == 1:
        return f"; did you mean {next(iter(close.values()))!r}?"
    return "; did you mean " + ", ".join(f"{m!r} for {quote(k)}" for k, m in close.items()) + "?"


def _locate(message: str, where: str, sep: str, fields: Mapping[str, Any]) -> str:
    """Prefix a ``__post_init__`` message with ``where``; one that starts with a field name (``"epsilon must
    be ..."``) gets that field onto the key path (``"file.yaml: defenses[1].params.epsilon must be ..."``)."""
    first = message.split(" ", 1)[0].rstrip(":")
    return f"{where}{sep}{message}" if first in fields else f"{where}: {message}"


def _coerce(value: Any, hint: Any, where: str, *, infinite: bool = False) -> Any:
    """Check ``value`` against a simple type hint; convert lists to tuples and strings to enums. Floats must be
    finite (``infinite``: or +-inf), integers must fit 64 bits."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where, infinite=infinite)
            except ConfigError as exc:
                errors.append(str(exc))
        if len(errors) == 1:
            raise ConfigError(errors[0])
        # the value had the right shape for one alternative and failed deeper inside it: that error says most
        deeper = [e for e in errors if e.startswith((f"{where}[", f"{where}."))]
        if deeper:
            raise ConfigError(deeper[0])
        wanted = " or ".join(_describe(a) for a in args if a is not type(None))
        raise ConfigError(f"{where}: expected {wanted}, got {type(value).__name__} {quote(value)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {quote(value)} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {quote(value)}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]", infinite=infinite) for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            items = enumerate(zip(value, args, strict=True))
            return tuple(_coerce(v, a, f"{where}[{i}]", infinite=infinite) for i, (v, a) in items)
        return tuple(value)
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {quote(value)}")
        return dict(value)
    if isinstance(hint, type) and issubclass(hint, Enum):
        if isinstance(value, hint):
            return value
        try:
            return hint(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in hint)
            raise ConfigError(f"{where}: {quote(value)} is not one of {allowed}") from None
    if hint is float:
        return _number(value, where, infinite=infinite)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {quote(value)}")
        if not INT_MIN <= value <= INT_MAX:
            bound = f"at most {INT_MAX}" if value > 0 else f"at least {INT_MIN}"
            raise ConfigError(f"{where}: {quote(value)} is out of range ({bound})")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {type(value).__name__} {quote(value)}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {quote(value)}")
        return value
    if hint is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: expected a path, got {type(value).__name__} {quote(value)}")
        if "\0" in str(value):
            raise ConfigError(f"{where}: a path cannot hold a NUL character, got {quote(str(value))}")
        return Path(value)
    return value


def _number(value: Any, where: str, *, infinite: bool) -> float:
    """A float from a YAML number: finite (or +-inf where ``infinite``), never NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {quote(value)}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        number = math.inf if value > 0 else -math.inf
    if math.isnan(number) or (math.isinf(number) and not infinite):
        wanted = "a number (or .inf)" if infinite else "a finite number"
        raise ConfigError(f"{where}: expected {wanted}, got {quote(value)}")
    return number


def _describe(hint: Any) -> str:
    """What a value of type ``hint`` looks like in YAML, for error messages (``"a list"``, ``"'all'"``)."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return " or ".join(map(repr, typing.get_args(hint)))
    if origin in (tuple, list):
        return "a list"
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return "a mapping"
    if isinstance(hint, type) and issubclass(hint, Enum):
        return "one of " + ", ".join(repr(m.value) for m in hint)
    names = {float: "a number", int: "an integer", bool: "true or false", str: "a string", Path: "a path"}
    return names.get(hint, str(hint))


def to_plain(obj: Any) -> Any:
    """A JSON/YAML-safe view of configs (dataclasses, enums, paths, tuples)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def stable_hash(*parts: Any, length: int = 16) -> str:
    """A short, stable hex digest of JSON-serialisable parts (configs go through :func:`to_plain`)."""
    payload = json.dumps([to_plain(p) for p in parts], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


def require(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds (for ``__post_init__``)."""
    if not condition:
        raise ConfigError(message)


def source_digest(*objects: Any, packages: tuple[str, ...] = ()) -> str:
    """SHA-256 (16 hex digits) of the source code behind ``objects`` (the files defining their classes) and of
    every ``.py`` file of the named ``packages``: a cache key part, so an artifact made by older code is never
    read back as if this code had made it."""
    import importlib
    import inspect

    files: set[Path] = set()
    for obj in objects:
        try:
            source = inspect.getsourcefile(obj if isinstance(obj, type) else type(obj))
        except TypeError:  # built in: no source file
            source = None
        if source:
            files.add(Path(source).resolve())
    for name in packages:
        module = importlib.import_module(name)
        for folder in getattr(module, "__path__", []):
            files.update(p.resolve() for p in Path(folder).rglob("*.py"))
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for path in sorted(files):
        label = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        h.update(label.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]
