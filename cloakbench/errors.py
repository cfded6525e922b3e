"""Exception types. Every message names the file, key or value at fault."""

from __future__ import annotations


class CloakbenchError(Exception):
    """Base class of every error cloakbench raises on purpose."""


class ConfigError(CloakbenchError, ValueError):
    """A configuration value or key is invalid (the message names the key and where it came from)."""


class RegistryError(CloakbenchError, KeyError):
    """Unknown or duplicate registry name."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else ""


class ImageContractError(CloakbenchError, ValueError):
    """A tensor crossing a boundary is not a float32 [B, 3, H, W] batch in [0, 1]."""


class FetchError(CloakbenchError, RuntimeError):
    """A pinned file could not be fetched or failed verification."""


class DatasetError(CloakbenchError, ValueError):
    """A dataset folder is missing, empty or unusable."""
