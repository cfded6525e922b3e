"""cloakbench's public API: the contracts a plug-in implements, the functions that register it, and the functions
that load and run a suite. A plug-in author imports from here and nothing else (``docs/plugins.md``).

Stability. *Stable* names keep their meaning and signature within a major version (0.x: within a minor version);
a change is announced one release ahead (a ``DeprecationWarning``). *Provisional* names may change in any
release. Everything not listed here (every other module of ``cloakbench``) is private.

=========================================================  ===========  ============================================
name                                                       stability    what
=========================================================  ===========  ============================================
``Defense``, ``ThreatModel``, ``DefenseRequirements``      stable       a cloak: subclass, implement ``_protect``
``Budget``                                                 stable       L-inf / DSSIM budget the base class enforces
``CloakFailure``                                           stable       raised for a cloak that protects nothing
``Recognizer``, ``TorchRecognizer``                        stable       a face-embedding model
``InputSpec``, ``ChannelOrder``, ``Alignment``,            stable       what a recognizer's first layer wants
``Capabilities``
``InputTransform``, ``ConfiguredTransform``                stable       a tracker's input countermeasure
``Adaptation``, ``Adapted``, ``TrainingData``,             provisional  a tracker that retrains its model
``TrainingSet``, ``TrainReport``, ``CheckpointStore``
``DifferentiableTwin``                                     provisional  a transform's differentiable stand-in
``EntryMeta``, ``NoParams``, ``Entry``, ``Origin``,        stable       registry entries and where they came from
``OriginKind``
``register_defense``, ``register_recognizer``,             stable       add a component (a plug-in calls these)
``register_transform``, ``register_adaptation``
``create_recognizer``, ``create_defense``,                 stable       build a registered component by name
``create_transform``
``entries``                                                stable       the registered entries of a kind
``load_plugin``, ``PluginRef``                             stable       load a plug-in file or module by hand
``Suite``, ``load_suite``                                  stable       a validated suite (file, or built-in name)
``run_suite``                                              stable       run or resume a suite into a folder
``RunResults``, ``load_results``                           stable       a stored run's tables as DataFrames
``build_config``, ``require``                              stable       validate a frozen config dataclass
``CloakbenchError``, ``ConfigError``, ``RegistryError``,   stable       the errors cloakbench raises on purpose
``PluginError``
=========================================================  ===========  ============================================

Every image crossing these contracts is a ``torch.float32`` tensor ``[B, 3, H, W]``, RGB, values in [0, 1];
conversions happen inside a component, never in its callers. ``RunResults`` and ``load_results`` import pandas
when first used (``import cloakbench.api`` does not); the rest imports torch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cloakbench.attacks.adaptation.base import (
    Adaptation,
    Adapted,
    CheckpointStore,
    TrainingData,
    TrainingSet,
    TrainReport,
)
from cloakbench.attacks.recognizers.base import (
    Alignment,
    Capabilities,
    ChannelOrder,
    InputSpec,
    Recognizer,
    TorchRecognizer,
)
from cloakbench.attacks.transforms.base import ConfiguredTransform, InputTransform
from cloakbench.attacks.transforms.twins import DifferentiableTwin
from cloakbench.bench.suite import Suite
from cloakbench.config import build as build_config
from cloakbench.config import require
from cloakbench.defenses.base import CloakFailure, Defense, DefenseRequirements, ThreatModel
from cloakbench.defenses.budgets import Budget
from cloakbench.errors import CloakbenchError, ConfigError, RegistryError
from cloakbench.plugins import PluginError, PluginRef
from cloakbench.registry import Entry, EntryMeta, NoParams, Origin, OriginKind, Registry, caller_origin

if TYPE_CHECKING:
    from cloakbench.bench.executors import Executor
    from cloakbench.results import RunResults, load_results

__all__ = [
    "Adaptation",
    "Adapted",
    "Alignment",
    "Budget",
    "Capabilities",
    "ChannelOrder",
    "CheckpointStore",
    "CloakFailure",
    "CloakbenchError",
    "ConfigError",
    "ConfiguredTransform",
    "Defense",
    "DefenseRequirements",
    "DifferentiableTwin",
    "Entry",
    "EntryMeta",
    "InputSpec",
    "InputTransform",
    "NoParams",
    "Origin",
    "OriginKind",
    "PluginError",
    "PluginRef",
    "Recognizer",
    "RegistryError",
    "RunResults",
    "Suite",
    "ThreatModel",
    "TorchRecognizer",
    "TrainReport",
    "TrainingData",
    "TrainingSet",
    "build_config",
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
    "require",
    "run_suite",
]

Kind = Literal["defense", "recognizer", "transform", "adaptation", "classifier"]

DEFENSE_RUNTIME_ARGS = ("surrogates", "name")
"""What the bench passes a defense factory besides the suite's ``params``: the surrogate recognizers (built,
possibly wrapped for EOT) and the suite entry's label (the defense's ``name``)."""


def __getattr__(name: str) -> Any:
    """``RunResults`` and ``load_results`` (pandas) are imported on first use."""
    if name in ("RunResults", "load_results"):
        from cloakbench import results

        return getattr(results, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _registry(kind: str) -> Registry[Any]:
    if kind == "defense":
        from cloakbench.defenses import DEFENSES

        return DEFENSES
    if kind == "recognizer":
        from cloakbench.attacks.recognizers import RECOGNIZERS

        return RECOGNIZERS
    if kind == "transform":
        from cloakbench.attacks.transforms import TRANSFORMS

        return TRANSFORMS
    if kind == "adaptation":
        from cloakbench.attacks.adaptation import ADAPTATIONS

        return ADAPTATIONS
    if kind == "classifier":
        from cloakbench.bench.classifiers import CLASSIFIERS

        return CLASSIFIERS
    raise ValueError(f"unknown component kind {kind!r} (defense, recognizer, transform, adaptation, classifier)")


def _check_factory(
    what: str, factory: Callable[..., Any], keywords: Sequence[str], defaults: Mapping[str, Any]
) -> None:
    """A factory must take ``keywords`` (what the bench passes) and ``defaults`` as keyword arguments."""
    if not callable(factory):
        raise TypeError(f"{what}: factory must be callable, got {type(factory).__name__}")
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # no signature to read (a builtin): it is called and fails loudly if wrong
        return
    params = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    takes = {
        p.name for p in params if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    }
    missing = [k for k in (*keywords, *defaults) if k not in takes]
    if missing:
        raise TypeError(
            f"{what}: factory {getattr(factory, '__qualname__', factory)!r} takes no keyword argument(s) "
            f"{', '.join(map(repr, missing))}, which cloakbench passes it"
        )


def _register(
    kind: str, name: str, factory: Callable[..., Any], *, meta: EntryMeta, defaults: Mapping[str, Any] | None,
    config: type | None, runtime_args: tuple[str, ...], origin: Origin,
) -> Entry[Any]:  # fmt: skip
    what = f"register_{kind}({name!r})"
    if not isinstance(meta, EntryMeta):
        raise TypeError(f"{what}: meta must be an EntryMeta (at least a summary), got {type(meta).__name__}")
    defaults = dict(defaults or {})
    _check_factory(what, factory, runtime_args, defaults)
    if config is not None:  # the defaults must fit the config, or every use of the entry would fail later
        build_config(config, {k: v for k, v in defaults.items() if k not in runtime_args}, where=f"{what} defaults")
    return _registry(kind).register(
        name, factory, meta=meta, defaults=defaults, config=config, runtime_args=runtime_args, origin=origin
    )


def register_defense(
    name: str, factory: Callable[..., Defense], *, meta: EntryMeta, defaults: Mapping[str, Any] | None = None,
    config: type | None = None,
) -> Entry[Defense]:  # fmt: skip
    """Register a defense. ``factory(surrogates=..., name=..., **params)`` returns a :class:`Defense`; ``params``
    are ``defaults`` overridden by the suite entry's ``params``. ``config`` (a frozen keyword-only dataclass of the
    parameters) lets ``cloakbench validate`` reject bad parameters before any work. Put ``"threat model"`` and
    ``"budget"`` into ``meta.details`` and the tag ``"universal"`` on a universal-mask defense (probe-cloaking)."""
    return _register(
        "defense", name, factory, meta=meta, defaults=defaults, config=config, runtime_args=DEFENSE_RUNTIME_ARGS,
        origin=caller_origin(1),
    )  # fmt: skip


def register_recognizer(
    name: str, factory: Callable[..., Recognizer], *, meta: EntryMeta, defaults: Mapping[str, Any] | None = None
) -> Entry[Recognizer]:
    """Register a recognizer. ``factory(**defaults)`` returns a :class:`Recognizer` on the CPU (the bench moves it
    with ``.to(device)``). Tag it ``"white-box"`` when it is differentiable (a defense may then use it as a
    surrogate); put its ``embedding_dim`` and ``input`` into ``meta.details`` for ``cloakbench list``."""
    return _register(
        "recognizer", name, factory, meta=meta, defaults=defaults, config=None, runtime_args=(), origin=caller_origin(1)
    )


def register_transform(
    name: str, factory: Callable[..., InputTransform], *, meta: EntryMeta, defaults: Mapping[str, Any] | None = None,
    config: type | None = None,
) -> Entry[InputTransform]:  # fmt: skip
    """Register an input transform (a countermeasure). ``factory(**params)`` returns an :class:`InputTransform`
    whose ``name`` is ``name``; a :class:`ConfiguredTransform` subclass registers as
    ``register_transform(cls.default_name, cls.make, config=cls.config_type, meta=...)``."""
    return _register(
        "transform", name, factory, meta=meta, defaults=defaults, config=config, runtime_args=("name",),
        origin=caller_origin(1),
    )  # fmt: skip


def register_adaptation(
    name: str, factory: Callable[..., Adaptation], *, meta: EntryMeta, defaults: Mapping[str, Any] | None = None,
    config: type | None = None,
) -> Entry[Adaptation]:  # fmt: skip
    """Register a model adaptation (a countermeasure that retrains the recognizer; provisional contract).
    ``factory(**params)`` returns an :class:`Adaptation`."""
    return _register(
        "adaptation", name, factory, meta=meta, defaults=defaults, config=config, runtime_args=("name",),
        origin=caller_origin(1),
    )  # fmt: skip


def entries(kind: Kind) -> list[Entry[Any]]:
    """The registered entries of ``kind`` (installed plug-ins included), by name; each says its ``origin``."""
    return list(_registry(kind))


def create_recognizer(name: str, **overrides: Any) -> Recognizer:
    """Build a registered recognizer (the zoo's fetch their pinned weights on first use), on the CPU."""
    rec: Recognizer = _registry("recognizer").create(name, **overrides)
    return rec


def create_defense(name: str, *, surrogates: Sequence[Recognizer] = (), **params: Any) -> Defense:
    """Build a registered defense against ``surrogates`` (its ``name`` is the registered name)."""
    defense: Defense = _registry("defense").create(name, surrogates=tuple(surrogates), name=name, **params)
    return defense


def create_transform(name: str, **params: Any) -> InputTransform:
    """Build a registered input transform."""
    transform: InputTransform = _registry("transform").create(name, **params)
    return transform


def load_plugin(source: str | Path, *, base: str | Path | None = None) -> PluginRef:
    """Load a plug-in file (``.py``; relative to ``base``, default the working directory) or module by hand, as a
    suite's ``plugins:`` would; loading it again is a no-op unless its source changed."""
    from cloakbench.plugins import load_plugin as _load

    return _load(str(source), base=Path(base) if base is not None else None, where=f"plug-in {str(source)!r}")


def load_suite(suite: str | Path) -> Suite:
    """A validated suite: a YAML file, or the name of a built-in suite (``"quick"``). Its plug-ins are loaded and
    every name is checked; errors are :class:`ConfigError` naming the file, the key and the problem."""
    from cloakbench.bench.suite import builtin_suite_path, builtin_suites
    from cloakbench.bench.suite import load_suite as _load

    path = Path(suite)
    if path.suffix not in (".yaml", ".yml") and not path.exists():
        builtin = builtin_suite_path(str(suite))
        if builtin is None:
            raise ConfigError(
                f"{str(suite)!r} is neither a suite file nor a built-in suite ({', '.join(builtin_suites())})"
            )
        path = builtin
    return _load(path.resolve())


def run_suite(
    suite: Suite | str | Path, *, out: str | Path, device: Literal["auto", "cpu", "cuda"] | None = None,
    fresh: bool = False, cache: bool = True, progress: bool = False, executor: Executor | None = None,
) -> RunResults:  # fmt: skip
    """Run ``suite`` (a :class:`Suite`, a suite file or a built-in suite's name) into the folder ``out`` and
    return the run's tables (:func:`load_results`), as ``cloakbench run SUITE --out OUT`` does: the results store,
    the CSV and Markdown files, resuming a killed run (``fresh=True`` starts over). ``device`` overrides the
    suite's; ``cache=False`` ignores the artifact cache; ``executor`` defaults to this process. A failed cell is
    a row with ``status == "failed"`` and a ``note``, not an exception; bad input raises :class:`ConfigError`
    before any work."""
    import dataclasses

    from cloakbench.bench.cache import ArtifactCache
    from cloakbench.bench.executors import run_into_store
    from cloakbench.bench.output import write_run
    from cloakbench.bench.store import STORE_FILE
    from cloakbench.results import load_results

    resolved = suite if isinstance(suite, Suite) else load_suite(suite)
    if device is not None:
        resolved = dataclasses.replace(resolved, device=device)
    if resolved.plugins:  # a Suite built in code: make sure its plug-ins are loaded (a no-op when they are)
        from cloakbench.plugins import load_plugin as _load

        for i, ref in enumerate(resolved.plugins):
            _load(ref, where=f"suite {resolved.name!r}: plugins[{i}]")
    out_dir = Path(out).resolve()
    if fresh:
        for suffix in ("", "-wal", "-shm"):
            (out_dir / f"{STORE_FILE}{suffix}").unlink(missing_ok=True)
    outcome = run_into_store(
        resolved, out_dir, executor=executor, cache=ArtifactCache(enabled=cache), progress=progress
    )
    write_run(outcome.result, out_dir, attempts_of=outcome.store_path)
    return load_results(out_dir)
