"""Shared test helpers: where the read-only reference material lives."""

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

#: Environment variables that switch `featx extract` to sharded or torchrun mode.
RUN_MODE_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_ARRAY_TASK_ID",
                      "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX",
                      "SLURM_ARRAY_TASK_STEP")


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


@pytest.fixture(autouse=True)
def plain_run_mode(monkeypatch):
    """Tests run single-process, whatever scheduler variables the machine has."""
    for name in RUN_MODE_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def write_feather(network: dict, path: Path, mean: torch.Tensor, std: torch.Tensor, epoch: int) -> Path:
    """Save ``network`` (keys under ``module.model.``) as Feather's training code does:
    ``{"model": ...}`` with the attacker's copies and the normaliser buffers."""
    model = dict(network)
    for key, value in network.items():
        model["module.attacker.model." + key[len("module.model."):]] = value
    for prefix in ("module.preproc.normalize.", "module.attacker.preproc.normalize."):
        model[prefix + "new_mean"] = mean
        model[prefix + "new_std"] = std
    torch.save({"model": model, "epoch": epoch}, path)
    return path
