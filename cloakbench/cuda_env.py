"""The environment CUDA libraries read once, set before torch starts them (no torch import here).

cuBLAS sizes its workspace from ``CUBLAS_WORKSPACE_CONFIG`` at the first GPU matrix product of the process and
needs ``:4096:8`` (or ``:16:8``) for reproducible products; set later, it silences torch's warning without making
the products deterministic. The CLI and the test suite call :func:`prepare_cuda_env` first thing: it imports
nothing heavy, so commands that never touch a model (``cloakbench report``) stay free of torch.
:mod:`cloakbench.devices` holds the switches that need torch.
"""

from __future__ import annotations

import os

CUBLAS_ENV = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_DETERMINISTIC = ":4096:8"


def prepare_cuda_env() -> bool:
    """Set ``CUBLAS_WORKSPACE_CONFIG=":4096:8"`` unless the environment already has a value; call it at program
    start, before any CUDA work. Returns whether it set the variable. Harmless on a machine without CUDA (an
    environment variable nothing reads)."""
    if os.environ.get(CUBLAS_ENV):
        return False
    os.environ[CUBLAS_ENV] = CUBLAS_DETERMINISTIC
    return True
