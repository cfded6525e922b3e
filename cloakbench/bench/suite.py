"""Suite files: a YAML description of a benchmark grid, validated before any work starts.

A suite names a dataset, the protected identities, and the axes of the grid: defenses (with their
surrogates and parameters), recognizers, countermeasures, classifiers and seeds. Every error names the
file, the key path and the problem. The resolved suite (defaults filled in) is written next to every run.
:func:`load_suite` also rejects a key given twice in one mapping (plain YAML keeps the last one silently)
and, for ``source: folder``, lists the dataset folder (no image is read) to reject a missing folder, a bad
``dataset.names`` file and protected identities that cannot be in it. The full schema is documented in
``docs/suites.md``.

A suite file is untrusted input, so loading it is bounded before anything walks it: at most
:data:`MAX_FILE_BYTES`, UTF-8, nesting at most :data:`MAX_DEPTH` levels and at most :data:`MAX_VALUES` values
with YAML aliases expanded (an alias bomb is a few lines that expand to billions), no value longer than
:data:`MAX_SCALAR` characters, no alias inside its own anchor, string keys only. The name must be a plain folder
name (:data:`NAME_RULE`): it names the default run folder ``runs/<name>``, which a path would leave.

Schema (all keys optional unless marked)::

    name: quick                      # required; ASCII letters, digits, '.', '_', '-' (names runs/<name>)
    description: ...
    dataset: {source: demo | folder, path: DIR, names: FILE, train_fraction: 0.7, split_seed: 10, align: false,
              max_per_identity: null}   # names: CSV 'folder,name' renaming identity folders (folder only)
    protected: {identities: all | [names], count: N}   # one protected identity at a time (names after renaming)
    defenses:                        # required, >= 1
      - {name: pgd, label: pgd-8, surrogates: [sface], params: {epsilon: 0.0314, steps: 10},
         robust: {transforms: [none, {name: jpeg, params: {quality: 75}}]}}   # optional: EOT through twins
    recognizers: [sface, sface-onnx] # required, >= 1; a mapping is a model from a file (also as a surrogate,
                                     # a backend, or in 'models'): {name: my-model, onnx | torchscript: FILE,
                                     # input: {size: 112, colour: rgb, mean: [...], std: [...], scale: 1, layout: nchw}}
    services:                        # commercial-style black boxes (default: none)
      - {kind: rekognition | azure, backend: sface, transport: http | in-process | aws, max_faces: 50,
         match_threshold: 0, rate_limit_per_s: null,
         region: null, collection_prefix: cloakbench-, endpoint: aws | local}   # the last three: transport aws
    countermeasures:                 # default: [{name: none}]; input transforms and model adaptations
      - {name: jpeg, label: jpeg-75, params: {quality: 75}, apply_to: enrollment | queries | both}
      - {name: adaptive, params: {epochs: 5}}   # end-to-end | adaptive | adversarial (+ -full for GPUs)
    classifiers: [nearest-neighbour, linear]   # the poisoning protocol's classifiers
    protocols: [poisoning, evasion]  # evasion: gallery search by cosine, rank-1/5/50; probe-cloaking: OPOM's
                                     # (universal masks only: fitted on enrollment photos, cloaking the queries)
    seeds: [0]
    device: auto | cpu | cuda
    precision: fp32 | bf16           # the white-box networks' arithmetic: bf16 autocasts their forward and backward
                                     # passes (losses, DSSIM, optimiser state and budgets stay float32); default fp32
    tf32: false                      # CUDA only: allow TF32 matmuls and convolutions (faster; embeddings move ~1e-3)
    clean_accuracy_floor: 0.5        # no protection rate is reported below this clean accuracy
    oblivious_only: false            # true: evaluate each defense only with recognizers that were not its
                                     # surrogates (different weights); every row says whether it was oblivious
    bootstrap: {resamples: 1000, confidence: 0.95}
    plugins: [my_cloak.py, my_pkg.cloaks]   # plug-in files (relative to the suite file) and modules, imported before
                                     # any name is checked; they run code (docs/plugins.md). Recorded with the SHA-256
                                     # of their source, so a run does not resume after the plug-in changed
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cloakbench.attacks.recognizers.from_file import FileModel, is_file_model, parse_file_model
from cloakbench.config import INT_MAX, build, quote, require, to_plain
from cloakbench.defenses.robust import RobustConfig, parse_robust
from cloakbench.errors import ConfigError, RegistryError
from cloakbench.plugins import PluginRef, load_plugins


class DatasetSource(enum.Enum):
    DEMO = "demo"
    FOLDER = "folder"


class Protocol(enum.Enum):
    POISONING = "poisoning"  # tracker enrols (cloaked) photos, classifies clean queries
    EVASION = "evasion"  # cloaked photos sit in a searchable gallery, clean probes search it (rank-k)
    # OPOM's protocol: a universal mask fitted on the user's enrollment photos cloaks their query photos (never seen
    # by the fitting), which search a clean gallery of every identity's enrollment photos (rank-k)
    PROBE_CLOAKING = "probe-cloaking"


class ApplyTo(enum.Enum):
    ENROLLMENT = "enrollment"
    QUERIES = "queries"
    BOTH = "both"


@dataclass(frozen=True, kw_only=True)
class DatasetConfig:
    source: DatasetSource = DatasetSource.DEMO
    path: Path | None = None
    names: Path | None = None  # CSV 'folder,name': identity folder -> identity name (see datasets.folder)
    train_fraction: float = 0.7
    split_seed: int = 10
    align: bool = False  # detect (YuNet, dlib as fallback) and align unaligned photos to 112x112 first
    max_per_identity: int | None = None  # keep a seeded sample of this many photos per identity (CPU-sized runs)

    def __post_init__(self) -> None:
        require(0 < self.train_fraction < 1, f"train_fraction must be in (0, 1), got {self.train_fraction}")
        require(self.split_seed >= 0, f"split_seed must be >= 0, got {self.split_seed}")
        require(
            self.max_per_identity is None or self.max_per_identity >= 2,
            f"max_per_identity must be >= 2 (one enrollment and one query photo), got {self.max_per_identity}",
        )
        if self.source is DatasetSource.FOLDER:
            require(self.path is not None, "source 'folder' needs a 'path'")
        else:
            require(self.path is None, "'path' is only for source 'folder'")
            require(self.names is None, "'names' is only for source 'folder'")
            require(not self.align, "'align' is only for source 'folder' (the demo set is always aligned)")


@dataclass(frozen=True, kw_only=True)
class ProtectedConfig:
    identities: tuple[str, ...] | Literal["all"] = "all"
    count: int | None = None

    def __post_init__(self) -> None:
        if self.identities != "all":  # identity names are NFC (datasets.folder.identity_name), so are these
            object.__setattr__(self, "identities", tuple(unicodedata.normalize("NFC", n) for n in self.identities))
        require(self.identities == "all" or len(self.identities) >= 1, "identities: give at least one name, or 'all'")
        require(
            self.identities == "all" or len(set(self.identities)) == len(self.identities), "identities: names repeat"
        )
        if self.count is not None:
            require(self.count >= 1, f"count must be >= 1, got {self.count}")
            require(self.identities == "all", "give either 'identities' as a list or 'count', not both")


@dataclass(frozen=True, kw_only=True)
class DefenseSpec:
    name: str
    label: str = ""
    surrogates: tuple[str, ...] = ("sface",)
    params: Mapping[str, Any] = field(default_factory=dict)
    robust: RobustConfig | None = None  # optimise through random differentiable transforms (EOT)
    cloak_fraction: float = 1.0
    """Share of the protected user's enrollment photos that are cloaked (the first ceil(f * n) of them, in split
    order); the rest reach the tracker clean, as when a user cloaks only some of what is online (FaceCure)."""

    def __post_init__(self) -> None:
        require(0.0 < self.cloak_fraction <= 1.0, f"cloak_fraction must be in (0, 1], got {self.cloak_fraction}")

    def cloaked_count(self, photos: int) -> int:
        """How many of a user's ``photos`` enrollment photos are cloaked (at least one)."""
        return max(1, math.ceil(self.cloak_fraction * photos - 1e-9)) if photos else 0


