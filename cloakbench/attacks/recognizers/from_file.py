"""Recognizers from a file: an ONNX or TorchScript embedding model named in a suite, without writing code.

A suite may put a mapping wherever a recognizer name goes (``recognizers``, ``defenses[].surrogates``,
``services[].backend``, or the top-level ``models`` list)::

    {name: my-arcface, onnx: arcface.onnx, input: {size: 112, colour: rgb, scale: 255,
                                                   mean: [127.5, 127.5, 127.5], std: [127.5, 127.5, 127.5]}}
    {name: my-model, torchscript: model.pt, input: {size: 160, colour: rgb, mean: [0.5, 0.5, 0.5],
                                                    std: [0.5, 0.5, 0.5], layout: nchw}}

- ``onnx``: a black box run by onnxruntime (:class:`OnnxFileRecognizer`, built on
  :class:`~cloakbench.attacks.recognizers.onnx_runtime.OnnxRecognizer`): a recognizer, never a surrogate;
- ``torchscript``: a white box (:class:`TorchScriptFileRecognizer`, a
  :class:`~cloakbench.attacks.recognizers.base.TorchRecognizer`): gradients reach the input, so it can be a
  defense's surrogate and a model adaptation can retrain it.

The ``input`` mapping (:class:`FileInput`) states the model's input contract explicitly, as every zoo entry's
:class:`~cloakbench.attacks.recognizers.base.InputSpec` does: canonical images (float32 [B, 3, H, W], RGB, [0, 1])
are resized to ``size``, put in ``colour`` order, multiplied by ``scale`` and normalised per channel,
``(x * scale - mean) / std``, then laid out as ``layout`` (``nhwc`` permutes to [B, H, W, 3]). Nothing is guessed
from the file. The model's output must be one float tensor [B, D]; embeddings are L2-normalised by the base class.

:func:`parse_file_model` validates such a mapping before any work starts (every error a
:class:`~cloakbench.errors.ConfigError` naming the key path and value): the keys and the input spec, that the file
exists and is an ONNX / TorchScript file whose input fits the spec, and, running it once on two synthetic images,
that its output is a finite [B, D]. It returns the resolved :class:`FileModel`: absolute path, the file's SHA-256
(given, it is a pin the file must match) and ``embedding_dim`` (given, it must match the output). The SHA-256 and
the input spec make :attr:`FileModel.weights_id`, so cached embeddings and cloaks key on the file's content, not
its path. :func:`load_file_model` builds the recognizer at run time and refuses a file whose content changed since
validation.

Where names resolve: a suite's file models live in the suite (``Suite.models``), not in the process-wide
``RECOGNIZERS`` registry: the suite is the scope of its names (two suites in one process may each have a
``my-model``), and a suite sent to another process (a Ray worker) carries its models with it. A file model's name
must not be a registered recognizer's, so a name always means one model.

Loading a TorchScript or ONNX file runs its graph (not Python code, but still code-like): use files you trust.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cloakbench.attacks.recognizers.base import Alignment, ChannelOrder, InputSpec, Recognizer, TorchRecognizer
from cloakbench.attacks.recognizers.onnx_runtime import OnnxRecognizer
from cloakbench.config import build, quote, require, stable_hash, to_plain
from cloakbench.errors import ConfigError
from cloakbench.fetch import sha256_file

FORMATS = ("onnx", "torchscript")
"""The keys that make a mapping a model from a file (exactly one of them names the file)."""

MAX_SIZE = 4096
"""The largest input side a file model may declare (pixels)."""

PROBE_SIZE = 112
"""Side of the synthetic canonical images the validation probe runs (the project's aligned crop size)."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class Layout(enum.Enum):
    NCHW = "nchw"  # [B, 3, H, W] (PyTorch, most ONNX exports)
    NHWC = "nhwc"  # [B, H, W, 3] (TensorFlow/Keras exports)


class FileFormat(enum.Enum):
    ONNX = "onnx"
    TORCHSCRIPT = "torchscript"


@dataclass(frozen=True, kw_only=True)
class FileInput:
    """What the file's model takes (the suite's ``input`` mapping)."""

    size: int | tuple[int, int]  # one side (square) or [height, width]; stored as (height, width)
    colour: ChannelOrder
    mean: tuple[float, float, float]  # per channel, on the scaled values (after x * scale)
    std: tuple[float, float, float]
    scale: float = 1.0  # canonical pixel values in [0, 1] are multiplied by this first (255: a 0..255 model)
    layout: Layout = Layout.NCHW
    alignment: Alignment = Alignment.ARCFACE_112
    flip_tta: bool = False

    def __post_init__(self) -> None:
        size = (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)
        require(
            len(size) == 2 and all(1 <= s <= MAX_SIZE for s in size),
            f"size must be a positive side or [height, width], each 1..{MAX_SIZE} pixels, got {quote(self.size)}",
        )
        object.__setattr__(self, "size", size)
        require(self.scale > 0, f"scale must be positive, got {self.scale:g}")
        for i, s in enumerate(self.std):
            require(s > 0, f"std must be positive in every channel, got {list(self.std)} (std[{i}] = {s:g})")
        for i, m in enumerate(self.mean):
            hint = " (mean is on the scaled values: with mean in 0..255, set scale: 255)" if m > self.scale else ""
            require(
                0 <= m <= self.scale,
                f"mean must lie in [0, {self.scale:g}] (the pixel range after x * scale), got {list(self.mean)} "
                f"(mean[{i}] = {m:g}){hint}",
            )

    @property
    def hw(self) -> tuple[int, int]:
        size = self.size
        return (size, size) if isinstance(size, int) else size

    def spec(self, note: str) -> InputSpec:
        return InputSpec(
            size=self.hw,
            channel_order=self.colour,
            scale=self.scale,
            mean=self.mean,
            std=self.std,
            alignment=self.alignment,
            flip_tta=self.flip_tta,
            note=note,
        )


@dataclass(frozen=True, kw_only=True)
class FileModel:
    """A recognizer defined by a file: exactly one of ``onnx`` and ``torchscript`` names it."""

    name: str
    input: FileInput
    onnx: Path | None = None
    torchscript: Path | None = None
    sha256: str = ""  # the file's SHA-256: filled in by validation; given, the file must have it
    embedding_dim: int | None = None  # D of the [B, D] output: filled in by validation; given, it must match

    def __post_init__(self) -> None:
        require(
            _NAME.fullmatch(self.name) is not None,
            f"name must be 1 to 100 ASCII letters, digits, '.', '_' or '-', starting with a letter or digit, "
            f"got {quote(self.name)}",
        )
        require(
            (self.onnx is None) != (self.torchscript is None),
            "give exactly one of 'onnx: FILE' (a black box) and 'torchscript: FILE' (a white box)",
        )
        require(
            self.sha256 == "" or _SHA256.fullmatch(self.sha256) is not None,
            f"sha256 must be 64 lowercase hex digits, got {quote(self.sha256)}",
        )
        require(
            self.embedding_dim is None or self.embedding_dim >= 1,
            f"embedding_dim must be >= 1, got {self.embedding_dim}",
        )

    @property
    def format(self) -> FileFormat:
        return FileFormat.ONNX if self.onnx is not None else FileFormat.TORCHSCRIPT

    @property
    def path(self) -> Path:
        path = self.onnx if self.onnx is not None else self.torchscript
        assert path is not None  # __post_init__: exactly one is set
        return path

    @property
    def white_box(self) -> bool:
        """TorchScript: gradients reach the input (a surrogate, retrainable); ONNX: a black box."""
        return self.format is FileFormat.TORCHSCRIPT

    @property
    def weights_id(self) -> str:
        """The file's content and the input spec it runs with: part of every cache key on this model."""
        require(self.sha256 != "", f"file model {self.name!r} has not been validated (no sha256)")
        return f"file-{self.format.value}:{self.sha256[:16]}:input-{stable_hash(to_plain(self.input), length=8)}"


def is_file_model(value: Any) -> bool:
    """Whether a suite value is a model-from-a-file mapping (it has an ``onnx`` or ``torchscript`` key)."""
    return isinstance(value, Mapping) and any(k in value for k in FORMATS)


class OnnxFileRecognizer(OnnxRecognizer):
    """An ONNX file run by onnxruntime under a declared :class:`FileInput` (a black box).

    The graph must have one float input of rank 4 and one output. A batch dimension fixed at 1 is run one image
    at a time; declared static height/width must match ``input.size`` in the declared layout."""

    def __init__(
        self,
        *,
        model: FileModel,
        embedding_dim: int,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(
            name=model.name,
            path=model.path,
            spec=model.input.spec(f"ONNX file {model.path.name}, layout {model.input.layout.value}"),
            embedding_dim=embedding_dim,
            providers=providers,
            weights_id=model.weights_id,
            device=device,  # when given, the providers follow it (onnx_runtime.providers_for)
        )
        self.layout = model.input.layout
        self.sha256 = model.sha256
        outputs = [o.name for o in self.session.get_outputs()]
        if len(outputs) != 1:
            raise ConfigError(f"the graph has {len(outputs)} outputs {outputs[:5]}; a file model has one, [B, D]")
        graph_input = self.session.get_inputs()[0]
        if graph_input.type != "tensor(float)":
            raise ConfigError(f"the graph input {graph_input.name!r} is {graph_input.type}; it must be tensor(float)")
        shape = list(graph_input.shape)
        if len(shape) != 4:
            raise ConfigError(f"the graph input {graph_input.name!r} has shape {shape}; a face model takes rank 4")
        h, w = model.input.hw
        expected = [h, w, 3] if self.layout is Layout.NHWC else [3, h, w]
        for got, want in zip(shape[1:], expected, strict=True):
            if isinstance(got, int) and got > 0 and got != want:
                raise ConfigError(
                    f"the graph input {graph_input.name!r} has shape {shape}, which does not take "
                    f"layout {self.layout.value} at size {h}x{w} (expected [B, {', '.join(map(str, expected))}])"
                )
        batch = shape[0]
        if isinstance(batch, int) and batch > 1:
            raise ConfigError(f"the graph input {graph_input.name!r} has a fixed batch of {batch} (shape {shape})")
        self.one_at_a_time = batch == 1
        self.capabilities = replace(self.capabilities, batched=not self.one_at_a_time)

    def _forward(self, model_input: torch.Tensor) -> torch.Tensor:
        x = model_input.permute(0, 2, 3, 1) if self.layout is Layout.NHWC else model_input
        array = np.ascontiguousarray(x.detach().cpu().numpy().astype(np.float32, copy=False))
        if self.one_at_a_time:
            parts = [self.session.run(None, {self.input_name: array[i : i + 1]})[0] for i in range(array.shape[0])]
            out = np.concatenate([np.asarray(p, dtype=np.float32) for p in parts]) if parts else np.zeros((0, 0))
        else:
            out = np.asarray(self.session.run(None, {self.input_name: array})[0], dtype=np.float32)
        _check_output(out.shape, array.shape[0], self.name)
        return torch.from_numpy(np.ascontiguousarray(out))

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "format": "onnx", "sha256": self.sha256, "layout": self.layout.value}


class _Layout(torch.nn.Module):
    """The loaded TorchScript module, fed [B, H, W, 3] when its layout is NHWC."""

    def __init__(self, net: torch.nn.Module, layout: Layout) -> None:
        super().__init__()
        self.net = net
        self.nhwc = layout is Layout.NHWC

    def forward(self, x: torch.Tensor) -> Any:
        return self.net(x.permute(0, 2, 3, 1) if self.nhwc else x)


class TorchScriptFileRecognizer(TorchRecognizer):
    """A TorchScript file under a declared :class:`FileInput`: a white box (gradients reach the input)."""

    def __init__(self, *, model: FileModel, net: torch.nn.Module, embedding_dim: int) -> None:
        super().__init__(
            name=model.name,
            module=_Layout(net, model.input.layout),
            spec=model.input.spec(f"TorchScript file {model.path.name}, layout {model.input.layout.value}"),
            embedding_dim=embedding_dim,
            weights_id=model.weights_id,
        )
        self.layout = model.input.layout
        self.sha256 = model.sha256

    def _forward(self, model_input: torch.Tensor) -> torch.Tensor:
        out = self.module(model_input)
        if not isinstance(out, torch.Tensor):
            raise ConfigError(f"file model {self.name!r} returned a {type(out).__name__}, not a tensor [B, D]")
        _check_output(tuple(out.shape), model_input.shape[0], self.name)
        return out

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "format": "torchscript", "sha256": self.sha256, "layout": self.layout.value}


