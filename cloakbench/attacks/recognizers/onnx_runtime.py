"""Black-box recognizers backed by an onnxruntime session.

The session's input contract is stated in an explicit :class:`InputSpec`; nothing is inferred from node
names or shapes. The providers onnxruntime actually uses are recorded (a silent fallback from CUDA to CPU
is a classic way to report wrong timings).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from cloakbench.attacks.recognizers.base import Capabilities, InputSpec, Recognizer

log = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"


def providers_for(device: str | torch.device) -> tuple[str, ...]:
    """The onnxruntime execution providers, in order of preference, that follow a suite's device: CUDA then CPU
    on ``cuda``/``cuda:N``, the CPU alone elsewhere. onnxruntime takes the first one it can run each node on,
    so the CPU stays as the fallback; what it actually used is read back from the session (``providers_used``).
    The CUDA provider runs on GPU 0 unless told otherwise (:func:`provider_options_for`)."""
    return (CUDA_PROVIDER, CPU_PROVIDER) if torch.device(device).type == "cuda" else (CPU_PROVIDER,)


def provider_options_for(device: str | torch.device, providers: Sequence[str]) -> list[dict[str, str]]:
    """One options dict per provider: ``device_id`` for the CUDA provider when the device names a GPU index."""
    index = torch.device(device).index
    return [{"device_id": str(index)} if p == CUDA_PROVIDER and index is not None else {} for p in providers]


def usable_providers(wanted: Iterable[str], available: Iterable[str]) -> list[str]:
    """``wanted`` in its order, less what this onnxruntime build lacks (the CPU build has no CUDA provider);
    the CPU provider when nothing is left."""
    have = set(available)
    return [p for p in wanted if p in have] or [CPU_PROVIDER]


def warn_on_fallback(name: str, wanted: Sequence[str], used: Sequence[str]) -> None:
    """Log (warning) when the first provider asked for is not what the session runs: the silent CUDA-to-CPU
    fallback that makes timings wrong. The metadata records ``providers_used`` either way."""
    if wanted and (not used or used[0] != wanted[0]):
        log.warning("%s: onnxruntime runs on %s, not %s (this build or machine lacks it)", name, list(used), wanted[0])


class OnnxRecognizer(Recognizer):
    """A recognizer running an ONNX file in onnxruntime; not differentiable."""

    def __init__(
        self,
        *,
        name: str,
        path: Path,
        spec: InputSpec,
        embedding_dim: int,
        providers: Sequence[str] = (CPU_PROVIDER,),
        threads: int | None = None,
        weights_id: str = "",
        device: str | torch.device | None = None,
    ) -> None:
        """``device`` (when given) chooses the providers (:func:`providers_for`) and the CUDA device id, and
        overrides ``providers``."""
        import onnxruntime as ort  # imported here: only black-box users pay for it

        self.name = name
        self.weights_id = weights_id
        self.spec = spec
        self.embedding_dim = embedding_dim
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads is not None:
            options.intra_op_num_threads = threads
        if device is not None:
            providers = providers_for(device)
        wanted = usable_providers(providers, ort.get_available_providers())
        options_per_provider = provider_options_for(device if device is not None else "cpu", wanted)
        self.session = ort.InferenceSession(
            str(path), sess_options=options, providers=wanted, provider_options=options_per_provider
        )
        self.providers_used = tuple(self.session.get_providers())
        warn_on_fallback(name, list(providers), self.providers_used)
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            names = [i.name for i in inputs]
            raise ValueError(f"{path}: expected exactly one graph input, found {len(names)}: {names[:5]}...")
        self.input_name = inputs[0].name
        self.capabilities = Capabilities(
            differentiable=False,
            batched=True,
            devices=("cpu",),
            gradient_free_reason="onnxruntime session",
        )

    def _forward(self, model_input: torch.Tensor) -> torch.Tensor:
        array = model_input.detach().cpu().numpy().astype(np.float32, copy=False)
        (out,) = self.session.run(None, {self.input_name: np.ascontiguousarray(array)})
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).reshape(array.shape[0], -1)
