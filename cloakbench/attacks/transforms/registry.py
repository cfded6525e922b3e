"""The input-transform registry (``TRANSFORMS``)."""

from __future__ import annotations

from typing import Any

from cloakbench.attacks.transforms.base import Identity, InputTransform
from cloakbench.attacks.transforms.jpeg import JPEGConfig, make_jpeg
from cloakbench.registry import EntryMeta, NoParams, Registry

TRANSFORMS: Registry[InputTransform] = Registry("transform")


def _identity(**config: Any) -> Identity:
    if config:
        from cloakbench.errors import ConfigError

        raise ConfigError(f"transform 'none' takes no parameters, got {sorted(config)}")
    return Identity()


TRANSFORMS.register("none", _identity, meta=EntryMeta(summary="no countermeasure (identity)"), config=NoParams)
TRANSFORMS.register(
    "jpeg",
    make_jpeg,
    config=JPEGConfig,
    runtime_args=("name",),
    meta=EntryMeta(summary="JPEG recompression with Pillow/libjpeg at quality q (default 75, 4:2:0)"),
)
