"""CochResNet50 and CochCNN9 against the original code's activations.

As for the vision models (``test_fidelity_vision.py``, ``shared/fidelity/README.md``):
each test writes the stand-in checkpoint in the published Feather layout (network
under ``module.model.``, the attacker's duplicate under ``module.attacker.model.``,
the normaliser's int64 mean 0 / std 1 buffers), loads it with ``featx.load_model``,
runs the reference waveforms through it and compares every stage. The front end's
buffers in the stand-in are the published ones (``cochleagram_buffers.npz``); featx
checks them against its own constants while loading.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import featx
from conftest import reference, reference_stages
from conftest import write_feather as write_feather_checkpoint
from featx.checkpoints import CheckpointError, read_checkpoint
from featx.models.coch_cnn9 import build_coch_cnn9, same_padding
from featx.models.coch_resnet50 import build_coch_resnet50

MODELS = ("coch_resnet50", "coch_cnn9")
BUILDERS = {"coch_resnet50": build_coch_resnet50, "coch_cnn9": build_coch_cnn9}
FEATHER_NET = "module.model."
FRONT_END = "module.model.0.full_rep.rep."
BUFFER_OF = {
    FRONT_END + "downsampling_op.downsample_filter": "downsample_filter",
    FRONT_END + "Cochleagram.compute_subbands.coch_filters": "coch_filters",
    FRONT_END + "Cochleagram.downsampling.downsample_filter": "downsample_filter",
}


# --- reference material --------------------------------------------------------------


def stand_in_state(fidelity: Path, fill_module, name: str) -> dict[str, torch.Tensor]:
    """The published network keys, filled as README says (front end: the published buffers)."""
    state = fill_module.fill(fill_module.read_manifest(fidelity / f"{name}.keys.tsv"))
    with np.load(fidelity / "cochleagram_buffers.npz") as npz:
        for key, buffer in BUFFER_OF.items():
            state[key] = torch.from_numpy(npz[buffer])
    # the only fixed tensor in the .npz is the downsampling kernel, which is in the buffers too
    fixed = reference(fidelity, name)["fixed.downsample_filter"]
    np.testing.assert_array_equal(fixed, state[FRONT_END + "downsampling_op.downsample_filter"].numpy())
    return state


def write_feather(state: dict[str, torch.Tensor], path: Path) -> Path:
    """The audio models' Feather file: int64 mean 0 / std 1 normaliser buffers (spec 0)."""
    zeros, ones = torch.zeros(1, 1, 1, dtype=torch.int64), torch.ones(1, 1, 1, dtype=torch.int64)
    return write_feather_checkpoint(state, path, zeros, ones, epoch=6)


@pytest.fixture(scope="module")
def stand_in(fidelity, fill_module, tmp_path_factory):
    """``{model name: checkpoint path}``, each written once, on first use."""
    paths: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in paths:
            folder = tmp_path_factory.mktemp(name)
            state = stand_in_state(fidelity, fill_module, name)
            paths[name] = write_feather(state, folder / featx.get_entry(name).weights.file)
        return paths[name]

    return get


def registry_name(entry, reference_name: str) -> str:
    """The registry's stage name for a reference stage (``relufc`` is ``relu5``)."""
    return entry.stage(reference_name).name


# --- state dict and registry ---------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_keys_are_the_published_ones(name, fidelity, fill_module):
    manifest = fill_module.read_manifest(fidelity / f"{name}.keys.tsv")
    torch.manual_seed(0)
    state = BUILDERS[name]().state_dict()
    assert list(state) == [key[len(FEATHER_NET):] for key in manifest]
    for key, (dtype, shape) in manifest.items():
        tensor = state[key[len(FEATHER_NET):]]
        assert (str(tensor.dtype), tuple(tensor.shape)) == (f"torch.{dtype}", shape), key


@pytest.mark.parametrize("name", MODELS)
def test_registry_stages_match_the_reference(name, fidelity):
    entry = featx.get_entry(name)
    ref = reference(fidelity, name)
    assert entry.stage_names == [registry_name(entry, s) for s in reference_stages(ref)]
    for stage in reference_stages(ref):
        shape = [int(d) for d in ref[f"{stage}.shape"][1:]]
        expected = [40000] if stage == "natural_audio" else shape  # reference keeps [1, 40000]
        assert list(entry.stage(stage).shape) == expected, stage
    assert entry.modality == "audio" and entry.input.n_samples == 40000
    assert entry.weights.layout == "feather"