@dataclass(frozen=True, kw_only=True)
class CountermeasureSpec:
    name: str
    label: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)
    apply_to: ApplyTo = ApplyTo.ENROLLMENT


class ServiceKind(enum.Enum):
    REKOGNITION = "rekognition"  # collections: index faces, search by image (poisoning and evasion)
    AZURE = "azure"  # person groups: add faces, train, identify (poisoning only: no gallery search)


class Transport(enum.Enum):
    IN_PROCESS = "in-process"
    HTTP = "http"  # a real server on 127.0.0.1, called over HTTP
    AWS = "aws"  # Amazon Rekognition through boto3 (endpoint 'local': boto3 against cloakbench's own server)


_AWS_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-[0-9]{1,2}")
_COLLECTION_PREFIX = re.compile(r"[a-zA-Z0-9_.\-]{1,200}")
DEFAULT_COLLECTION_PREFIX = "cloakbench-"
_AWS_ONLY = ("region", "collection_prefix", "endpoint")
"""ServiceSpec keys that only transport aws takes (null for the others, left out of the resolved suite)."""


@dataclass(frozen=True, kw_only=True)
class ServiceSpec:
    """A commercial-style black-box tracker backed by a zoo recognizer."""

    kind: ServiceKind
    backend: str = "sface"
    transport: Transport = Transport.HTTP
    label: str = ""
    max_faces: int = 50  # matches (rekognition) or candidates (azure) asked for; evasion ranks beyond it are misses
    match_threshold: float = 0.0  # similarity 0..100 below which a match is dropped (0: pure ranking)
    rate_limit_per_s: float | None = None  # requests per second; calls wait for the service (token bucket)
    region: str | None = None  # transport aws: the AWS region (null: the AWS configuration's)
    collection_prefix: str | None = None  # transport aws: collections are <prefix><12 hex digits>, deleted afterwards
    endpoint: Literal["aws", "local"] | None = None  # transport aws: 'aws' (default) the real Amazon Rekognition;
    # 'local': boto3 against cloakbench's wire-compatible server backed by `backend` (its per-run secret as keys)

    def __post_init__(self) -> None:
        aws = self.transport is Transport.AWS
        require(
            not aws or self.kind is ServiceKind.REKOGNITION,
            "transport 'aws' is Amazon Rekognition: it needs kind 'rekognition'",
        )
        for name in ("region", "collection_prefix", "endpoint"):
            require(
                aws or getattr(self, name) is None,
                f"{name} applies only to transport 'aws' (this service's transport is {self.transport.value!r})",
            )
        require(
            self.region is None or _AWS_REGION.fullmatch(self.region) is not None,
            f"region must be an AWS region name such as 'us-east-1', got {quote(self.region)}",
        )
        require(
            self.collection_prefix is None or _COLLECTION_PREFIX.fullmatch(self.collection_prefix) is not None,
            "collection_prefix must be 1 to 200 characters from [a-zA-Z0-9_.-] (a Rekognition collection id "
            f"starts with it), got {quote(self.collection_prefix)}",
        )
        require(
            not aws or importlib.util.find_spec("boto3") is not None,
            "transport 'aws' needs boto3, the AWS SDK for Python, which cloakbench does not install: pip install boto3",
        )
        require(1 <= self.max_faces <= 100, f"max_faces must be in 1..100, got {self.max_faces}")
        require(
            0.0 <= self.match_threshold <= 100.0, f"match_threshold must be in [0, 100], got {self.match_threshold}"
        )
        require(  # below 0.01 each call waits minutes: a typo, not a service
            self.rate_limit_per_s is None or 0.01 <= self.rate_limit_per_s <= 1e6,
            "rate_limit_per_s must be in [0.01, 1e6] requests per second (null: no limit), "
            f"got {self.rate_limit_per_s}",
        )

    @property
    def real_aws(self) -> bool:
        """Whether the service is Amazon's own (transport aws, endpoint aws): ``backend`` plays no part then."""
        return self.transport is Transport.AWS and self.endpoint != "local"

    def default_label(self) -> str:
        return f"{self.kind.value}-aws" if self.real_aws else f"{self.kind.value}-{self.backend}"


