"""The defense registry (``DEFENSES``). Presets are registered names bound to config values.

Every entry says which threat model it targets (``details["threat model"]``) and where it comes from
(paper, year, venue), so ``cloakbench list defenses`` is enough to cite and place a result.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cloakbench.defenses.base import Defense, ThreatModel
from cloakbench.defenses.fawkes import PAPER_MODES, V1_DEFAULTS, V1_MODES, FawkesConfig, make_fawkes
from cloakbench.defenses.lowkey import LowKeyConfig, make_lowkey
from cloakbench.defenses.noise import NoiseConfig, make_noise
from cloakbench.defenses.opom import OPOMConfig, make_opom
from cloakbench.defenses.pgd import PGDConfig, make_pgd
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
    "fawkes", {}, "Fawkes, paper version (targeted, tanh space, DSSIM penalty); custom: set every parameter",
    _TARGETED, "DSSIM 0.007 (the paper's default)",
)  # fmt: skip
for _mode, _values in PAPER_MODES.items():
    _register_fawkes(
        f"fawkes-{_mode}", _values,
        f"Fawkes paper mode {_mode}: DSSIM <= {_values['dssim_threshold']}, {_values['steps']} steps, "
        "target among the 20 farthest public identities",
        _TARGETED, f"DSSIM {_values['dssim_threshold']}", steps=_values["steps"],
    )  # fmt: skip
_register_fawkes(
    "fawkes-v1", {**V1_DEFAULTS, **V1_MODES["high"]},
    "Fawkes v1.0 (untargeted, extractor ensemble, +-15/255 cap); v1.0 high unless overridden",
    _UNTARGETED, "DSSIM 0.017 and L-inf 15/255",
)  # fmt: skip
for _mode, _values in V1_MODES.items():
    _register_fawkes(
        f"fawkes-v1-{_mode}", {**V1_DEFAULTS, **_values},
        f"Fawkes v1.0 mode {_mode}: DSSIM <= {_values['dssim_threshold']}, +-15/255, {_values['steps']} steps, "
        f"Adadelta lr {_values['learning_rate']:g}, {_values['extractors']} extractor(s)",
        _UNTARGETED, f"DSSIM {_values['dssim_threshold']} and L-inf 15/255",
        steps=_values["steps"], extractors=_values["extractors"],
    )  # fmt: skip

DEFENSES.register(
    "lowkey",
    make_lowkey,
    config=LowKeyConfig,
    runtime_args=("surrogates", "name"),
    meta=EntryMeta(
        summary="LowKey: ensemble feature push on the image and a Gaussian-smoothed copy, L-inf 0.05, 50 steps; "
        "DSSIM stands in for LPIPS",
        paper="Cherepanova et al., LowKey: Leveraging Adversarial Attacks to Protect Social Media Users "
        "from Facial Recognition",
        year=2021,
        venue="ICLR",
        tags=("evasion", "white-box surrogate"),
        details=_details(ThreatModel.EVASION, "L-inf 0.05", perceptual="dssim (stand-in for LPIPS)"),
    ),
)
DEFENSES.register(
    "opom",
    make_opom,
    config=OPOMConfig,
    runtime_args=("surrogates", "name"),
    meta=EntryMeta(
        summary="OPOM: one universal mask per person, away from the affine hull of their features (8/255)",
        paper="Zhong & Deng, OPOM: Customized Invisible Cloak towards Face Privacy Protection",
        year=2022,
        venue="IEEE TPAMI",
        tags=("evasion", "universal", "white-box surrogate"),
        details=_details(ThreatModel.EVASION, "L-inf 8/255"),
    ),
)