# --- activations ---------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_activations_match_the_original_code(name, fidelity, stand_in):
    ref = reference(fidelity, name)
    entry = featx.get_entry(name)
    model = featx.load_model(name, weights=stand_in(name))
    assert model.featx_weights["layout"] == "feather"
    assert model.featx_weights["input_mean"] == [0.0] and model.featx_weights["input_std"] == [1.0]

    stages = [registry_name(entry, s) for s in reference_stages(ref)]
    waveforms = torch.from_numpy(ref["input"])[:, 0]  # [2, 40000], the stored input shape
    activations = featx.Extractor(model, stages)(waveforms)

    for ref_stage, stage in zip(reference_stages(ref), stages):
        shape = tuple(int(d) for d in ref[f"{ref_stage}.shape"])
        act = activations[stage]
        assert (len(act), *entry.stage(stage).shape) == tuple(act.shape)
        assert act.numel() == int(np.prod(shape)), f"{name}.{stage}: {tuple(act.shape)} vs {shape}"
        flat = act.reshape(shape[0], -1).double().numpy()
        std = ref[f"{ref_stage}.std"]
        for item in range(shape[0]):
            atol = 1e-4 * std[item]
            where = f"{name}.{stage}[{item}]"
            np.testing.assert_allclose(flat[item, ref[f"{ref_stage}.index"]],
                                       ref[f"{ref_stage}.values"][item],
                                       rtol=1e-3, atol=atol, err_msg=f"{where} values")
            np.testing.assert_allclose(flat[item].mean(), ref[f"{ref_stage}.mean"][item],
                                       rtol=1e-3, atol=atol, err_msg=f"{where} mean")
            np.testing.assert_allclose(flat[item].std(), std[item],
                                       rtol=1e-3, atol=atol, err_msg=f"{where} std")


def test_feather_audio_checkpoint_is_read(stand_in):
    ckpt = read_checkpoint(stand_in("coch_cnn9"))
    assert ckpt.layout == "feather"
    assert ckpt.normalization == {"mean": [0.0], "std": [1.0]}
    assert all(key.startswith(("0.", "1.")) for key in ckpt.state_dict)


def test_checkpoint_with_other_front_end_is_refused(fidelity, fill_module, tmp_path):
    state = stand_in_state(fidelity, fill_module, "coch_cnn9")
    state[FRONT_END + "Cochleagram.compute_subbands.coch_filters"] = (
        state[FRONT_END + "Cochleagram.compute_subbands.coch_filters"] * 1.01)
    path = write_feather(state, tmp_path / "other_front_end.pt")
    with pytest.raises(CheckpointError, match="cochleagram buffers"):
        featx.load_model("coch_cnn9", weights=path)


def test_checkpoint_without_front_end_buffers_loads(fidelity, fill_module, tmp_path):
    state = stand_in_state(fidelity, fill_module, "coch_cnn9")
    for key in BUFFER_OF:
        del state[key]
    model = featx.load_model("coch_cnn9", weights=write_feather(state, tmp_path / "no_front_end.pt"))
    own = build_coch_cnn9().state_dict()
    for key in BUFFER_OF:
        short = key[len(FEATHER_NET):]
        assert torch.equal(model.state_dict()[short], own[short])


# --- model details -------------------------------------------------------------------


def test_same_padding_matches_the_table():
    # spec/original_models.md 8.1: (top, bottom) / (left, right)
    assert same_padding((211, 390), (7, 14), (3, 3)) == (5, 6, 3, 3)
    assert same_padding((71, 130), (2, 5), (2, 2)) == (1, 2, 0, 1)
    assert same_padding((36, 65), (4, 8), (2, 2)) == (3, 4, 1, 1)
    assert same_padding((18, 33), (2, 5), (2, 2)) == (2, 2, 0, 0)
    assert same_padding((9, 17), (2, 5), (1, 1)) == (2, 2, 0, 1)


def test_cnn9_pools_pad_as_the_original():
    torch.manual_seed(0)
    net = build_coch_cnn9()[1].eval()
    ones = torch.ones(1, 1, 9, 17)
    # zero padding counts in the average: the corner cell averages 2x5 cells, 3x2 of them real
    assert net.avgpool(ones)[0, 0, 0, 0].item() == pytest.approx(6 / 10)
    assert net.avgpool(ones)[0, 0, 4, 4].item() == pytest.approx(5 / 10)  # bottom row padded
    # -inf padding: negative inputs stay negative at the border
    assert net.maxpool0(-ones).max().item() == -1.0


@pytest.mark.parametrize("name", MODELS)
def test_builders_are_deterministic_given_the_torch_seed(name):
    torch.manual_seed(3)
    a = BUILDERS[name]().state_dict()
    torch.manual_seed(3)
    b = BUILDERS[name]().state_dict()
    torch.manual_seed(4)
    c = BUILDERS[name]().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["1.conv1.weight"], c["1.conv1.weight"])


@pytest.mark.parametrize("name", MODELS)
def test_random_weights_run_and_give_registry_shapes(name):
    model = featx.load_model(name, weights="random")
    entry = featx.get_entry(name)
    x = 0.1 * torch.randn(2, 40000, generator=torch.Generator().manual_seed(0))
    activations = featx.Extractor(model, entry.stage_names)(x)
    for stage in entry.stages:
        act = activations[stage.name]
        assert tuple(act.shape) == (2, *stage.shape), stage.name
        assert torch.isfinite(act).all(), stage.name