@dataclass(frozen=True, kw_only=True)
class BootstrapConfig:
    resamples: int = 1000
    confidence: float = 0.95

    def __post_init__(self) -> None:
        require(self.resamples >= 10, f"resamples must be >= 10, got {self.resamples}")
        require(0.5 <= self.confidence < 1, f"confidence must be in [0.5, 1), got {self.confidence}")


MAX_FILE_BYTES = 2**20  # a suite is a few kilobytes
MAX_DEPTH = 50  # nesting levels (a suite needs about six)
MAX_VALUES = 100_000  # scalars, lists and mappings, each alias counted every time it is used
MAX_SCALAR = 10_000  # characters of one value (a description, a path)
_INT_TEXT = 100  # characters of an integer's YAML text (a 64-bit integer needs at most 66, in binary)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
LATE_DEFAULTS: dict[str, Any] = {"precision": "fp32", "tf32": False}
"""Top-level keys added after suites were stored, with the value that behaves as before the key existed: left out
of the resolved form (and so of the store's digest) at that value, so earlier runs still resume."""

NAME_RULE = "1 to 100 ASCII letters, digits, '.', '_' or '-', starting with a letter or digit"


@dataclass(frozen=True, kw_only=True)
class Suite:
    name: str
    description: str = ""
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    protected: ProtectedConfig = field(default_factory=ProtectedConfig)
    defenses: tuple[DefenseSpec, ...]
    recognizers: tuple[str, ...]
    services: tuple[ServiceSpec, ...] = ()
    countermeasures: tuple[CountermeasureSpec, ...] = (CountermeasureSpec(name="none"),)
    classifiers: tuple[str, ...] = ("nearest-neighbour", "linear")
    protocols: tuple[Protocol, ...] = (Protocol.POISONING,)
    seeds: tuple[int, ...] = (0,)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"  # the white-box networks' arithmetic (Recognizer.set_precision)
    tf32: bool = False  # CUDA: TF32 matmuls and convolutions allowed (cloakbench.devices.apply_matmul_settings)
    clean_accuracy_floor: float = 0.5
    oblivious_only: bool = False
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    models: tuple[FileModel, ...] = ()  # models from a file (ONNX/TorchScript), named in recognizers/surrogates/backend
    plugins: tuple[PluginRef, ...] = ()  # suite plug-ins (files, modules), loaded first; each with its source's SHA-256

    def __post_init__(self) -> None:
        require(
            _NAME.fullmatch(self.name) is not None,
            f"name must be {NAME_RULE} (it names the run folder runs/<name>; --out puts a run anywhere), "
            f"got {quote(self.name)}",
        )
        require(
            0.0 <= self.clean_accuracy_floor <= 1.0,
            f"clean_accuracy_floor must be in [0, 1], got {self.clean_accuracy_floor}",
        )
        require(len(self.defenses) >= 1, "defenses: at least one defense is needed")
        require(len(self.recognizers) >= 1, "recognizers: at least one recognizer is needed")
        require(len(self.classifiers) >= 1, "classifiers: at least one classifier is needed")
        require(len(self.seeds) >= 1, "seeds: at least one seed is needed")
        for i, seed in enumerate(self.seeds):
            require(0 <= seed <= INT_MAX, f"seeds[{i}] must be in 0..{INT_MAX}, got {quote(seed)}")
        require(len(self.protocols) >= 1, "protocols: at least one protocol is needed")
        require(len(set(self.protocols)) == len(self.protocols), "protocols: values repeat")

    def service_protocols(self, service: ServiceSpec) -> tuple[Protocol, ...]:
        """The protocols a service runs: the suite's for rekognition; poisoning only for azure (no gallery search)."""
        return (Protocol.POISONING,) if service.kind is ServiceKind.AZURE else self.protocols

    def cloak_source(self, spec: DefenseSpec) -> DefenseSpec:
        """The entry whose cloaks ``spec`` uses: the first with the same defense, surrogates, parameters and
        robust settings. Entries that differ only in label or ``cloak_fraction`` cloak the same photos the same
        way, so they share one set of cloaks (and a half-cloaked user is the fully cloaked one, minus photos)."""

        def makes(d: DefenseSpec) -> tuple[Any, ...]:
            return (d.name, d.surrogates, sorted(dict(d.params).items()), d.robust)

        return next((d for d in self.defenses if makes(d) == makes(spec)), spec)

    def to_dict(self) -> dict[str, Any]:
        plain: dict[str, Any] = to_plain(self)
        if not self.models:  # a suite without file models keeps the resolved form (and digest) it had before
            del plain["models"]
        if not self.plugins:  # likewise for a suite without plug-ins
            del plain["plugins"]
        for key, default in LATE_DEFAULTS.items():  # keys added later, at their old behaviour: the digest it had
            if plain.get(key) == default:
                del plain[key]
        for service in plain["services"]:  # and a service that is not Amazon's (its aws-only keys are all null)
            if service["transport"] != Transport.AWS.value:
                for key in _AWS_ONLY:
                    del service[key]
        return plain