def _check_output(shape: Sequence[int], batch: int, name: str) -> None:
    if len(shape) != 2 or shape[0] != batch or shape[1] < 1:
        raise ConfigError(f"file model {name!r} returned shape {list(shape)} for {batch} images, expected [B, D]")


def _file_kind_hint(path: Path, wanted: FileFormat) -> str:
    """Why a file may have failed to load: what its first bytes look like."""
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except OSError:
        return ""
    if head.startswith(b"PK\x03\x04"):  # a zip archive: TorchScript or a torch.save checkpoint
        if wanted is FileFormat.ONNX:
            return " (it is a zip archive, as TorchScript and torch.save files are: use the 'torchscript' key?)"
        return (
            " (a torch.save checkpoint or state_dict is not TorchScript: save the model with "
            "torch.jit.trace(model, example).save(path) or torch.jit.script(model).save(path))"
        )
    if wanted is FileFormat.TORCHSCRIPT and head[:1] == b"\x08":  # protobuf field 1 (ir_version): likely ONNX
        return " (it looks like an ONNX file: use the 'onnx' key?)"
    return ""


def _build(model: FileModel, embedding_dim: int, device: str) -> Recognizer:
    """Load the file as the model's format says (errors become ConfigError naming the file)."""
    path = model.path
    fmt = model.format
    if fmt is FileFormat.ONNX:
        try:
            return OnnxFileRecognizer(model=model, embedding_dim=embedding_dim, device=device)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except Exception as exc:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(
                f"{path}: not a usable ONNX model (onnxruntime: {first}){_file_kind_hint(path, fmt)}"
            ) from None
    try:
        net = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    except Exception as exc:  # torch raises RuntimeError/ValueError with a C++ message
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"{path}: not a TorchScript file (torch.jit.load: {first}){_file_kind_hint(path, fmt)}"
        ) from None
    rec = TorchScriptFileRecognizer(model=model, net=net, embedding_dim=embedding_dim)
    if device != "cpu":
        rec.to(device)
    return rec


