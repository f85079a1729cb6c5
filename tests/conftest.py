"""Shared test helpers: where the read-only reference material lives."""

import importlib.util
import os
from pathlib import Path

import numpy as np
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


@pytest.fixture(scope="session")
def fidelity(shared) -> Path:
    """The reference vectors computed with the original implementations."""
    return shared / "fidelity"


@pytest.fixture(scope="session")
def fill_module(fidelity):
    """``shared/fidelity/fill.py`` (deterministic stand-in weights), imported where it lies."""
    spec = importlib.util.spec_from_file_location("featx_fidelity_fill", fidelity / "fill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference(fidelity: Path, name: str) -> dict[str, np.ndarray]:
    """Every array of ``fidelity/NAME.npz``."""
    with np.load(fidelity / f"{name}.npz") as npz:
        return {key: npz[key] for key in npz.files}


def reference_stages(ref: dict) -> list[str]:
    """The stage names a reference file holds activations for."""
    return [key[: -len(".shape")] for key in ref if key.endswith(".shape")]