def _require_mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {quote(value)}")
    return value


def _list_of_mappings(value: Any, where: str, *, shorthand: bool, allow_empty: bool = False) -> list[Mapping[str, Any]]:
    if not isinstance(value, list) or not (value or allow_empty):
        got = f"{type(value).__name__} {quote(value)}"
        raise ConfigError(f"{where}: expected a {'' if allow_empty else 'non-empty '}list, got {got}")
    items = []
    for i, item in enumerate(value):
        if shorthand and isinstance(item, str):
            item = {"name": item}
        items.append(_require_mapping(item, f"{where}[{i}]"))
    return items


def _with_robust(item: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    if item.get("robust") is None:
        return item
    return {**item, "robust": parse_robust(_require_mapping(item["robust"], where), where=where)}


def _file_models(top: dict[str, Any], where: str, base: Path | None) -> dict[str, Any]:
    """Models from a file (:mod:`cloakbench.attacks.recognizers.from_file`): a mapping with ``onnx`` or
    ``torchscript`` in ``models``, ``recognizers``, ``defenses[].surrogates`` or ``services[].backend`` is validated
    (its file loaded and run once), collected into ``models`` and replaced by its name; a name has one definition."""
    found: dict[str, tuple[FileModel, str]] = {}

    def take(value: Any, path: str) -> Any:
        if not isinstance(value, Mapping):
            return value
        if not is_file_model(value):
            raise ConfigError(
                f"{where}: {path}: a mapping here is a model from a file, with 'name', 'input' and 'onnx: FILE' or "
                f"'torchscript: FILE'; got keys {', '.join(quote(k) for k in value) or 'none'}"
            )
        model = parse_file_model(value, where=f"{where}: {path}", base=base)
        if model.name in found and found[model.name][0] != model:
            raise ConfigError(
                f"{where}: {path}.name: {quote(model.name)} is already defined differently at {found[model.name][1]}"
            )
        found.setdefault(model.name, (model, path))
        return model.name

    if "models" in top:
        listed = _list_of_mappings(top["models"], f"{where}: models", shorthand=False, allow_empty=True)
        for i, item in enumerate(listed):
            take(item, f"models[{i}]")
    if isinstance(top.get("recognizers"), list):
        top["recognizers"] = [take(r, f"recognizers[{i}]") for i, r in enumerate(top["recognizers"])]
    if isinstance(top.get("defenses"), list):
        top["defenses"] = [
            {**d, "surrogates": [take(s, f"defenses[{i}].surrogates[{j}]") for j, s in enumerate(d["surrogates"])]}
            if isinstance(d, Mapping) and isinstance(d.get("surrogates"), list)
            else d
            for i, d in enumerate(top["defenses"])
        ]
    if isinstance(top.get("services"), list):
        top["services"] = [
            {**s, "backend": take(s["backend"], f"services[{i}].backend")}
            if isinstance(s, Mapping) and "backend" in s
            else s
            for i, s in enumerate(top["services"])
        ]
    top["models"] = tuple(m for m, _ in found.values())
    return top


def _labelled(items: tuple[Any, ...], where: str, section: str) -> tuple[Any, ...]:
    """Fill in default labels (the registry name) and reject duplicates."""
    out = tuple(dataclasses.replace(it, label=it.label or it.name) for it in items)
    seen: dict[str, int] = {}
    for i, it in enumerate(out):
        if it.label in seen:
            raise ConfigError(
                f"{where}: {section}[{i}].label: label {quote(it.label)} repeats {section}[{seen[it.label]}] "
                "(a missing label defaults to the name); give each a distinct 'label'"
            )
        seen[it.label] = i
    return out


def parse_suite(data: Any, *, where: str, base: Path | None = None) -> Suite:
    """Validate a suite mapping (from YAML) into a :class:`Suite`; registry names are checked too. Model files
    (:func:`_file_models`) are relative to ``base`` (:func:`load_suite`: the suite file's folder; default: the
    working directory)."""
    if data is None:
        raise ConfigError(f"{where}: the suite is empty (expected a mapping with at least name, defenses, recognizers)")
    top = dict(_require_mapping(data, f"{where}: top level"))
    if "plugins" in top:  # first: they register names the rest of the suite may use (relative to ``base``)
        top["plugins"] = load_plugins(top["plugins"], base=base, where=f"{where}: plugins")
    top = _file_models(top, where, base)
    fields: dict[str, Any] = dict(top)
    if "dataset" in top:
        fields["dataset"] = build(
            DatasetConfig, _require_mapping(top["dataset"], f"{where}: dataset"), where=f"{where}: dataset"
        )
    if "protected" in top:
        fields["protected"] = build(
            ProtectedConfig,
            _require_mapping(top["protected"], f"{where}: protected"),
            where=f"{where}: protected",
        )
    if "bootstrap" in top:
        fields["bootstrap"] = build(
            BootstrapConfig,
            _require_mapping(top["bootstrap"], f"{where}: bootstrap"),
            where=f"{where}: bootstrap",
        )
    if "defenses" in top:
        items = _list_of_mappings(top["defenses"], f"{where}: defenses", shorthand=True)
        items = [_with_robust(it, f"{where}: defenses[{i}].robust") for i, it in enumerate(items)]
        specs = tuple(build(DefenseSpec, it, where=f"{where}: defenses[{i}]") for i, it in enumerate(items))
        fields["defenses"] = _labelled(specs, where, "defenses")
    if "countermeasures" in top:
        items = _list_of_mappings(top["countermeasures"], f"{where}: countermeasures", shorthand=True)
        specs_c = tuple(
            build(CountermeasureSpec, it, where=f"{where}: countermeasures[{i}]") for i, it in enumerate(items)
        )
        fields["countermeasures"] = _labelled(specs_c, where, "countermeasures")
    else:
        fields["countermeasures"] = (CountermeasureSpec(name="none", label="none"),)
    if "services" in top:
        items = _list_of_mappings(top["services"], f"{where}: services", shorthand=False, allow_empty=True)
        svcs = tuple(build(ServiceSpec, it, where=f"{where}: services[{i}]") for i, it in enumerate(items))
        svcs = tuple(dataclasses.replace(s, label=s.label or s.default_label()) for s in svcs)
        fields["services"] = _labelled(svcs, where, "services")
    for key in ("recognizers", "classifiers"):
        if key in top and (not isinstance(top[key], list) or not top[key]):
            got = f"{type(top[key]).__name__} {quote(top[key])}"
            raise ConfigError(f"{where}: {key}: expected a non-empty list of names, got {got}")
    suite = build(Suite, fields, where=where)
    _check_names(suite, where)
    return suite


def _check_names(suite: Suite, where: str) -> None:
    from cloakbench.attacks.adaptation import ADAPTATIONS
    from cloakbench.attacks.recognizers import RECOGNIZERS
    from cloakbench.attacks.transforms import TRANSFORMS
    from cloakbench.bench.classifiers import CLASSIFIERS
    from cloakbench.defenses import DEFENSES

    def check(registry: Any, name: str, path: str) -> None:
        if len(name) > 100:  # no registered name is this long; the registry would quote it whole
            raise ConfigError(
                f"{where}: {path}: unknown {registry.kind} {quote(name)} (known: {', '.join(registry.list())})"
            )
        try:
            registry.get(name)
        except RegistryError as exc:
            raise ConfigError(f"{where}: {path}: {exc}") from None

    files = {m.name: m for m in suite.models}
    for i, m in enumerate(suite.models):  # again here: a suite plug-in may have registered the name since
        if m.name in RECOGNIZERS:
            raise ConfigError(f"{where}: models[{i}].name: {quote(m.name)} is also a registered recognizer; rename it")
    for i, d in enumerate(suite.defenses):
        check(DEFENSES, d.name, f"defenses[{i}].name")
        DEFENSES.get(d.name).check_params(d.params, where=f"{where}: defenses[{i}].params")
        if Protocol.PROBE_CLOAKING in suite.protocols and "universal" not in DEFENSES.get(d.name).meta.tags:
            universal = ", ".join(e.name for e in DEFENSES if "universal" in e.meta.tags)
            raise ConfigError(
                f"{where}: defenses[{i}]: {quote(d.name)} makes no universal mask, so it cannot run the probe-cloaking "
                f"protocol (a mask fitted on enrollment photos, applied to unseen query photos); universal: {universal}"
            )
        for j, s in enumerate(d.surrogates):
            if s in files and not files[s].white_box and "white-box surrogate" in DEFENSES.get(d.name).meta.tags:
                raise ConfigError(
                    f"{where}: defenses[{i}].surrogates[{j}]: {quote(s)} is an ONNX file, a black box without "
                    f"gradients; {quote(d.name)} needs a white-box surrogate (export the model to TorchScript and "
                    "give it as 'torchscript: FILE')"
                )
            if s not in files:
                check(RECOGNIZERS, s, f"defenses[{i}].surrogates[{j}]")
    for i, r in enumerate(suite.recognizers):
        if r not in files:
            check(RECOGNIZERS, r, f"recognizers[{i}]")
    for i, c in enumerate(suite.countermeasures):
        if c.name in ADAPTATIONS:
            ADAPTATIONS.get(c.name).check_params(c.params, where=f"{where}: countermeasures[{i}].params")
            if c.apply_to is not ApplyTo.ENROLLMENT:
                raise ConfigError(
                    f"{where}: countermeasures[{i}].apply_to: {quote(c.name)} is a model adaptation, not an input "
                    "transform; 'apply_to' does not apply to it (leave it out)"
                )
            continue
        try:
            TRANSFORMS.get(c.name)
        except RegistryError as exc:
            known = ", ".join(TRANSFORMS.list() + ADAPTATIONS.list())
            raise ConfigError(
                f"{where}: countermeasures[{i}].name: unknown countermeasure {quote(c.name)} "
                f"(input transforms and adaptations: {known})"
            ) from exc
        TRANSFORMS.get(c.name).check_params(c.params, where=f"{where}: countermeasures[{i}].params")
    for i, k in enumerate(suite.classifiers):
        check(CLASSIFIERS, k, f"classifiers[{i}]")
    for i, svc in enumerate(suite.services):
        if svc.backend not in files:
            check(RECOGNIZERS, svc.backend, f"services[{i}].backend")
        if svc.label in suite.recognizers:
            raise ConfigError(f"{where}: services[{i}]: label {quote(svc.label)} is also a recognizer name; rename it")
        if Protocol.PROBE_CLOAKING in suite.protocols:
            raise ConfigError(f"{where}: services[{i}]: services do not run the probe-cloaking protocol yet")
        if svc.kind is ServiceKind.AZURE and Protocol.EVASION in suite.protocols:
            raise ConfigError(
                f"{where}: services[{i}]: an azure person group has no gallery search, so it cannot run the "
                "evasion protocol; use kind 'rekognition', or a suite with protocols [poisoning]"
            )
    for key, values in (("recognizers", suite.recognizers), ("seeds", suite.seeds)):
        for i, value in enumerate(values):
            if value in values[:i]:
                raise ConfigError(f"{where}: {key}[{i}]: {quote(value)} repeats {key}[{values.index(value)}]")


class _Refused(yaml.YAMLError):
    """A suite file beyond the loader's limits, or with a key that is not a string, at ``mark``."""

    def __init__(self, problem: str, mark: yaml.Mark) -> None:
        super().__init__(problem)
        self.problem, self.mark = problem, mark


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error (safe_load keeps the last), and a
    document beyond the limits of a suite (deep, huge once aliases are expanded, self-referring) is refused
    after composing and before anything is constructed or walked."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        # composing recurses once per level: refuse before Python's recursion limit is reached
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(_too_deep(), self.peek_event().start_mark)  # type: ignore[no-untyped-call]
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None:
            _measure(node)
        return node


def _too_deep() -> str:
    return f"nested more than {MAX_DEPTH} levels deep (a suite needs about six)"


_INT_TAG = "tag:yaml.org,2002:int"


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _measure(root: yaml.Node) -> None:
    """Refuse a document that is too big or too deep with its aliases expanded, or refers to itself.

    The composed graph shares an aliased node, so it stays small while its expansion (what constructing, walking
    or printing the value costs) can be astronomically large: each node's expanded size and depth are computed
    once (memoised), iteratively, in time proportional to the file."""
    done: dict[int, tuple[int, int]] = {}  # id(node) -> (values, levels) with aliases expanded
    path: set[int] = set()  # nodes whose children are being measured: the ancestors of the current node
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, measured = stack.pop()
        key = id(node)
        if measured:
            kids = _children(node)
            size = 1 + sum(done[id(k)][0] for k in kids)
            depth = 1 + max((done[id(k)][1] for k in kids), default=0)
            path.discard(key)
            done[key] = (size, depth)
            if size > MAX_VALUES:
                raise _Refused(
                    f"the value here expands to more than {MAX_VALUES} values (YAML aliases count each time they "
                    "are used); a suite is far smaller",
                    node.start_mark,
                )
            if depth > MAX_DEPTH:
                raise _Refused(_too_deep() + " with its YAML aliases expanded", node.start_mark)
            continue
        if key in done:
            continue
        if isinstance(node, yaml.ScalarNode):
            _check_scalar(node)
            done[key] = (1, 1)
            continue
        path.add(key)
        stack.append((node, True))
        for kid in _children(node):
            if id(kid) in path:
                raise _Refused(
                    "the value refers to itself (a YAML alias inside its own anchor): it has no end", node.start_mark
                )
            if id(kid) not in done:
                stack.append((kid, False))


def _check_scalar(node: yaml.ScalarNode) -> None:
    text = str(node.value)
    if node.tag == _INT_TAG and len(text) > _INT_TEXT:
        digits = sum(c.isdigit() for c in text)
        raise _Refused(f"an integer of {digits} digits; the largest a suite takes is {INT_MAX}", node.start_mark)
    if len(text) > MAX_SCALAR:
        raise _Refused(f"a value of {len(text)} characters; the longest a suite takes is {MAX_SCALAR}", node.start_mark)


def _key_name(node: yaml.Node, key: Any) -> str:
    """What a key that is not a string is, for the error (``"bool true (quote it: 'true')"``)."""
    if key is None:
        shown = "null"
    elif isinstance(key, (bool, int, float)):
        shown = f"{type(key).__name__} {str(node.value) if isinstance(node, yaml.ScalarNode) else quote(key)}"
    else:
        shown = type(key).__name__
    if isinstance(node, yaml.ScalarNode):
        shown += f" (quote it: {quote(str(node.value))})"
    return shown


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    first_line: dict[str, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor' may repeat keys on purpose
            continue
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):  # every key of a suite is a name; a bool or list key crashed key checks
            raise _Refused(f"a key must be a string, got {_key_name(key_node, key)}", key_node.start_mark)
        if key in first_line:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {quote(key)} (first given on line {first_line[key]})", key_node.start_mark
            )
        first_line[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_error(path: Path, exc: yaml.YAMLError) -> ConfigError:
    """``file: line L, column C: not valid YAML: problem (context at line ...)`` from a PyYAML error."""
    if isinstance(exc, _Refused):
        return ConfigError(f"{path}: line {exc.mark.line + 1}, column {exc.mark.column + 1}: {exc.problem}")
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem_mark is None:
        return ConfigError(f"{path}: not valid YAML: {exc}")
    mark = exc.problem_mark
    context = ""
    if exc.context and exc.context_mark is not None:
        context = f" ({exc.context} at line {exc.context_mark.line + 1}, column {exc.context_mark.column + 1})"
    return ConfigError(
        f"{path}: line {mark.line + 1}, column {mark.column + 1}: not valid YAML: {exc.problem}{context}"
    )


def _read_text(path: Path) -> str:
    """The suite file as text: at most :data:`MAX_FILE_BYTES`, UTF-8 (the error says where the first bad byte is)."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ConfigError(f"{path}: {size} bytes; a suite file is at most {MAX_FILE_BYTES} bytes")
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        start = data.rfind(b"\n", 0, exc.start) + 1
        line = data.count(b"\n", 0, exc.start) + 1
        column = len(data[start : exc.start].decode("utf-8", errors="replace")) + 1
        raise ConfigError(
            f"{path}: line {line}, column {column}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start}); save the suite file as UTF-8"
        ) from None


_SHOWN = 20  # identity names listed in an error


def check_dataset(suite: Suite, where: str) -> None:
    """Cheap checks of a ``source: folder`` dataset that parsing cannot do: the folder exists, the
    ``dataset.names`` file is valid for it, and the protected identities (names after renaming) can be in it
    (their folders exist with 2+ image files; ``count`` is not above the number of such folders). Only names
    are listed, no image is read, so an error here is certain; a folder that passes can still fail at run time
    when its images turn out unreadable."""
    from cloakbench.datasets.folder import list_folder, read_identity_names
    from cloakbench.errors import DatasetError

    path = suite.dataset.path
    if suite.dataset.source is not DatasetSource.FOLDER or path is None:
        return  # the demo set is fetched and built when a run starts
    if not path.is_dir():
        problem = "does not exist" if not path.exists() else "is not a folder"
        raise ConfigError(f"{where}: dataset.path: {path} {problem} (a relative path is relative to the suite file)")
    try:
        listing = list_folder(path)
    except OSError as exc:
        raise ConfigError(f"{where}: dataset.path: {path} cannot be listed: {exc}") from None
    except DatasetError as exc:  # e.g. two identity folders that differ only in Unicode normalisation
        raise ConfigError(f"{where}: dataset.path: {exc}") from None
    names: dict[str, str] = {}
    if suite.dataset.names is not None:
        try:
            names = read_identity_names(suite.dataset.names, path)
        except DatasetError as exc:
            raise ConfigError(f"{where}: dataset.names: {exc}") from None
    photos: dict[str, int] = {}
    for entry in listing.candidates:
        name = names.get(entry.identity, entry.identity)
        photos[name] = photos.get(name, 0) + 1
    usable = sorted(name for name, n in photos.items() if n >= 2)
    identities = {names.get(folder, folder) for folder in listing.identities}
    protected = suite.protected
    if protected.identities != "all":
        for i, name in enumerate(protected.identities):
            if name not in usable:
                if name in identities:
                    why = f"has fewer than 2 image files in {path}"
                elif name in names:
                    why = f"is a folder in {path} that dataset.names renames to {names[name]!r}; use that name"
                else:
                    why = f"is not an identity folder in {path}" + (" nor a name from dataset.names" if names else "")
                shown = ", ".join(usable[:_SHOWN]) + (f", ... ({len(usable)} in all)" if len(usable) > _SHOWN else "")
                raise ConfigError(
                    f"{where}: protected.identities[{i}]: {name!r} {why} (identities with 2+ photos: {shown or 'none'})"
                )
    elif protected.count is not None and protected.count > len(usable):
        raise ConfigError(
            f"{where}: protected.count: {protected.count} asked for, but {path} has only {len(usable)} identity "
            "folder(s) with 2+ image files"
        )


def _beside(suite_file: Path, value: Path | None) -> Path | None:
    """A relative path from a suite file made absolute against the file's folder."""
    return (suite_file.parent / value).resolve() if value is not None and not value.is_absolute() else value


def load_suite(path: Path) -> Suite:
    """Read and validate a suite YAML file (safe loader, duplicate keys rejected; see :func:`check_dataset`)."""
    if not path.is_file():
        raise ConfigError(f"{path}: suite file not found")
    try:
        data = yaml.load(_read_text(path), Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise _yaml_error(path, exc) from None
    suite = parse_suite(data, where=str(path), base=path.parent)
    # relative dataset paths are relative to the suite file, not to wherever the command was started
    dataset = dataclasses.replace(
        suite.dataset, path=_beside(path, suite.dataset.path), names=_beside(path, suite.dataset.names)
    )
    if dataset != suite.dataset:
        suite = dataclasses.replace(suite, dataset=dataset)
    check_dataset(suite, str(path))
    return check_file_defenses(suite, path)


def check_file_defenses(suite: Suite, suite_file: Path) -> Suite:
    """Defenses that read files made for the dataset's photos (``precomputed``: their registry entry takes the
    photos' ``sources``): ``params.path`` made absolute against the suite file's folder and checked to be a folder
    outside ``dataset.path``, on a folder dataset, before any work starts."""
    from cloakbench.defenses import DEFENSES

    where = str(suite_file)
    specs = []
    for i, d in enumerate(suite.defenses):
        if "sources" not in DEFENSES.get(d.name).runtime_args or "path" not in d.params:
            specs.append(d)
            continue
        if suite.dataset.source is not DatasetSource.FOLDER or suite.dataset.path is None:
            raise ConfigError(
                f"{where}: defenses[{i}]: {quote(d.name)} reads cloaked files made for the photos of a folder dataset; "
                "use dataset source 'folder'"
            )
        folder = _beside(suite_file, Path(d.params["path"]))
        assert folder is not None
        if not folder.is_dir():
            problem = "does not exist" if not folder.exists() else "is not a folder"
            raise ConfigError(
                f"{where}: defenses[{i}].params.path: {folder} {problem} "
                "(a relative path is relative to the suite file)"
            )
        if folder.resolve().is_relative_to(suite.dataset.path.resolve()):
            raise ConfigError(
                f"{where}: defenses[{i}].params.path: {folder} is inside dataset.path {suite.dataset.path}, so its "
                "files would be read as dataset photos; keep the cloaked photos in a folder of their own"
            )
        specs.append(dataclasses.replace(d, params={**d.params, "path": str(folder)}))
    return dataclasses.replace(suite, defenses=tuple(specs))


def builtin_suite_path(name: str) -> Path | None:
    """Path of a suite shipped with cloakbench (``suites/<name>.yaml``), or None."""
    from importlib import resources

    candidate = resources.files("cloakbench.suites").joinpath(f"{name}.yaml")
    return Path(str(candidate)) if candidate.is_file() else None


def builtin_suites() -> list[str]:
    from importlib import resources

    return sorted(
        p.name[: -len(".yaml")] for p in resources.files("cloakbench.suites").iterdir() if p.name.endswith(".yaml")
    )
