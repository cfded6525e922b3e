"""ArcFace-family ONNX recognizers through insightface's model zoo, with an explicit input contract.

insightface's ``ArcFaceONNX`` expects BGR ``uint8`` images (it swaps to RGB inside ``get_feat``) and
*guesses* the network's normalisation from the names of the first graph nodes: ``Sub``/``Mul`` near the
top means "0..255 in, normalised inside", anything else means ``(x - 127.5) / 127.5``. The guess goes
wrong silently for files whose first nodes are something else: SFace's int8 file starts with
``DequantizeLinear`` nodes, so insightface feeds it ``(x - 127.5) / 127.5`` although it needs 0..255
(cloakbench measured this: insightface 2.1 reports mean 127.5, std 127.5 for it).

:class:`InsightfaceRecognizer` therefore takes the normalisation from an explicit :class:`InputSpec`,
compares insightface's guess with it, and either overrides the guess (recording that it did,
``guess_overridden``) or, with ``strict=True``, refuses. Colour order is handled here too: canonical RGB
images are converted to BGR uint8 (rounded) before ``get_feat``, which swaps them back, so the network
receives RGB as declared. Without insightface installed the same file runs through cloakbench's own
onnxruntime path with the same spec (same numbers; a test checks both).

Named packs (``buffalo_l``: ArcFace R50 ``w600k_r50.onnx``; ``antelopev2``: R100 ``glintr100.onnx``) are
downloaded by insightface on first use where its release site is reachable.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cloakbench.attacks.recognizers.base import Alignment, Capabilities, ChannelOrder, InputSpec, Recognizer
from cloakbench.attacks.recognizers.onnx_runtime import (
    OnnxRecognizer,
    provider_options_for,
    providers_for,
    usable_providers,
    warn_on_fallback,
)
from cloakbench.errors import ConfigError, FetchError
from cloakbench.fetch import sha256_file
from cloakbench.images import to_uint8

log = logging.getLogger(__name__)

ARCFACE_SPEC = InputSpec(
    size=(112, 112),
    channel_order=ChannelOrder.RGB,
    scale=255.0,
    mean=(127.5, 127.5, 127.5),
    std=(127.5, 127.5, 127.5),
    alignment=Alignment.ARCFACE_112,
    note="insightface ArcFace packs: RGB into the network, (x - 127.5) / 127.5",
)

PACKS: dict[str, str] = {"buffalo_l": "w600k_r50.onnx", "antelopev2": "glintr100.onnx"}
"""insightface model packs and the recognition file inside each."""


def _spec_mean_std(spec: InputSpec) -> tuple[float, float]:
    """The single (mean, std) on the 0..255 scale that insightface can express, or an error."""
    if len(set(spec.mean)) != 1 or len(set(spec.std)) != 1:
        raise ConfigError(f"insightface applies one mean/std to all channels; spec has {spec.mean}, {spec.std}")
    return spec.mean[0] * 255.0 / spec.scale, spec.std[0] * 255.0 / spec.scale


class InsightfaceRecognizer(Recognizer):
    """A black-box recognizer running an ArcFace-family ONNX file via insightface's ``ArcFaceONNX``."""

    def __init__(
        self, *, name: str, path: Path, spec: InputSpec, embedding_dim: int, strict: bool = False, weights_id: str = "",
        device: str | torch.device = "cpu",
    ) -> None:  # fmt: skip
        """``device``: the onnxruntime providers follow it (:func:`~.onnx_runtime.providers_for`: CUDA first on
        ``cuda``, else the CPU alone). insightface's own default takes CUDA whenever onnxruntime has it, whatever
        the suite's device, so the providers are always passed explicitly."""
        import insightface  # optional dependency: `pip install cloakbench[insightface]`
        import onnxruntime as ort

        if spec.channel_order is not ChannelOrder.RGB:
            raise ConfigError(f"{name}: insightface feeds RGB to the network; declare channel_order rgb")
        self.name = name
        self.spec = spec
        self.embedding_dim = embedding_dim
        self.weights_id = weights_id or f"{path.name}:{sha256_file(path)[:16]}"
        asked = providers_for(device)
        providers = usable_providers(asked, ort.get_available_providers())
        model: Any = insightface.model_zoo.get_model(
            str(path), providers=providers, provider_options=provider_options_for(device, providers)
        )
        if model is None or not hasattr(model, "get_feat"):
            raise ConfigError(f"{path}: insightface does not load it as a recognition model ({type(model).__name__})")
        mean, std = _spec_mean_std(spec)
        guess = (float(model.input_mean), float(model.input_std), tuple(model.input_size))
        wanted = (mean, std, (spec.size[1], spec.size[0]))
        self.insightface_guess = {"mean": guess[0], "std": guess[1], "size": list(guess[2])}
        self.guess_overridden = guess != wanted
        if self.guess_overridden:
            message = (
                f"{name}: insightface guessed mean={guess[0]} std={guess[1]} size={guess[2]} for {path.name}, "
                f"the declared spec says mean={mean} std={std} size={wanted[2]}"
            )
            if strict:
                raise ConfigError(message + " (strict: refusing to run)")
            log.warning("%s; using the declared spec", message)
            model.input_mean, model.input_std = mean, std
        self.model = model
        self.providers_used = tuple(model.session.get_providers())
        warn_on_fallback(name, asked, self.providers_used)
        self.capabilities = Capabilities(
            differentiable=False, batched=True, devices=("cpu",), gradient_free_reason="insightface ONNX session"
        )

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Only the resize: insightface applies channel order and normalisation itself (checked above)."""
        if tuple(images.shape[-2:]) != self.spec.size:
            images = F.interpolate(images, size=self.spec.size, mode="bilinear", align_corners=False, antialias=True)
        return images.clamp(0.0, 1.0)

    def _forward(self, model_input: torch.Tensor) -> torch.Tensor:
        bgr = [np.ascontiguousarray(img[:, :, ::-1]) for img in to_uint8(model_input)]
        out = np.asarray(self.model.get_feat(bgr), dtype=np.float32)
        return torch.from_numpy(out).reshape(len(bgr), -1)

    def describe(self) -> dict[str, object]:
        return {
            **super().describe(),
            "insightface_guess": self.insightface_guess,
            "guess_overridden": self.guess_overridden,
        }


def onnx_recognizer(
    path: str | os.PathLike[str],
    *,
    spec: InputSpec = ARCFACE_SPEC,
    embedding_dim: int = 512,
    name: str | None = None,
    strict: bool = False,
    device: str = "cpu",
) -> Recognizer:
    """Any ArcFace-family ONNX file: through insightface when it is installed, else onnxruntime directly; on
    either path the onnxruntime providers follow ``device`` (CUDA first on ``cuda``)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"ONNX recognizer file {file} does not exist")
    label = name or f"onnx:{file.stem}"
    try:
        import insightface  # noqa: F401
    except ImportError:
        log.info("insightface is not installed; running %s with onnxruntime and the declared spec", file)
        return OnnxRecognizer(name=label, path=file, spec=spec, embedding_dim=embedding_dim, device=device)
    return InsightfaceRecognizer(
        name=label, path=file, spec=spec, embedding_dim=embedding_dim, strict=strict, device=device
    )


