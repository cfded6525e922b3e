"""cloakbench: a benchmark harness for face cloaking.

Defenses (cloaks a user applies to their photos) are evaluated against recognizers (the tracker's
face-embedding models) and countermeasures (input transforms, model adaptation). See README.md for the
glossary and the evaluation protocol.

The public API is :mod:`cloakbench.api` (contracts, registration, suites; its docstring says which names are
stable). Its functions are also attributes of this package, imported on first use so that ``import cloakbench``
stays light (no torch, no pandas): ``cloakbench.run_suite(...)``, ``cloakbench.load_suite(...)``,
``cloakbench.register_defense(...)``, ... ``cloakbench.results(RUN)`` is :func:`cloakbench.results.load_results`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

if TYPE_CHECKING:  # the lazy attributes below, for type checkers
    from cloakbench import api
    from cloakbench.api import (
        create_defense,
        create_recognizer,
        create_transform,
        entries,
        load_plugin,
        load_results,
        load_suite,
        register_adaptation,
        register_defense,
        register_recognizer,
        register_transform,
        run_suite,
    )

__all__ = [
    "__version__",
    "api",
    "create_defense",
    "create_recognizer",
    "create_transform",
    "entries",
    "load_plugin",
    "load_results",
    "load_suite",
    "register_adaptation",
    "register_defense",
    "register_recognizer",
    "register_transform",
    "run_suite",
]

_API_FUNCTIONS = frozenset(__all__) - {"__version__", "api"}
"""The functions of :mod:`cloakbench.api` this package re-exports (lazily)."""


def __getattr__(name: str) -> object:
    """Lazy attributes, so ``import cloakbench`` stays light: ``cloakbench.results(RUN)`` (a stored run as pandas
    DataFrames, :func:`cloakbench.results.load_results`) imports pandas only when first used; ``cloakbench.api``
    and its re-exported functions import torch only when first used."""
    import importlib

    if name == "results":
        return importlib.import_module("cloakbench.results")  # a callable module: results(RUN) -> RunResults
    if name == "api":
        return importlib.import_module("cloakbench.api")
    if name in _API_FUNCTIONS:
        return getattr(importlib.import_module("cloakbench.api"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "api", "results", *_API_FUNCTIONS})