def _probe_images() -> torch.Tensor:
    """Two synthetic canonical images (deterministic ramps, different from each other), [2, 3, 112, 112]."""
    n = 2 * 3 * PROBE_SIZE * PROBE_SIZE
    ramp = torch.linspace(0.0, 1.0, n, dtype=torch.float32).reshape(2, 3, PROBE_SIZE, PROBE_SIZE)
    return torch.stack([ramp[0], ramp[1].flip(-1)])


def _probe(rec: Recognizer) -> int:
    """Run the model once on :func:`_probe_images`; its D, or a ConfigError saying what is wrong."""
    images = _probe_images()
    try:
        with torch.inference_mode():
            raw = rec._forward(rec.preprocess(images.to(rec.device)))
    except ConfigError:
        raise
    except Exception as exc:  # a graph that cannot run this input: shape, dtype, layout
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"running it on 2 images at the declared input ({rec.spec.size[0]}x{rec.spec.size[1]}) failed: "
            f"{type(exc).__name__}: {first[:300]}"
        ) from None
    if not bool(torch.isfinite(raw).all()):
        raise ConfigError("its output holds NaN or infinite values for a plain test image")
    if bool((raw.abs().sum(dim=1) == 0).any()):
        raise ConfigError("its output is all zeros for a test image (no direction to normalise)")
    return int(raw.shape[1])


