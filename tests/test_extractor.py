"""The generic forward-hook extractor on small hand-made modules."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import featx
from featx import Extractor


class ConvInplaceRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        return self.head(torch.flatten(self.relu(self.conv(x)), 1))


class Recurrent(nn.Module):
    """One block applied three times, as recurrent models such as CORnet-S do."""

    def __init__(self, steps=3):
        super().__init__()
        self.steps = steps
        self.block = nn.Linear(6, 6)
        self.after = nn.Linear(6, 2)
        self.after_calls = 0

    def forward(self, x):
        for _ in range(self.steps):
            x = torch.tanh(self.block(x))
        self.after_calls += 1
        return self.after(x)


@pytest.fixture
def images():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def test_conv_before_inplace_relu_keeps_negative_values(images):
    model = ConvInplaceRelu()
    out = Extractor(model, {"conv": "conv", "relu": "relu"})(images)
    direct = F.conv2d(images, model.conv.weight, model.conv.bias, padding=1)
    assert (out["conv"] < 0).any(), "the conv output must still hold its negative values"
    torch.testing.assert_close(out["conv"], direct)
    torch.testing.assert_close(out["relu"], direct.clamp(min=0))


def test_repeated_module_yields_every_call(images):
    model = Recurrent()
    x = torch.randn(4, 6)
    extractor = Extractor(model, {"block": "block"})
    out = extractor(x)
    assert list(out) == ["block@t0", "block@t1", "block@t2"]
    assert extractor.output_names == ["block@t0", "block@t1", "block@t2"]
    # second route: run the steps by hand
    h = x
    for t in range(3):
        pre = model.block(h)
        torch.testing.assert_close(out[f"block@t{t}"], pre)
        h = torch.tanh(pre)


def test_stops_after_deepest_stage_from_second_batch_on():
    model = Recurrent()
    extractor = Extractor(model, {"block": "block"})
    extractor(torch.randn(2, 6))
    assert model.after_calls == 1  # the first batch runs everything, to count calls
    extractor(torch.randn(2, 6))
    assert model.after_calls == 1, "the head after the last block call must not run"
    Extractor(model, {"block": "block"}, stop_early=False)(torch.randn(2, 6))
    assert model.after_calls == 2


def test_eval_mode_inside_and_callers_modes_restored():
    model = nn.Sequential(nn.Linear(5, 5), nn.Dropout(0.9), nn.BatchNorm1d(5))
    model.train()
    model[2].eval()  # a mixed state the caller chose
    x = torch.randn(8, 5)
    out = Extractor(model, {"dropout": "1"})(x)
    torch.testing.assert_close(out["dropout"], model[0](x))  # dropout is identity in eval
    assert model.training and model[0].training and model[1].training
    assert not model[2].training


def test_outputs_are_not_inference_graph_bound_and_input_stage_is_the_batch(images):
    model = ConvInplaceRelu()
    out = Extractor(model, {"natural_image": "", "relu": "relu"})(images)
    torch.testing.assert_close(out["natural_image"], images)
    assert not out["relu"].requires_grad


def test_unknown_module_path_names_close_matches_and_lister():
    model = ConvInplaceRelu()
    with pytest.raises(KeyError) as info:
        Extractor(model, {"x": "relu1"})
    message = info.value.args[0]
    assert "'relu'" in message and "featx.list_modules" in message


def test_unknown_registry_stage_is_refused():
    model = featx.load_model("alexnet", "random")
    with pytest.raises(KeyError, match="relu0"):
        Extractor(model, ["relu9"])


def test_stage_names_need_a_registry_model():
    with pytest.raises(TypeError, match="mapping"):
        Extractor(ConvInplaceRelu(), ["relu"])


def test_tuple_output_is_refused_with_module_named():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    model = nn.Sequential()
    model.add_module("pair", Pair())
    with pytest.raises(TypeError, match="'pair'"):
        Extractor(model, {"p": "pair"})(torch.randn(2, 3))


def test_list_modules_lists_paths():
    paths = dict(featx.list_modules(ConvInplaceRelu()))
    assert paths == {"conv": "Conv2d", "relu": "ReLU", "head": "Linear"}
