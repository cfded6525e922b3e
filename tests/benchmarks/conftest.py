"""pytest-benchmark machine info for the benchmarks: what a GPU (or CPU) number was measured on.

``--benchmark-json FILE`` then carries, in ``machine_info`` beside pytest-benchmark's own keys: the torch
version and build, the device the benchmarks use, the torch thread counts, and on CUDA the GPU's name,
memory and compute capability, the CUDA runtime torch was built with, the NVIDIA driver (from
``nvidia-smi`` when it is on the PATH), cuDNN's version and the TF32 / cuDNN benchmark / determinism flags.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import pytest
import torch


def _nvidia_driver() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        proc = subprocess.run(
            [exe, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = proc.stdout.strip().splitlines()
    return lines[0].strip() if proc.returncode == 0 and lines else None


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {
        "torch_version": torch.__version__,
        "device": "cuda" if cuda else "cpu",
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cuda_runtime": torch.version.cuda,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }
    if cuda:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(
            cuda_device_name=props.name,
            cuda_device_memory_gib=round(props.total_memory / 2**30, 1),
            cuda_capability=f"{props.major}.{props.minor}",
            cuda_device_count=torch.cuda.device_count(),
            nvidia_driver=_nvidia_driver(),
            cudnn_version=torch.backends.cudnn.version(),
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            tf32_cudnn=torch.backends.cudnn.allow_tf32,
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            cudnn_deterministic=torch.backends.cudnn.deterministic,
        )
    machine_info.update(info)