def parse_file_model(item: Mapping[str, Any], *, where: str, base: Path | None = None) -> FileModel:
    """Validate a suite's model-from-a-file mapping and resolve it (see the module docstring).

    ``where`` is the key path for errors (``"suite.yaml: recognizers[1]"``); relative paths are relative to
    ``base`` (the suite file's folder; default: the working directory)."""
    from cloakbench.attacks.recognizers.zoo import RECOGNIZERS

    if not isinstance(item, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(item).__name__} {quote(item)}")
    raw_input = item.get("input")
    if raw_input is None:
        raise ConfigError(f"{where}: missing required key 'input' (size, colour, mean, std; see docs/suites.md)")
    if not isinstance(raw_input, Mapping):
        raise ConfigError(f"{where}.input: expected a mapping, got {type(raw_input).__name__} {quote(raw_input)}")
    spec_input = build(FileInput, raw_input, where=f"{where}.input")
    model = build(FileModel, {**item, "input": spec_input}, where=where)
    if model.name in RECOGNIZERS:
        raise ConfigError(
            f"{where}.name: {model.name!r} is a registered recognizer (cloakbench list recognizers); "
            "give the file model another name"
        )
    key = model.format.value
    path = model.path.expanduser()
    if not path.is_absolute():
        path = (base if base is not None else Path.cwd()) / path
    path = path.resolve()
    if not path.is_file():
        problem = "does not exist" if not path.exists() else "is not a file"
        raise ConfigError(f"{where}.{key}: {path} {problem} (a relative path is relative to the suite file)")
    try:
        digest = sha256_file(path)
    except OSError as exc:
        raise ConfigError(f"{where}.{key}: {path} cannot be read: {exc.strerror or exc}") from None
    if model.sha256 and model.sha256 != digest:
        raise ConfigError(f"{where}.sha256: {path} has SHA-256 {digest}, not the pinned {model.sha256}")
    model = (
        replace(model, onnx=path, sha256=digest) if key == "onnx" else replace(model, torchscript=path, sha256=digest)
    )
    try:
        rec = _build(model, model.embedding_dim or 1, "cpu")
        dim = _probe(rec)
    except ConfigError as exc:
        raise ConfigError(f"{where}.{key}: {exc}") from None
    if model.embedding_dim is not None and model.embedding_dim != dim:
        raise ConfigError(f"{where}.embedding_dim: {model.embedding_dim} given, but {path} outputs [B, {dim}]")
    return replace(model, embedding_dim=dim)


