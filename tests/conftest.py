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
    from cloakbench.cuda_env import prepare_cuda_env

    prepare_cuda_env()  # before any test's first CUDA matmul, as the CLI does (cloakbench.devices)


def celeb24_path() -> Path:
    env = os.environ.get("CLOAKBENCH_CELEB24")
    return Path(env) if env else (PROJECT_ROOT.parent / "shared" / "datasets" / "celeb24").resolve()


@pytest.fixture(scope="session")
def celeb24_root() -> Path:
    from cloakbench.datasets import celeb24

    path = celeb24_path()
    if not path.is_dir():
        pytest.fail(
            f"celeb24 dataset not found at {path}; build it with `cloakbench data celeb24 --dest {path}` (from its "
            "public source, verified file by file), or set CLOAKBENCH_CELEB24 to a copy",
            pytrace=False,
        )
    problems = celeb24.verify(path)  # every file against the manifest shipped with cloakbench (about 0.3 s)
    if problems:
        pytest.fail(f"celeb24 at {path} is not the expected copy: {'; '.join(problems)}", pytrace=False)
    return path


NAMES_DATASET_IDENTITIES = ("Barack_Obama", "Daniel_Radcliffe", "Drew_Barrymore", "Gwyneth_Paltrow")
"""The celeb24 folders :func:`build_names_dataset` copies (8 photos each)."""
NAMES_DATASET_NAMES = {"Barack_Obama": "<script>alert(1)</script>", "Daniel_Radcliffe": "Dániel Rádcliffe/ダニエル"}
"""What its names file renames (a script tag; non-ASCII with a '/', which no folder name can hold); the
other two folders keep their names."""


def build_names_dataset(
    parent: Path, celeb24: Path, *, identities: tuple[str, ...] = NAMES_DATASET_IDENTITIES, photos: int = 8
) -> tuple[Path, Path]:
    """Copy ``photos`` photos of each of ``identities`` from celeb24 into ``parent/faces/<folder>/`` and write
    ``parent/names.csv`` renaming the folders of :data:`NAMES_DATASET_NAMES` that are copied; returns
    ``(dataset root, names file)``. Copies, not links: a test may change its copy."""
    import csv
    import shutil

    root = parent / "faces"
    for folder in identities:
        (root / folder).mkdir(parents=True)
        for src in sorted((celeb24 / folder).iterdir())[:photos]:
            shutil.copy2(src, root / folder / src.name)
    names_csv = parent / "names.csv"
    with names_csv.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["folder", "name"])
        writer.writerows([folder, name] for folder, name in NAMES_DATASET_NAMES.items() if folder in identities)
    return root, names_csv


@pytest.fixture(scope="session")
def names_dataset(tmp_path_factory: pytest.TempPathFactory, celeb24_root: Path) -> tuple[Path, Path]:
    """``(dataset root, names file)``: 4 celeb24 identities x 8 aligned photos, one folder renamed to
    ``<script>alert(1)</script>`` and one to a non-ASCII name (see :data:`NAMES_DATASET_NAMES`). Shared by the
    session: read it, do not change it (copy it with :func:`build_names_dataset` to change it)."""
    return build_names_dataset(tmp_path_factory.mktemp("names_dataset"), celeb24_root)
