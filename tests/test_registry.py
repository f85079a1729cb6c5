"""The registry against the seed document, and against real forward passes."""

import re

import pytest
import torch

import featx
from featx.registry import RegistryError, get_entry, list_models, load_entry_file

# Section titles of the seed document -> registry names.
SEED_TITLES = {
    "CORnet-S": "cornet_s",
    "VGG19": "vgg19",
    "ResNet50": "resnet50",
    "ResNet101": "resnet101",
    "AlexNet": "alexnet",
    "LowpassAlexNet": "lowpass_alexnet",
    "VOneAlexNet": "vone_alexnet",
    "CochResNet50": "coch_resnet50",
    "CochCNN9": "coch_cnn9",
}
SHAPE = re.compile(r"^\((\d+(?:\s*,\s*\d+)*)\)$")


def parse_seed_tables(text: str) -> dict[str, dict[str, tuple[tuple[int, ...], int]]]:
    """{registry name: {stage: (shape, features)}} from the document's tables."""
    tables: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        if line.strip() in SEED_TITLES:
            current = SEED_TITLES[line.strip()]
            tables[current] = {}
            continue
        cells = [c.strip() for c in line.split("\t")]
        if current is None or len(cells) < 4 or not cells[0]:
            continue
        shape, features = SHAPE.match(cells[2]), cells[3].rstrip("*")
        if shape and features.isdigit():
            dims = tuple(int(d) for d in shape.group(1).split(","))
            tables[current][cells[0]] = (dims, int(features))
    return tables


@pytest.fixture(scope="module")
def seed_tables(shared):
    (seed,) = sorted((shared / "seeds").glob("*.txt"))
    return parse_seed_tables(seed.read_text())


def test_seed_document_parses_into_nine_tables(seed_tables):
    assert sorted(seed_tables) == sorted(SEED_TITLES.values())
    assert all(len(table) >= 6 for table in seed_tables.values())


def test_all_nine_models_registered():
    assert sorted(list_models()) == sorted(SEED_TITLES.values())


@pytest.mark.parametrize("name", sorted(SEED_TITLES.values()))
def test_stage_table_matches_seed_document(name, seed_tables):
    entry = get_entry(name)
    documented = seed_tables[name]
    assert entry.stage_names == list(documented), "stage names and order as in the document"
    for stage in entry.stages:
        shape, features = documented[stage.name]
        assert stage.shape == shape, stage.name
        assert stage.features == features, stage.name


@pytest.mark.parametrize("name", sorted(SEED_TITLES.values()))
def test_stage_shapes_match_a_forward_pass(name):
    """Every registered stage produces the registered shape on the contract's input size."""
    entry = get_entry(name)
    model = featx.load_model(name, "random")
    if entry.modality == "image":
        batch = torch.rand(1, 3, entry.input.size, entry.input.size)
    else:
        batch = 0.1 * torch.randn(1, entry.input.n_samples)
    outputs = featx.Extractor(model, entry.stage_names)(batch)
    assert list(outputs) == entry.stage_names
    for stage in entry.stages:
        out = outputs[stage.name]
        assert tuple(out.shape[1:]) == stage.shape, stage.name
        assert torch.isfinite(out).all(), stage.name


def test_unknown_model_names_close_matches():
    with pytest.raises(KeyError, match="resnet50"):
        get_entry("resnet5")


def test_unknown_stage_lists_stages_and_close_matches():
    with pytest.raises(KeyError) as info:
        get_entry("alexnet").stage("relu5")
    message = info.value.args[0]
    assert "'relu0'" in message or "relu4" in message
    assert "featx stages alexnet" in message


def test_alias_resolves_to_document_name():
    assert get_entry("coch_cnn9").stage("relufc").name == "relu5"




@pytest.mark.parametrize(
    "change, field",
    [
        (lambda t: t.replace('modality = "image"', 'modality = "video"'), "modality"),
        (lambda t: t.replace("features = 193600", "features = 193601"), "stages[1].features"),
        (lambda t: t.replace('layout = "state_dict"', 'layout = "zip"'), "weights.layout"),
        (lambda t: t.replace("size = 224\n", 'size = "224"\n'), "input.size"),
        (lambda t: t.replace('dims = ["feature"] }', 'dims = ["feature", "x"] }', 1), "dims"),
        (lambda t: t.replace('name = "alexnet"', 'name = "other"'), "'name'"),
        (lambda t: t.replace("[weights]", "[weights"), "not valid TOML"),
    ],
)
def test_malformed_entry_names_file_and_field(tmp_path, change, field):
    text = change(open(get_entry("alexnet").path).read())
    path = tmp_path / "alexnet.toml"
    path.write_text(text)
    with pytest.raises(RegistryError) as info:
        load_entry_file(path)
    assert str(path) in str(info.value)
    assert field in str(info.value)
