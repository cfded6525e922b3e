"""The defense registry (``DEFENSES``). Presets are registered names bound to config values."""

from __future__ import annotations

from cloakbench.defenses.base import Defense
from cloakbench.defenses.noise import NoiseConfig, make_noise
from cloakbench.defenses.pgd import PGDConfig, make_pgd
from cloakbench.registry import EntryMeta, Registry

DEFENSES: Registry[Defense] = Registry("defense")

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
    ),
)
