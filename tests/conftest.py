"""Shared fixtures. Tests that need ../shared (datasets, official weights) skip
with a clear reason when it is absent, so a user's fresh clone still passes."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared_path(*parts: str) -> Path:
    """Path under ../shared, or skip the calling test when it is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the shared datasets/weights beside the checkout), which is absent")
    return path


@pytest.fixture
def drive_dir() -> Path:
    return shared_path("data", "DRIVE")


@pytest.fixture
def heimed_dir() -> Path:
    return shared_path("data", "HEI-MED")


@pytest.fixture
def dncnn_weights_dir() -> Path:
    return shared_path("weights", "dncnn")
