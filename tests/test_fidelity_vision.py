"""CORnet-S, LowpassAlexNet and VOneAlexNet against the original code's activations.

``shared/fidelity`` holds, per model, the published checkpoint's key manifest, a
deterministic stand-in for its weights (``fill.py``) and the activations the original
implementation computes with those weights (``MODEL.npz``). Each test writes the
stand-in checkpoint in the published file layout, loads it the way a user would
(``featx.load_model``), runs the reference input through it and compares every stage.
See ``shared/fidelity/README.md``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import featx
from conftest import reference, reference_stages, write_feather
from featx.checkpoints import read_checkpoint
from featx.models.cornet_s import build_cornet_s
from featx.models.lowpass_alexnet import build_lowpass_alexnet, hann_window2d
from featx.models.vone_alexnet import build_vone_alexnet

MODELS = ("cornet_s", "lowpass_alexnet", "vone_alexnet")
BUILDERS = {
    "cornet_s": build_cornet_s,
    "lowpass_alexnet": build_lowpass_alexnet,
    "vone_alexnet": build_vone_alexnet,
}
# the VOneAlexNet reference is computed without noise (README)
OPTIONS = {"vone_alexnet": {"noise": "off"}}
FEATHER_NET = "module.model."
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


# --- reference material --------------------------------------------------------------


def manifest_keys(fidelity: Path, fill_module, name: str) -> list[str]:
    return list(fill_module.read_manifest(fidelity / f"{name}.keys.tsv"))


def write_stand_in(fidelity: Path, fill_module, name: str, path: Path) -> Path:
    """Write the stand-in checkpoint of ``name`` in its published layout."""
    state = fill_module.fill(fill_module.read_manifest(fidelity / f"{name}.keys.tsv"))
    for key, value in reference(fidelity, name).items():
        if key.startswith("fixed."):
            fixed_key = key[len("fixed."):]
            assert fixed_key in state, f"fixed tensor {fixed_key} is not in the manifest"
            state[fixed_key] = torch.from_numpy(value)

    if name == "cornet_s":
        torch.save({"state_dict": state}, path)
        return path

    # Feather layout: DataParallel(AttackerModel) state dict under "model"
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return write_feather(state, path, mean, std, epoch=120)


@pytest.fixture(scope="module")
def stand_in(fidelity, fill_module, tmp_path_factory):
    """``{model name: checkpoint path}``, each written once, on first use."""
    paths: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in paths:
            folder = tmp_path_factory.mktemp(name)
            file = featx.get_entry(name).weights.file
            paths[name] = write_stand_in(fidelity, fill_module, name, folder / file)
        return paths[name]

    return get


# --- state dict and registry ---------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_keys_are_the_published_ones(name, fidelity, fill_module):
    published = manifest_keys(fidelity, fill_module, name)
    if featx.get_entry(name).weights.layout == "feather":
        published = [key[len(FEATHER_NET):] for key in published]
    torch.manual_seed(0)
    model = BUILDERS[name](**OPTIONS.get(name, {}))
    assert sorted(model.state_dict()) == sorted(published)


@pytest.mark.parametrize("name", MODELS)
def test_registry_stages_match_the_reference(name, fidelity):
    entry = featx.get_entry(name)
    ref = reference(fidelity, name)
    assert entry.stage_names == reference_stages(ref)
    for stage in entry.stages:
        assert list(stage.shape) == list(ref[f"{stage.name}.shape"][1:]), stage.name
        assert stage.features == int(np.prod(stage.shape))


# --- activations ---------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_activations_match_the_original_code(name, fidelity, stand_in):
    ref = reference(fidelity, name)
    model = featx.load_model(name, weights=stand_in(name), **OPTIONS.get(name, {}))
    assert model.featx_weights["layout"] == featx.get_entry(name).weights.layout

    stages = reference_stages(ref)
    activations = featx.Extractor(model, stages)(torch.from_numpy(ref["input"]))

    for stage in stages:
        shape = tuple(ref[f"{stage}.shape"])
        act = activations[stage]
        assert tuple(act.shape) == shape, f"{name}.{stage}: shape {tuple(act.shape)} != {shape}"
        flat = act.reshape(shape[0], -1).double().numpy()
        std = ref[f"{stage}.std"]
        for item in range(shape[0]):
            atol = 1e-4 * std[item]
            where = f"{name}.{stage}[{item}]"
            np.testing.assert_allclose(flat[item, ref[f"{stage}.index"]], ref[f"{stage}.values"][item],
                                       rtol=1e-3, atol=atol, err_msg=f"{where} values")
            np.testing.assert_allclose(flat[item].mean(), ref[f"{stage}.mean"][item],
                                       rtol=1e-3, atol=atol, err_msg=f"{where} mean")
            np.testing.assert_allclose(flat[item].std(), std[item],
                                       rtol=1e-3, atol=atol, err_msg=f"{where} std")


@pytest.mark.parametrize("name", ["lowpass_alexnet", "vone_alexnet"])
def test_feather_checkpoint_normalisation_is_read(name, stand_in):
    ckpt = read_checkpoint(stand_in(name))
    assert ckpt.layout == "feather"
    assert ckpt.normalization == {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    assert ckpt.extras == {"epoch": 120}


# --- model details -------------------------------------------------------------------


def test_hann_windows_equal_the_original(fidelity):
    ref = reference(fidelity, "lowpass_alexnet")
    model = build_lowpass_alexnet()
    own = model.state_dict()
    for key, value in ref.items():
        if key.startswith("fixed."):
            ours = own[key[len("fixed." + FEATHER_NET):]]
            assert ours.shape == value.shape
            torch.testing.assert_close(ours, torch.from_numpy(value), rtol=0, atol=1e-7)
    assert hann_window2d(17).shape == (1, 1, 15, 15)
    assert hann_window2d(9).shape == (1, 1, 7, 7)
    assert float(hann_window2d(9).sum()) == pytest.approx(1.0)


def test_vone_gabor_banks_regenerate_the_originals(fidelity):
    """Random init rebuilds the Gabor banks exactly as the original (seeds 0 and 0)."""
    ref = reference(fidelity, "vone_alexnet")
    torch.manual_seed(0)
    own = build_vone_alexnet(noise="off").state_dict()
    for bank in ("simple_conv_q0", "simple_conv_q1"):
        expected = torch.from_numpy(ref[f"fixed.module.model.vone_block.{bank}.weight"])
        torch.testing.assert_close(own[f"vone_block.{bank}.weight"], expected, rtol=0, atol=1e-7)


def test_cornet_s_recurrent_conv_runs_once_per_step_and_repeatably():
    torch.manual_seed(0)
    model = build_cornet_s().eval()
    calls = []
    model.get_submodule("module.V4.conv2").register_forward_hook(
        lambda module, args, output: calls.append(tuple(output.shape)))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        first = model(x)
        second = model(x)
    # 4 time steps per pass; the first downsamples 28 -> 14
    assert calls == [(1, 1024, 14, 14)] * 8
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert model.get_submodule("module.V4.conv2").stride == (1, 1)


def test_builders_are_deterministic_given_the_torch_seed():
    for build in BUILDERS.values():
        torch.manual_seed(3)
        a = build().state_dict()
        torch.manual_seed(3)
        b = build().state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


# --- VOneAlexNet noise ---------------------------------------------------------------


def _v1_output(noise: str, noise_seed: int = 0) -> torch.Tensor:
    torch.manual_seed(0)
    model = build_vone_alexnet(noise=noise, noise_seed=noise_seed).eval()
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model.vone_block(x)


def test_vone_noise_is_deterministic_for_a_seed():
    torch.testing.assert_close(_v1_output("on", 0), _v1_output("on", 0), rtol=0, atol=0)


def test_vone_noise_on_differs_from_off_and_between_seeds():
    on0, on1, off = _v1_output("on", 0), _v1_output("on", 1), _v1_output("off")
    assert not torch.allclose(on0, off)
    assert not torch.allclose(on0, on1)


def test_vone_noise_is_a_fixed_non_persistent_tensor():
    torch.manual_seed(0)
    model = build_vone_alexnet(noise="on", noise_seed=0)
    noise = model.vone_block.fixed_noise
    assert noise.shape == (1, 512, 56, 56)
    assert float(noise.std()) == pytest.approx(4.0, rel=0.01)
    assert not any("noise" in key for key in model.state_dict())
    assert build_vone_alexnet(noise="off").vone_block.fixed_noise is None
    # the noise does not consume the global RNG: the weights are the same either way
    torch.manual_seed(0)
    off = build_vone_alexnet(noise="off").state_dict()
    assert all(torch.equal(v, off[k]) for k, v in model.state_dict().items())


def test_vone_noise_options_are_checked():
    with pytest.raises(ValueError, match="noise must be one of"):
        build_vone_alexnet(noise="gaussian")
    model = build_vone_alexnet(noise="on")
    with pytest.raises(ValueError, match="224x224"):
        model(torch.zeros(1, 3, 160, 160))


def test_vone_checkpoint_loads_with_noise_on(stand_in):
    model = featx.load_model("vone_alexnet", weights=stand_in("vone_alexnet"))
    assert model.featx_options == {"noise": "on", "noise_seed": 0}
    assert model.vone_block.fixed_noise is not None
