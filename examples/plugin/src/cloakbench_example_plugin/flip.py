"""A zoo recognizer behind another input pipeline: horizontal-flip test-time augmentation.

The tracker embeds each photo and its mirror image with the same model and sums the two embeddings before
normalising them, as ArcFace's and insightface's evaluation code do. It costs a tracker nothing but a second
forward pass, and a cloak optimised on the plain model meets a model that also sees the cloak mirrored. The
augmentation is declared in the :class:`~cloakbench.api.InputSpec` (``flip_tta=True``), where cloakbench's
recognizer contract applies it and ``cloakbench list`` shows it; nothing is hidden.

The weights are the zoo model's own (fetched, SHA-256 checked and cached by cloakbench), so the recognizer keeps
its ``weights_id``: a cloak made on ``sface`` is not *oblivious* to ``sface-flip`` (same weights, as for
``sface-onnx``), and its embeddings are cached under its own name and input description.
"""

from __future__ import annotations

import dataclasses

from cloakbench.api import TorchRecognizer, create_recognizer


def flip_tta(base: str = "sface") -> TorchRecognizer:
    """The white-box zoo recognizer ``base`` with flip test-time augmentation, named ``<base>-flip``."""
    model = create_recognizer(base)
    if not isinstance(model, TorchRecognizer):
        raise TypeError(f"flip_tta needs a white-box (PyTorch) zoo recognizer; {base!r} is {type(model).__name__}")
    spec = dataclasses.replace(model.spec, flip_tta=True)
    return TorchRecognizer(
        name=f"{base}-flip", module=model.module, spec=spec, embedding_dim=model.embedding_dim,
        weights_id=model.weights_id,
    )  # fmt: skip
