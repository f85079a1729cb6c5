"""`featx extract` end to end for the five custom models, on the bundled examples.

Each run loads the stand-in checkpoint of ``shared/fidelity`` (written in its
published layout by the fidelity tests' helpers) through the command line, over
``examples/images`` or ``examples/sounds``. The stored rows are compared with a
second route: the same stimulus decoded by the source and run through
``featx.load_model`` + ``featx.Extractor`` directly.
"""

from pathlib import Path

import h5py
import numpy as np
import pytest
import soundfile
import torch

import featx
from featx.cli import main
from featx.pipeline import build_source
from test_fidelity_audio import stand_in_state, write_feather
from test_fidelity_vision import write_stand_in

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def checkpoint_for(name: str, shared: Path, fill_module, folder: Path) -> Path:
    path = folder / featx.get_entry(name).weights.file
    if featx.get_entry(name).modality == "audio":
        return write_feather(stand_in_state(shared / "fidelity", fill_module, name), path)
    return write_stand_in(shared / "fidelity", fill_module, name, path)


def run_cli(*args: str) -> None:
    assert main(["extract", *args, "--workers", "0", "--no-progress"]) == 0


def assert_rows_match_direct_route(store: Path, name: str, weights: Path, inputs: Path, rows: list[int],
                                   **options) -> None:
    entry = featx.get_entry(name)
    model = featx.load_model(name, weights, **options)
    extractor = featx.Extractor(model, entry.stage_names)
    source = build_source(entry, inputs)
    with h5py.File(store, "r") as f:
        ids = [s.decode() if isinstance(s, bytes) else s for s in f["stimulus"][:]]
        assert ids == [s.id for s in source.stimuli]
        # the rows run as one batch, as in the store: the cochleagram's values in channels
        # without energy depend on the FFT's batch size (README, Known limits)
        expected = extractor(torch.stack([source.load(row) for row in rows]))
        for i, row in enumerate(rows):
            for stage in entry.stages:
                got = f[stage.name][row]
                assert got.shape == stage.shape
                want = expected[stage.name][i].numpy()
                scale = float(np.abs(want).max()) or 1.0
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale, err_msg=stage.name)


@pytest.mark.parametrize("name", ["cornet_s", "lowpass_alexnet", "vone_alexnet"])
def test_extract_custom_vision_model_over_examples(name, shared, fill_module, tmp_path):
    weights = checkpoint_for(name, shared, fill_module, tmp_path)
    store = tmp_path / f"{name}.h5"
    run_cli(name, str(EXAMPLES / "images"), "-o", str(store), "--weights", str(weights), "--batch-size", "4")
    ds = featx.open_store(store)
    assert ds.attrs["weights_sha256"] == featx.checkpoints.sha256_file(weights)
    assert ds.sizes["stimulus"] == 8
    assert_rows_match_direct_route(store, name, weights, EXAMPLES / "images", rows=[4, 5, 6, 7])


def test_vone_noise_is_seeded_recorded_and_repeatable(shared, fill_module, tmp_path):
    weights = checkpoint_for("vone_alexnet", shared, fill_module, tmp_path)
    stores = []
    for i, extra in enumerate([[], [], ["--model-option", "noise=off"]]):
        store = tmp_path / f"vone{i}.h5"
        run_cli("vone_alexnet", str(EXAMPLES / "images" / "space"), "-o", str(store), "--weights", str(weights),
                "--stages", "v1_output,relu1", *extra)
        stores.append(store)
    with h5py.File(stores[0]) as a, h5py.File(stores[1]) as b, h5py.File(stores[2]) as off:
        np.testing.assert_array_equal(a["v1_output"][:], b["v1_output"][:])
        assert not np.allclose(a["v1_output"][:], off["v1_output"][:])
        assert '"noise": "on"' in a.attrs["featx_config"] and '"noise_seed": 0' in a.attrs["featx_config"]
        assert '"noise": "off"' in off.attrs["featx_config"]


def test_extract_coch_resnet50_over_example_sounds(shared, fill_module, tmp_path):
    weights = checkpoint_for("coch_resnet50", shared, fill_module, tmp_path)
    store = tmp_path / "coch.h5"
    run_cli("coch_resnet50", str(EXAMPLES / "sounds"), "-o", str(store), "--weights", str(weights),
            "--batch-size", "2")
    assert featx.open_store(store).sizes["stimulus"] == len(list((EXAMPLES / "sounds").glob("*.[wf][al]*")))
    assert_rows_match_direct_route(store, "coch_resnet50", weights, EXAMPLES / "sounds", rows=[0, 1])


def test_stereo_with_equal_channels_gives_the_mono_features(tmp_path):
    t = np.arange(int(2.5 * 22050)) / 22050
    wave = (0.3 * np.sin(2 * np.pi * 440 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    (tmp_path / "mono").mkdir()
    (tmp_path / "stereo").mkdir()
    soundfile.write(tmp_path / "mono" / "a.wav", wave, 22050, subtype="FLOAT")
    soundfile.write(tmp_path / "stereo" / "a.wav", np.stack([wave, wave], axis=1), 22050, subtype="FLOAT")
    values = {}
    for kind in ("mono", "stereo"):
        store = tmp_path / f"{kind}.h5"
        run_cli("coch_cnn9", str(tmp_path / kind), "-o", str(store), "--weights", "random",
                "--stages", "cochleagram,relu2,final")
        with h5py.File(store) as f:
            values[kind] = {k: f[k][:] for k in ("cochleagram", "relu2", "final")}
    for stage in values["mono"]:
        np.testing.assert_array_equal(values["mono"][stage], values["stereo"][stage])
