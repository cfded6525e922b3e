"""Black-box recognizers backed by an onnxruntime session.

The session's input contract is stated in an explicit :class:`InputSpec`; nothing is inferred from node
names or shapes. The providers onnxruntime actually uses are recorded (a silent fallback from CUDA to CPU
is a classic way to report wrong timings).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cloakbench.attacks.recognizers.base import Capabilities, InputSpec, Recognizer


class OnnxRecognizer(Recognizer):
    """A recognizer running an ONNX file in onnxruntime; not differentiable."""

    def __init__(
        self,
        *,
        name: str,
        path: Path,
        spec: InputSpec,
        embedding_dim: int,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int | None = None,
        weights_id: str = "",
    ) -> None:
        import onnxruntime as ort  # imported here: only black-box users pay for it

        self.name = name
        self.weights_id = weights_id
        self.spec = spec
        self.embedding_dim = embedding_dim
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads is not None:
            options.intra_op_num_threads = threads
        available = set(ort.get_available_providers())
        wanted = [p for p in providers if p in available] or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=wanted)
        self.providers_used = tuple(self.session.get_providers())
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