def pack_cached(pack: str, *, root: str = "~/.insightface") -> bool:
    return (Path(root).expanduser() / "models" / pack / PACKS[pack]).is_file()


def insightface_pack(pack: str, *, root: str = "~/.insightface", device: str = "cpu") -> Recognizer:
    """The recognition model of an insightface pack, downloaded by insightface on first use."""
    if pack not in PACKS:
        raise ConfigError(f"unknown insightface pack {pack!r} (known: {', '.join(PACKS)})")
    try:
        from insightface.utils import storage
    except ImportError as exc:
        raise FetchError(f"insightface pack {pack!r} needs insightface: pip install 'cloakbench[insightface]'") from exc
    folder = Path(root).expanduser() / "models" / pack
    file = folder / PACKS[pack]
    if not file.is_file():
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # insightface prints its progress
                storage.ensure_available("models", pack, root=root)
        except Exception as exc:  # network failures come in many types from requests/urllib
            raise FetchError(
                f"insightface could not download the {pack!r} pack ({type(exc).__name__}: {exc}). Put the unzipped "
                f"pack in {folder} by hand (it must contain {PACKS[pack]}), or use `onnx_recognizer(PATH)` on the file."
            ) from exc
    return onnx_recognizer(file, spec=ARCFACE_SPEC, embedding_dim=512, name=f"insightface-{pack}", device=device)
