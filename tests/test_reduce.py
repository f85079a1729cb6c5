"""Streaming reductions (featx/reduce.py) on their own and as written by featx.extract.

Stores are written with randomly initialised weights (seed 0) on the CPU, so the tests
need no downloads. The store-side tests read the files with h5py and xarray, as an
analysis would, without featx's reader.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import featx
from featx.reduce import Reduction, parse_reductions, sparse_projection

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "examples" / "images"
COMMON = "img2_coffee.jpg"  # the image both stimulus sets contain
SRP = "srp:64:3"
SRP_SETTINGS = {"kind": "srp", "dim": 64, "seed": 3, "density": "1/sqrt(n_features)", "generator": "numpy PCG64"}
RELU3_FEATURES = 256 * 13 * 13  # AlexNet relu3, (channel, y, x)
FC0_FEATURES = 4096


def extract(model: str, inputs, store: Path, **kw):
    kw = {"weights": "random", "device": "cpu", "workers": 0, "progress": False, "overwrite": True, **kw}
    return featx.extract(model, inputs, store, **kw)


def read(path: Path, name: str) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f[name][...]


def stimulus_ids(path: Path) -> list[str]:
    with h5py.File(path, "r") as f:
        return [s.decode() if isinstance(s, bytes) else str(s) for s in f["stimulus"][...]]


def config(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return json.loads(f.attrs["featx_config"])


def row(path: Path, name: str, stimulus: str) -> np.ndarray:
    ids = stimulus_ids(path)
    assert stimulus in ids, f"{stimulus} not in {path.name}: {ids}"
    return read(path, name)[ids.index(stimulus)]


def by_hand(matrix: torch.Tensor, full: np.ndarray) -> np.ndarray:
    """``matrix @ x`` for each flattened row of ``full``, in float64 from the COO entries."""
    rows, cols = matrix.indices().numpy()
    values = matrix.values().numpy().astype(np.float64)
    flat = full.reshape(len(full), -1).astype(np.float64)
    out = np.zeros((len(full), matrix.shape[0]))
    np.add.at(out.T, rows, values[:, None] * flat[:, cols].T)
    return out


def assert_close_rows(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-4) -> None:
    """Equal up to float32 summation order: relative to the largest magnitude in the row."""
    scale = np.abs(expected).max(axis=-1, keepdims=True) + 1e-30
    np.testing.assert_array_less(np.abs(actual - expected) / scale, rtol)


# --------------------------------------------------------------------------- stores


@pytest.fixture(scope="module")
def other_images(tmp_path_factory) -> Path:
    """A different stimulus set: three generated pictures plus a copy of COMMON."""
    folder = tmp_path_factory.mktemp("other_images")
    rng = np.random.default_rng(11)
    y, x = np.mgrid[0:160, 0:200] / 160
    for i in range(3):
        grating = np.sin(2 * np.pi * (4 + 3 * i) * (x * np.cos(i) + y * np.sin(i)))
        pixels = 0.5 + 0.3 * grating[..., None] * rng.uniform(0.2, 1, 3) + rng.normal(0, 0.05, (160, 200, 3))
        Image.fromarray((255 * pixels.clip(0, 1)).astype(np.uint8)).save(folder / f"made{i}.png")
    shutil.copy(IMAGES / COMMON, folder / COMMON)
    return folder


@pytest.fixture(scope="module")
def stores(tmp_path_factory, other_images) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("reduce_stores")
    stages = ["relu3", "fc0_relu"]
    paths = {}
    for name, inputs, reduce, keep_full in [
        ("bundled", IMAGES, [SRP, "spatial-mean"], True),
        ("bundled_again", IMAGES, [SRP, "spatial-mean"], True),
        ("other", other_images, [SRP, "spatial-mean"], True),
        ("seed4", IMAGES, ["srp:64:4"], False),
    ]:
        paths[name] = out / f"{name}.h5"
        extract("alexnet", inputs, paths[name], stages=stages, reduce=reduce, keep_full=keep_full)
    return paths


# --------------------------------------------------------------------------- srp in stores


def test_srp_identical_across_two_runs(stores):
    for name in ("relu3.srp64", "fc0_relu.srp64"):
        first, again = read(stores["bundled"], name), read(stores["bundled_again"], name)
        assert first.shape == again.shape
        np.testing.assert_array_equal(first, again)


def test_srp_same_seed_same_projection_across_stimulus_sets(stores):
    bundled, other = stores["bundled"], stores["other"]
    assert len(stimulus_ids(bundled)) != len(stimulus_ids(other))
    for stage in ("relu3", "fc0_relu"):
        # The common image has (nearly) the same activation in both runs (batches differ) ...
        full_a, full_b = row(bundled, stage, COMMON), row(other, stage, COMMON)
        assert_close_rows(full_b.reshape(1, -1), full_a.reshape(1, -1), rtol=1e-4)
        # ... and therefore the same projected row: the matrix does not depend on the set.
        a, b = row(bundled, f"{stage}.srp64", COMMON), row(other, f"{stage}.srp64", COMMON)
        assert np.abs(a).max() > 0
        assert_close_rows(b[None], a[None], rtol=1e-4)
    assert config(bundled)["reduce"] == config(other)["reduce"]


@pytest.mark.parametrize("store", ["bundled", "other"])
def test_srp_equals_sparse_projection_applied_by_hand(stores, store):
    path = stores[store]
    for stage, n_features in (("relu3", RELU3_FEATURES), ("fc0_relu", FC0_FEATURES)):
        full = read(path, stage)
        assert full.reshape(len(full), -1).shape[1] == n_features
        expected = by_hand(sparse_projection(n_features, 64, 3), full)
        stored = read(path, f"{stage}.srp64")
        assert stored.dtype == np.float32
        assert_close_rows(stored, expected, rtol=1e-4)


def test_srp_different_seed_gives_a_different_projection(stores):
    seed3, seed4 = read(stores["bundled"], "relu3.srp64"), read(stores["seed4"], "relu3.srp64")
    assert seed3.shape == seed4.shape
    # Two independent projections of the same data: not equal, and their
    # output features are unrelated (no sign flip or permutation of one another).
    assert not np.allclose(seed3, seed4, rtol=0.05, atol=0)
    c = np.corrcoef(seed3.ravel(), seed4.ravel())[0, 1]
    assert abs(np.abs(seed3).mean() - np.abs(seed4).mean()) / np.abs(seed3).mean() < 0.5  # same scale
    assert c < 0.99
    # Same input data though: the full activations (kept in "bundled") project to seed4 by hand.
    full = read(stores["bundled"], "relu3")
    assert_close_rows(seed4, by_hand(sparse_projection(RELU3_FEATURES, 64, 4), full), rtol=1e-4)


def test_srp_dimension_and_recorded_parameters(stores):
    import xarray as xr

    for name in ("bundled", "other"):
        path = stores[name]
        n = len(stimulus_ids(path))
        assert read(path, "relu3.srp64").shape == (n, 64)
        assert read(path, "fc0_relu.srp64").shape == (n, 64)
        assert config(path)["reduce"] == {
            "reductions": [SRP_SETTINGS, {"kind": "spatial-mean"}],
            "keep_full": True,
        }
        with xr.open_dataset(path, engine="h5netcdf") as ds:
            assert ds["relu3.srp64"].dims == ("stimulus", "relu3.srp64_feature")
            assert ds["relu3.spatial_mean"].dims == ("stimulus", "relu3.spatial_mean_channel")
            assert {"relu3", "fc0_relu", "relu3.srp64", "fc0_relu.srp64", "relu3.spatial_mean"} <= set(ds.data_vars)
            assert "fc0_relu.spatial_mean" not in ds.data_vars  # a vector has no y, x
            assert list(ds["stimulus"].values) == stimulus_ids(path)
        with h5py.File(path, "r") as f:
            assert f["relu3.srp64"].attrs["featx_stage"] == "relu3.srp64"

    seed4 = stores["seed4"]
    assert config(seed4)["reduce"] == {"reductions": [{**SRP_SETTINGS, "seed": 4}], "keep_full": False}
    with h5py.File(seed4, "r") as f:
        assert "relu3.srp64" in f and "fc0_relu.srp64" in f
        assert "relu3" not in f and "fc0_relu" not in f  # keep_full=False: reductions only


# --------------------------------------------------------------------------- means in stores


def test_spatial_mean_equals_numpy_mean_of_the_stored_full_activation(stores):
    for name in ("bundled", "other"):
        full = read(stores[name], "relu3")
        reduced = read(stores[name], "relu3.spatial_mean")
        assert full.shape[1:] == (256, 13, 13) and reduced.shape == (len(full), 256)
        expected = full.astype(np.float64).mean(axis=(2, 3))
        np.testing.assert_allclose(reduced, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


@pytest.fixture(scope="module")
def audio_store(tmp_path_factory) -> Path:
    """CochCNN9 (random weights) over two short WAVs, full maps and their time means side by side."""
    import soundfile as sf

    folder = tmp_path_factory.mktemp("sounds")
    rate = 16000  # resampled to the model's 20 kHz by the source
    t = np.arange(int(1.5 * rate)) / rate
    sf.write(folder / "tone.wav", 0.3 * np.sin(2 * np.pi * 440 * t) * np.exp(-t), rate)
    sf.write(folder / "noise.wav", np.random.default_rng(5).normal(0, 0.1, int(2.5 * rate)), rate, subtype="PCM_16")
    path = tmp_path_factory.mktemp("audio_store") / "coch.h5"
    extract("coch_cnn9", folder, path, stages=["natural_audio", "cochleagram", "relu2"],
            reduce=["time-mean"], keep_full=True)
    return path


def test_time_mean_equals_numpy_mean_of_the_stored_full_activation(audio_store):
    import xarray as xr

    for stage, shape, dims in [
        ("cochleagram", (1, 211, 390), ("cochleagram_channel", "cochleagram_frequency")),
        ("relu2", (512, 9, 17), ("relu2_channel", "relu2_frequency")),
    ]:
        full = read(audio_store, stage)
        reduced = read(audio_store, f"{stage}.time_mean")
        assert full.shape == (2, *shape) and reduced.shape == (2, *shape[:2])
        expected = full.astype(np.float64).mean(axis=3)
        assert np.abs(expected).max() > 0
        np.testing.assert_allclose(reduced, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
        with xr.open_dataset(audio_store, engine="h5netcdf") as ds:
            assert ds[f"{stage}.time_mean"].dims == ("stimulus", *(d.replace(stage, f"{stage}.time_mean") for d in dims))
    # A waveform (dims: time) reduces to one number per stimulus: its mean, 0 after demeaning.
    wave, wave_mean = read(audio_store, "natural_audio"), read(audio_store, "natural_audio.time_mean")
    assert wave_mean.shape == (2, 1)
    np.testing.assert_allclose(wave_mean[:, 0], wave.astype(np.float64).mean(axis=1), atol=1e-6)
    assert config(audio_store)["reduce"] == {"reductions": [{"kind": "time-mean"}], "keep_full": True}


# --------------------------------------------------------------------------- Reduction on its own


def test_means_apply_equals_numpy():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(3, 5, 7, 11)).astype(np.float32)
    batch = torch.from_numpy(maps)
    spatial = Reduction("spatial-mean").apply(batch, ("channel", "y", "x"))
    np.testing.assert_allclose(spatial.numpy(), maps.astype(np.float64).mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)
    timed = Reduction("time-mean").apply(batch, ("channel", "frequency", "time"))
    np.testing.assert_allclose(timed.numpy(), maps.astype(np.float64).mean(axis=3), rtol=1e-5, atol=1e-6)
    wave = torch.from_numpy(rng.normal(size=(3, 1000)).astype(np.float32))
    np.testing.assert_allclose(Reduction("time-mean").apply(wave, ("time",)).numpy(),
                               wave.double().mean(1, keepdim=True).numpy(), atol=1e-6)
    # what the store is told about the output of each
    assert Reduction("spatial-mean").output((5, 7, 11), ("channel", "y", "x")) == ((5,), ("channel",))
    assert Reduction("time-mean").output((5, 7, 11), ("channel", "frequency", "time")) == ((5, 7), ("channel", "frequency"))
    assert Reduction("time-mean").output((1000,), ("time",)) == ((1,), ("feature",))
    assert Reduction("srp", dim=9).output((5, 7, 11), ("channel", "y", "x")) == ((9,), ("feature",))
    assert not Reduction("spatial-mean").applies_to(("feature",))
    assert not Reduction("time-mean").applies_to(("channel", "y", "x"))
    assert Reduction("srp", dim=9).applies_to(("feature",))


def test_srp_apply_equals_the_matrix_and_depends_only_on_seed_size_and_dim():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 6, 10, 10)).astype(np.float32)
    out = Reduction("srp", dim=50, seed=7).apply(torch.from_numpy(x), ("channel", "y", "x")).numpy()
    assert out.shape == (4, 50) and out.dtype == np.float32
    assert_close_rows(out, by_hand(sparse_projection(600, 50, 7), x), rtol=1e-5)
    # Regenerated from scratch (not the cached object), the matrix is the same.
    first = sparse_projection(600, 50, 7)
    sparse_projection.cache_clear()
    again = sparse_projection(600, 50, 7)
    assert again is not first
    assert torch.equal(first.indices(), again.indices()) and torch.equal(first.values(), again.values())
    # Row j depends only on (seed, j, n): the first rows of a larger DIM have the same
    # positions and signs (the scale, sqrt(1 / (density * DIM)), follows DIM).
    wider = sparse_projection(600, 80, 7).to_dense()[:50]
    assert torch.equal(torch.sign(wider), torch.sign(first.to_dense()))
    torch.testing.assert_close(wider * math.sqrt(80 / 50), first.to_dense())
    # A different seed is a different matrix.
    other = sparse_projection(600, 50, 8)
    assert not torch.equal(first.to_dense(), other.to_dense())
    overlap = (first.to_dense() != 0) & (other.to_dense() != 0)
    assert overlap.sum() < 0.2 * first._nnz()  # positions are independent, not shared


def test_jl_pairwise_distances_are_preserved():
    """Johnson-Lindenstrauss: DIM=2000 keeps pairwise distances within 30 % (fixed seeds)."""
    rng = np.random.default_rng(2024)
    n_features = 20_000
    gaussian = rng.normal(size=(25, n_features))
    relu_like = np.maximum(rng.normal(size=(25, n_features)) + rng.normal(size=(25, 1)), 0)  # sparse, non-negative
    for vectors in (gaussian, relu_like):
        projected = Reduction("srp", dim=2000, seed=0).apply(torch.from_numpy(vectors.astype(np.float32)), ("feature",))
        projected = projected.numpy().astype(np.float64)
        ratios = [np.linalg.norm(projected[i] - projected[j]) / np.linalg.norm(vectors[i] - vectors[j])
                  for i, j in itertools.combinations(range(len(vectors)), 2)]
        assert 0.7 < min(ratios) and max(ratios) < 1.3, (min(ratios), max(ratios))
        assert abs(np.mean(ratios) - 1) < 0.05  # unbiased (squared norms are, in expectation)
        norms = np.linalg.norm(projected, axis=1) / np.linalg.norm(vectors, axis=1)
        assert 0.7 < norms.min() and norms.max() < 1.3


@pytest.mark.parametrize("n_features, dim", [(43264, 64), (4096, 500), (150528, 32)])
def test_projection_matrix_is_very_sparse(n_features, dim):
    m = sparse_projection(n_features, dim, 0)
    assert m.is_sparse and m.layout == torch.sparse_coo and m.is_coalesced()
    assert m.shape == (dim, n_features) and m.dtype == torch.float32
    density = 1 / math.sqrt(n_features)
    expected_nnz = density * n_features * dim
    assert abs(m._nnz() - expected_nnz) < 5 * math.sqrt(expected_nnz)  # Binomial count per row
    assert m._nnz() < 0.05 * n_features * dim
    # entries are +-sqrt(1 / (density * dim)), signs balanced, never two at one place
    values = m.values().double()
    scale = math.sqrt(1 / (density * dim))
    np.testing.assert_allclose(values.abs().numpy(), scale, rtol=1e-6)
    assert abs((values > 0).double().mean().item() - 0.5) < 0.05
    # columns spread over the whole input: no part of the activation is ignored
    cols = m.indices()[1].numpy()
    assert cols.min() < n_features * 0.01 and cols.max() > n_features * 0.99


def test_srp_apply_never_makes_a_dense_matrix(monkeypatch):
    """A big stage (CochCNN9 relu0 size) to 5000 features: a dense matrix would be 17.7 GB."""
    n_features, dim = 96 * 71 * 130, 5000

    def refuse(*args, **kwargs):
        raise AssertionError("the projection matrix was made dense")

    monkeypatch.setattr(torch.Tensor, "to_dense", refuse)
    sparse_projection.cache_clear()
    batch = torch.from_numpy(np.random.default_rng(3).random((2, 96, 71, 130), dtype=np.float32))
    out = Reduction("srp", dim=dim, seed=1).apply(batch, ("channel", "frequency", "time"))
    assert out.shape == (2, dim) and out.layout == torch.strided
    m = sparse_projection(n_features, dim, 1)
    assert m.is_sparse and m._nnz() < 1e-2 * n_features * dim
    # spot-check one output feature against its row, by hand
    rows, cols = m.indices()
    j = 1234
    pick = rows == j
    expected = (m.values()[pick].double() * batch.reshape(2, -1)[:, cols[pick]].double()).sum(1)
    np.testing.assert_allclose(out[:, j].double().numpy(), expected.numpy(), rtol=1e-4)
    sparse_projection.cache_clear()


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("spec", ["srp:64:3", "srp:10", "spatial-mean", "time-mean", "spatial-mean, srp:5:1"])
def test_parse_good_specs(spec):
    parsed = parse_reductions([spec])
    assert parsed
    if spec == "srp:64:3":
        assert parsed == [Reduction("srp", dim=64, seed=3)] and parsed[0].suffix == "srp64"
    if spec == "srp:10":
        assert parsed == [Reduction("srp", dim=10, seed=0)]
    if spec == "spatial-mean, srp:5:1":
        assert [r.suffix for r in parsed] == ["spatial_mean", "srp5"]
    assert parse_reductions(None) == [] and parse_reductions([]) == []


@pytest.mark.parametrize("spec", [
    "srp:0", "srp:x", "foo", "srp", "srp:", "srp:64:", "srp:1:2:3", "srp:-1", "srp:64:-3",
    "srp:1.5", "srp:²", "spatial-mean:2", "time_mean", "SRP:10",
])
def test_parse_errors(spec):
    with pytest.raises(ValueError, match="--reduce .* not understood; use spatial-mean, time-mean or srp:DIM"):
        parse_reductions([spec])


def test_parse_refuses_two_reductions_with_one_name():
    with pytest.raises(ValueError, match=r"more than once for <stage>\.srp64"):
        parse_reductions(["srp:64:1", "srp:64:2"])
    with pytest.raises(ValueError, match=r"more than once for <stage>\.spatial_mean"):
        parse_reductions(["spatial-mean,spatial-mean"])


def test_extract_refuses_a_bad_spec_before_writing(tmp_path):
    store = tmp_path / "never.h5"
    with pytest.raises(ValueError, match="srp:0"):
        extract("alexnet", IMAGES, store, stages=["relu0"], reduce=["srp:0"])
    assert not store.exists()
