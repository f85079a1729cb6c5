"""Shared test helpers: where the read-only reference material lives."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """The ``shared/`` folder beside the checkout (CI lays it there), or $FEATX_SHARED."""
    if os.environ.get("FEATX_SHARED"):
        return Path(os.environ["FEATX_SHARED"])
    return REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if not path.is_dir():
        pytest.fail(f"reference folder {path} is missing; set FEATX_SHARED to the shared/ folder")
    return path