def load_file_model(model: FileModel, *, device: str = "cpu") -> Recognizer:
    """Build a validated :class:`FileModel`'s recognizer; its file must still have the validated SHA-256."""
    if not model.sha256 or model.embedding_dim is None:
        raise ConfigError(f"file model {model.name!r} has not been validated (parse_file_model resolves it)")
    path = model.path
    try:
        digest = sha256_file(path)
    except OSError as exc:
        raise ConfigError(f"file model {model.name!r}: {path} cannot be read: {exc.strerror or exc}") from None
    if digest != model.sha256:
        raise ConfigError(
            f"file model {model.name!r}: {path} changed since the suite was validated (SHA-256 {digest}, "
            f"validated {model.sha256}); validate the suite again"
        )
    return _build(model, model.embedding_dim, device)


def recognizer_from_file(item: Mapping[str, Any], *, base: Path | None = None, device: str = "cpu") -> Recognizer:
    """A recognizer from a suite-style mapping in code (``{name, onnx | torchscript, input}``): validated, then
    built, e.g. as a surrogate for ``DEFENSES.create("pgd", surrogates=[...])``."""
    name = item.get("name", "?") if isinstance(item, Mapping) else "?"
    return load_file_model(parse_file_model(item, where=f"file model {quote(name)}", base=base), device=device)
