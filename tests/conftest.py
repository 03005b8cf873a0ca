"""Shared test fixtures: locations of ../shared (reference data and real media)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (the ../shared folder beside the project root is absent)")
    return path


@pytest.fixture(autouse=True, scope="session")
def private_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Signing keys and the audit log of every test go to a temporary folder, never to ~."""
    import os

    folder = tmp_path_factory.mktemp("latentdub-data")
    os.environ["LATENTDUB_DATA_DIR"] = str(folder)
    return folder


@pytest.fixture()
def empty_hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF_HOME in offline mode: no hub weights anywhere unless a test puts them there
    (set at run time; huggingface_hub reads these variables when it resolves a path)."""
    home = tmp_path / "hf-home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return _require(SHARED / "reference", "reference data")


@pytest.fixture(scope="session")
def media_dir() -> Path:
    return _require(SHARED / "media", "test media")


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny model in the official folder layout, made by `latentdub weights make-tiny`."""
    from latentdub.weights import make_tiny

    out = tmp_path_factory.mktemp("tiny-weights")
    make_tiny(out)
    return out
