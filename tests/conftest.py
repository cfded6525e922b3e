"""Shared fixtures: real face data from ../shared/datasets and the SFace recognizers.

The celeb24 folder is read in place (never copied into the project). Its location is
``$CLOAKBENCH_CELEB24`` or ``<project root>/../shared/datasets/celeb24``; when it is missing the tests that
need it fail with a message saying where it was looked for: a missing dataset is not a passing test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """Time benchmarks only when asked: a plain ``python -m pytest`` (the README's test command, CI) runs each
    benchmark body once as a test, without rounds or statistics; ``--benchmark-only`` (or
    ``--benchmark-enable``) times them. pytest-benchmark reads the option after this hook (it configures last).
    """
    if not config.getoption("benchmark_only", False) and not config.getoption("benchmark_enable", False):
        config.option.benchmark_disable = True


def celeb24_path() -> Path:
    env = os.environ.get("CLOAKBENCH_CELEB24")
    return Path(env) if env else (PROJECT_ROOT.parent / "shared" / "datasets" / "celeb24").resolve()


@pytest.fixture(scope="session")
def celeb24_root() -> Path:
    path = celeb24_path()
    if not path.is_dir():
        pytest.fail(
            f"celeb24 dataset not found at {path}; put the shared folder beside the project or set "
            "CLOAKBENCH_CELEB24 to its location",
            pytrace=False,
        )
    return path
