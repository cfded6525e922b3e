"""scripts/gpu-check.sh and scripts/gpu_sync_check.py on the CPU: the CPU fallback runs for real (sync and parity
at reduced size), a failing step makes the exit code non-zero, bad options stop it before any work, and the
synchronisation counter the device check relies on sees the operators that synchronise on CUDA.

Measured on the 2-core development machine under load: ``--cpu --steps sync,parity --faces 2`` about 40-60 s.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"


def _check_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_sync_check", ROOT / "scripts" / "gpu_sync_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_sync_check"] = module
    spec.loader.exec_module(module)
    return module


def _run(tmp_path: Path, *args: str, fail: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "GPU_CHECK_FAIL")}
    env["PYTHON"] = sys.executable
    env["GPU_CHECK_CARRY"] = str(tmp_path / "no-carry")  # the default cache, not a carried one
    if fail is not None:
        env["GPU_CHECK_FAIL"] = fail
    cmd = ["bash", str(SCRIPT), "--out", str(tmp_path / "report"), "--work", str(tmp_path / "work"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)


def _statuses(report: Path) -> dict[str, str]:
    """The step table's rows (step | status | seconds | limit | ...)."""
    pattern = r"^\| ([a-z-]+) \| (passed|failed|skipped|not run) \| \d* \| \d+ \|"
    rows = re.findall(pattern, report.read_text(), flags=re.M)
    return dict(rows)


def test_sync_counter_sees_the_cuda_synchronising_operators() -> None:
    check = _check_module()
    x = torch.rand(16)
    with check.count_syncs(torch.device("cpu")) as free:
        y = (x * 2).sigmoid().sum(dim=0, keepdim=True)
        torch.where(x > 0.5, x, y)
    assert sum(free.values()) == 0, dict(free)
    with check.count_syncs(torch.device("cpu")) as where:
        for _ in range(3):
            x.sum().item()  # .item()
            x[x > 0.5]  # boolean-mask indexing
            torch.tensor([0.5, 0.5, 0.5])  # built from host data (a host-to-device copy on CUDA)
            bool(x.max() > 0)
    kinds: dict[str, int] = {}
    for key, count in where.items():
        kinds[key.split(" at ")[0]] = kinds.get(key.split(" at ")[0], 0) + count
    assert kinds == {"item/bool": 6, "boolean-mask indexing": 3, "tensor from host data": 3}, dict(where)
    assert all(" at test_gpu_check.py:" in k for k in where), dict(where)


def test_markdown_fragment_lists_every_row() -> None:
    check = _check_module()
    result = {"check": "parity", "device": "cpu", "passed": False, "rows": [
        {"model": "a", "status": "passed", "max_cosine_distance": 1.5e-7},
        {"model": "b|c", "status": "skipped", "reason": "weights not in the cache"},
    ]}  # fmt: skip
    text = check.to_markdown(result)
    assert "passed: False" in text
    assert "| a | passed | 1.5e-07 |  |" in text
    assert "| b/c | skipped |  | weights not in the cache |" in text


def test_cpu_fallback_runs_and_reports(tmp_path: Path) -> None:
    proc = _run(tmp_path, "--cpu", "--steps", "sync,parity", "--faces", "2")
    reports = list((tmp_path / "report").glob("*_cpu-fallback.md"))
    assert len(reports) == 1, proc.stdout + proc.stderr
    text = reports[0].read_text()
    assert "CPU FALLBACK" in text and "Nothing below is a GPU number" in text
    statuses = _statuses(reports[0])
    assert set(statuses) == {"setup", "sync", "parity"}, text
    assert proc.returncode == (1 if "failed" in statuses.values() else 0), (statuses, proc.stderr)
    assert statuses == {"setup": "passed", "sync": "passed", "parity": "passed"}, text
    assert "| sface | passed | CPU batch vs one at a time |" in text
    assert re.search(r"\| pgd \| \d+ \| \d+ \| 0 \| none \|", text), text


def test_a_failing_step_fails_the_run(tmp_path: Path) -> None:
    proc = _run(tmp_path, "--cpu", "--steps", "parity", fail="parity")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (report,) = (tmp_path / "report").glob("*_cpu-fallback.md")
    assert _statuses(report) == {"setup": "passed", "parity": "failed"}
    assert "failed on purpose (GPU_CHECK_FAIL=parity)" in report.read_text()


@pytest.mark.parametrize(
    ("args", "fail", "message"),
    [
        (("--steps", "sync,nosuch"), None, "unknown step 'nosuch'"),
        (("--faces", "0"), None, "--faces must be a positive integer"),
        (("--bogus",), None, "unknown option '--bogus'"),
        ((), "nosuch", "GPU_CHECK_FAIL names no step: 'nosuch'"),
    ],
)
def test_bad_options_stop_before_any_work(
    tmp_path: Path, args: tuple[str, ...], fail: str | None, message: str
) -> None:
    proc = _run(tmp_path, "--cpu", *args, fail=fail)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "report").exists()


def test_dry_run_lists_the_steps(tmp_path: Path) -> None:
    proc = _run(tmp_path, "--cpu", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    listed = re.findall(r"^  ([a-z-]+) +limit", proc.stdout, flags=re.M)
    assert listed == ["setup", "sync", "parity", "pytest", "bench", "suite", "bench-full"]
    assert "_cpu-fallback.md" in proc.stdout
    assert not (tmp_path / "report").exists()
