"""Run metadata: what a reader needs to trust or reproduce a number."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch

from cloakbench.devices import settings_record

PACKAGES = (
    "cloakbench",
    "torch",
    "numpy",
    "onnxruntime",
    "onnx",
    "opencv-python-headless",
    "pillow",
    "scikit-learn",
    "pyyaml",
)


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_state() -> dict[str, Any]:
    """Commit and dirty flag of the cloakbench source tree, when it is a git checkout."""
    src = Path(__file__).resolve().parents[2]
    commit = _git(["rev-parse", "HEAD"], src)
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _git(["status", "--porcelain", "--untracked-files=no"], src)
    return {"commit": commit, "dirty": bool(status)}


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, where ``platform.processor()`` is often empty)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_capability() -> str | None:
    """torch's CPU capability (``torch.backends.cpu.get_cpu_capability()``), None where torch lacks it."""
    get = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    return str(get()) if callable(get) else None


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        # the vector ISA torch's CPU kernels dispatch to (AVX2, AVX512, ...): results move by a few photos
        # between machines, and this is the first thing that differs
        "torch_cpu_capability": cpu_capability(),
        "mkldnn": torch.backends.mkldnn.is_available(),  # type: ignore[no-untyped-call]
        "torch_version": torch.__version__,
    }
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info.update(
            gpu_name=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda_runtime=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),  # type: ignore[no-untyped-call]
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            tf32_cudnn=torch.backends.cudnn.allow_tf32,
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            cudnn_deterministic=torch.backends.cudnn.deterministic,
        )
    return info


def collect(device: torch.device, *, onnx_providers: dict[str, list[str]]) -> dict[str, Any]:
    return {
        "utc_time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git": git_state(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        **device_info(device),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        # TF32, float32 matmul precision, cuDNN benchmark/deterministic, deterministic algorithms (warn-only
        # too) and CUBLAS_WORKSPACE_CONFIG, on every device (they move CUDA numbers; see bench/devices.py)
        "torch_settings": settings_record(),
        "onnxruntime_providers_used": onnx_providers,
    }
