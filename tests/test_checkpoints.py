"""featx.checkpoints: the three published layouts, weights-only reading, strict loading."""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict

import pytest
import torch
from torch import nn

from featx.checkpoints import (
    Checkpoint,
    CheckpointError,
    CheckpointWarning,
    load_state,
    read_checkpoint,
    sha256_file,
)
from featx.models.cornet_s import build_cornet_s

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class TrainingFlags:
    """Stands for the arbitrary objects (argparse namespaces, dill'd closures) that
    training scripts store beside the weights; unpickling it needs full unpickling."""

    def __init__(self, lr: float):
        self.lr = lr


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict([
        ("conv", nn.Conv2d(3, 4, kernel_size=3)),
        ("norm", nn.BatchNorm2d(4)),
        ("fc", nn.Linear(4, 2)),
    ]))


def feather_dict(state: dict, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> dict:
    """A state dict wrapped as robustness/train.py writes it (DataParallel(AttackerModel))."""
    model = {}
    for key, value in state.items():
        model[f"module.model.{key}"] = value
        model[f"module.attacker.model.{key}"] = value  # the same tensor, as in the real files
    for prefix in ("module.preproc.normalize.", "module.attacker.preproc.normalize."):
        model[prefix + "new_mean"] = torch.tensor(mean).view(3, 1, 1)
        model[prefix + "new_std"] = torch.tensor(std).view(3, 1, 1)
    return {"model": model, "optimizer": {"state": {}}, "schedule": None, "epoch": 39}


def save(obj, path) -> str:
    torch.save(obj, path)
    return str(path)


# --- reading -------------------------------------------------------------------------


def test_sha256_matches_hashlib(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * 10_000)  # several read chunks
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_auto_detects_plain_state_dict(tmp_path, caplog):
    net = small_net()
    path = save(net.state_dict(), tmp_path / "plain.pth")
    with caplog.at_level(logging.INFO, logger="featx.checkpoints"):
        ckpt = read_checkpoint(path)
    assert isinstance(ckpt, Checkpoint)
    assert ckpt.layout == "state_dict"
    assert "'state_dict' (detected)" in caplog.text
    assert list(ckpt.state_dict) == list(net.state_dict())
    assert ckpt.normalization is None
    assert ckpt.sha256 == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert ckpt.path == path


def test_auto_detects_cornet_layout(tmp_path, caplog):
    state = {f"module.{k}": v for k, v in small_net().state_dict().items()}
    path = save({"state_dict": state, "epoch": 43, "arch": "cornet_s"}, tmp_path / "c.pth")
    with caplog.at_level(logging.INFO, logger="featx.checkpoints"):
        ckpt = read_checkpoint(path)
    assert ckpt.layout == "cornet"
    assert "'cornet' (detected)" in caplog.text
    assert list(ckpt.state_dict) == list(state)  # the module. prefix is kept
    assert ckpt.extras == {"epoch": 43, "arch": "cornet_s"}


def test_auto_detects_feather_layout(tmp_path, caplog):
    net = small_net()
    path = save(feather_dict(net.state_dict()), tmp_path / "f.pt")
    with caplog.at_level(logging.INFO, logger="featx.checkpoints"):
        ckpt = read_checkpoint(path)
    assert ckpt.layout == "feather"
    assert "'feather' (detected)" in caplog.text
    assert list(ckpt.state_dict) == list(net.state_dict())  # module.model. removed, no copies
    assert ckpt.normalization == {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    assert ckpt.extras == {"epoch": 39}
    load_state(small_net(), ckpt)


def test_feather_copy_that_differs_warns(tmp_path):
    state = small_net().state_dict()
    obj = feather_dict(state)
    obj["model"]["module.attacker.model.fc.bias"] = state["fc.bias"] + 1
    path = save(obj, tmp_path / "f.pt")
    with pytest.warns(CheckpointWarning, match="fc.bias"):
        ckpt = read_checkpoint(path)
    assert torch.equal(ckpt.state_dict["fc.bias"], state["fc.bias"])


def test_feather_integer_normaliser_of_audio_models(tmp_path):
    obj = feather_dict(small_net().state_dict())
    for prefix in ("module.preproc.normalize.", "module.attacker.preproc.normalize."):
        obj["model"][prefix + "new_mean"] = torch.tensor([0]).view(1, 1, 1)
        obj["model"][prefix + "new_std"] = torch.tensor([1]).view(1, 1, 1)
    ckpt = read_checkpoint(save(obj, tmp_path / "a.pt"))
    assert ckpt.normalization == {"mean": [0.0], "std": [1.0]}


def test_explicit_layout_that_does_not_fit_is_refused(tmp_path):
    path = save(small_net().state_dict(), tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match="not in the 'feather' layout"):
        read_checkpoint(path, layout="feather")
    with pytest.raises(CheckpointError, match="not in the 'cornet' layout"):
        read_checkpoint(path, layout="cornet")
    with pytest.raises(ValueError, match="unknown checkpoint layout"):
        read_checkpoint(path, layout="timm")


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nowhere" / "cornet_s.pth"
    with pytest.raises(FileNotFoundError, match="cornet_s.pth"):
        read_checkpoint(path)


@pytest.mark.parametrize(
    "obj, message",
    [
        ([1, 2, 3], "holds a list, not weights"),
        ("a string", "holds a str, not weights"),
        ({"lr": 0.1, "epoch": 3}, "holds no weights"),
        ({}, "holds no weights"),
        ({"state_dict": {"a": 1, "b": torch.zeros(2)}}, "not tensors: a"),
    ],
)
def test_pickled_object_that_is_not_weights(tmp_path, obj, message):
    path = save(obj, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(path)


def test_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match="not a PyTorch file"):
        read_checkpoint(path)


def test_full_unpickling_needs_trust(tmp_path, caplog):
    net = small_net()
    obj = feather_dict(net.state_dict())
    obj["flags"] = TrainingFlags(lr=0.01)
    path = save(obj, tmp_path / "dill_like.pt")

    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    message = str(info.value)
    for phrase in ("full unpickling", "arbitrary code", "trusted source", "trust=True",
                   "--trust-checkpoint", "dill", "TrainingFlags"):
        assert phrase in message

    with caplog.at_level(logging.WARNING, logger="featx.checkpoints"):
        ckpt = read_checkpoint(path, trust=True)
    assert "weights_only=False" in caplog.text
    assert ckpt.layout == "feather"
    load_state(small_net(), ckpt)


# --- strict loading ------------------------------------------------------------------


def _refused(model: nn.Module, state: dict, tmp_path) -> str:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = read_checkpoint(save(state, tmp_path / "bad.pth"))
    with pytest.raises(CheckpointError) as info:
        load_state(model, ckpt)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "model changed by a refused load"
    return str(info.value)


def test_missing_key_is_named(tmp_path):
    state = small_net().state_dict()
    del state["fc.bias"]
    message = _refused(small_net(), state, tmp_path)
    assert "1 missing key: fc.bias" in message
    assert "nothing was loaded" in message


def test_unexpected_key_is_named(tmp_path):
    state = small_net().state_dict()
    state["head.weight"] = torch.zeros(3)
    assert "1 unexpected key: head.weight" in _refused(small_net(), state, tmp_path)


def test_wrong_shape_key_is_named(tmp_path):
    state = small_net().state_dict()
    state["fc.weight"] = torch.zeros(5, 4)
    message = _refused(small_net(), state, tmp_path)
    assert "1 wrong-shape key: fc.weight (file [5, 4], model [2, 4])" in message


def test_all_mismatches_reported_together_and_long_lists_cut(tmp_path):
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(12)])
    state = {f"other.{i}": torch.zeros(1) for i in range(3)}
    message = _refused(model, state, tmp_path)
    assert "24 missing keys: 0.weight" in message
    assert "(14 more)" in message
    assert "3 unexpected keys: other.0, other.1, other.2" in message


def test_cornet_s_file_without_num_batches_tracked_loads(tmp_path, caplog):
    torch.manual_seed(1)
    source = build_cornet_s()
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert all(k.startswith("module.") for k in state)
    path = save({"state_dict": state, "epoch": 43}, tmp_path / "cornet_s-1d3f7974.pth")

    torch.manual_seed(2)
    target = build_cornet_s()
    with caplog.at_level(logging.INFO, logger="featx.checkpoints"):
        load_state(target, read_checkpoint(path))
    assert "kept the model's own values" in caplog.text
    loaded = target.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_num_batches_tracked_is_required_unless_declared(tmp_path):
    state = {k: v for k, v in small_net().state_dict().items() if "num_batches" not in k}
    message = _refused(small_net(), state, tmp_path)
    assert "1 missing key: norm.num_batches_tracked" in message
