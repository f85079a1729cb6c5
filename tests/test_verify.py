"""featx.verify: re-extracting a sample of a store's rows from its recorded settings.

The stores are made with non-default settings (random weights with seed 3, a black
background behind half-transparent images, a reduction), so a verify that ignored
any of them would re-extract other values and fail. Edits by hand, changed and
missing source files must be reported.
"""

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from featx.cli import main
from featx.store import StoreError
from featx.verify import CHANGED, DIFFERS, MATCH, MISSING, default_rtol, verify_store
from conftest import RUN_MODE_VARIABLES

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 4


def make_images(folder: Path, n: int, seed: int = 11) -> Path:
    """Half-transparent noise images, so that the background colour matters."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 256, (48 + 5 * i, 60, 4), dtype=np.uint8)
        pixels[..., 3] = rng.integers(0, 256, pixels.shape[:2])
        Image.fromarray(pixels, "RGBA").save(folder / f"pic{i}.png")
    return folder


def extract(images: Path, out: Path, *extra: str) -> Path:
    argv = ["extract", "alexnet", str(images), "-o", str(out), "--stages", "relu0",
            "--reduce", "spatial-mean", "--weights", "random:3", "--background", "black",
            "--batch-size", "2", "--workers", "0", "--no-progress", *extra]
    with pytest.MonkeyPatch.context() as mp:
        for name in RUN_MODE_VARIABLES:
            mp.delenv(name, raising=False)
        assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("verify")
    return extract(make_images(folder / "images", N_IMAGES), folder / "store.h5")


@pytest.fixture
def store(made, tmp_path) -> Path:
    """A private copy of the module's store, free to edit."""
    return Path(shutil.copy(made, tmp_path / "store.h5"))


def test_a_fresh_store_matches(store, capsys):
    report = verify_store(store, sample=3, seed=1)
    assert report.ok, report.summary()
    assert len(report.rows) == 3 and len({r.row for r in report.rows}) == 3
    assert all(r.status == MATCH for r in report.rows)
    assert {name for r in report.rows for name in r.differences} == {"relu0", "relu0.spatial_mean"}
    assert all(v <= report.rtol for r in report.rows for v in r.differences.values())
    assert report.summary().startswith(f"verify {store}: OK")
    # the same through the CLI; more rows asked than there are: all are checked
    assert main(["verify", str(store), "--sample", "10"]) == 0
    out = capsys.readouterr().out
    assert "OK: all 4 sampled stimuli match" in out


def test_a_value_edited_by_hand_is_reported(store, capsys):
    with h5py.File(store, "r+") as h5:
        row = h5["relu0"][2]
        row.flat[np.argmax(row)] *= 1.01  # one value, 1% of the row's largest
        h5["relu0"][2] = row
        h5["relu0.spatial_mean"][1, 5] += 0.5
    report = verify_store(store, sample=N_IMAGES)
    assert not report.ok
    statuses = {r.row: r.status for r in report.rows}
    assert statuses == {0: MATCH, 1: DIFFERS, 2: DIFFERS, 3: MATCH}
    assert report.rows[2].differences["relu0"] == pytest.approx(0.01, rel=0.01)
    assert report.rows[2].differences["relu0.spatial_mean"] <= report.rtol
    assert "FAILED: 2 of 4 sampled stimuli match" in report.summary()

    assert main(["verify", str(store), "--sample", str(N_IMAGES)]) == 1
    out = capsys.readouterr().out
    assert "row 2 'pic2.png': DIFFERS in 'relu0'" in out
    assert "row 1 'pic1.png': DIFFERS in 'relu0.spatial_mean'" in out


def test_changed_and_missing_source_files_are_reported(tmp_path):
    images = make_images(tmp_path / "images", 3, seed=2)
    store = extract(images, tmp_path / "half.h5", "--dtype", "float16")
    Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(images / "pic0.png")
    (images / "pic1.png").unlink()

    report = verify_store(store, sample=3)
    assert not report.ok
    assert [(r.stimulus, r.status) for r in report.rows] == [
        ("pic0.png", CHANGED), ("pic1.png", MISSING), ("pic2.png", MATCH)]
    assert "source file changed" in report.rows[0].detail
    assert str(images / "pic1.png") in report.rows[1].detail
    # the unchanged row matches within the float16 tolerance
    assert report.rtol == default_rtol("fp32", "float16")


def test_only_completed_rows_of_an_unfinished_store_are_checked(made, tmp_path):
    store = Path(shutil.copy(made, tmp_path / "partial.h5"))
    with h5py.File(store, "r+") as h5:  # rows 1 and 3 never written
        h5["row_complete"][[1, 3]] = 0
        h5["relu0"][1] = np.nan
        h5.attrs["store_state"] = "writing"
    report = verify_store(store, sample=N_IMAGES)
    assert report.ok, report.summary()
    assert [r.row for r in report.rows] == [0, 2]
    assert (report.n_complete, report.n_rows) == (2, N_IMAGES)


def test_a_store_without_completed_rows_is_not_verified(made, tmp_path):
    store = Path(shutil.copy(made, tmp_path / "empty.h5"))
    with h5py.File(store, "r+") as h5:
        h5["row_complete"][:] = 0
        h5.attrs["store_state"] = "writing"
    report = verify_store(store)
    assert not report.ok and report.rows == []
    assert "NOT VERIFIED" in report.summary()


def test_changed_settings_are_listed(store):
    with h5py.File(store, "r+") as h5:
        config = json.loads(h5.attrs["featx_config"])
        config["model"]["registry_sha256"] = "0" * 64
        h5.attrs["featx_config"] = json.dumps(config)
    report = verify_store(store, sample=1)
    assert report.ok  # the values still match ...
    keys = [key for key, _, _ in report.setting_differences]
    assert keys == ["model.registry_sha256"]  # ... and the changed record is shown
    assert "model.registry_sha256: '0000" in report.summary()


def test_a_moved_weights_file_is_named(store):
    with h5py.File(store, "r+") as h5:
        config = json.loads(h5.attrs["featx_config"])
        config["weights"] = {"source": "file", "sha256": "ab" * 32}
        h5.attrs["featx_config"] = json.dumps(config)
        provenance = json.loads(h5.attrs["featx_provenance"])
        provenance["weights"] = {"source": "file", "path": "/nowhere/alexnet.pth", "sha256": "ab" * 32}
        h5.attrs["featx_provenance"] = json.dumps(provenance)
    with pytest.raises(FileNotFoundError, match=r"/nowhere/alexnet.pth.*--weights PATH"):
        verify_store(store, sample=1)


def test_bad_arguments(store, tmp_path, capsys):
    for sample in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="sample="):
            verify_store(store, sample=sample)
    with pytest.raises(FileNotFoundError):
        verify_store(tmp_path / "absent.h5")
    (tmp_path / "text.h5").write_text("not a store")
    with pytest.raises(StoreError, match="not a featx store"):
        verify_store(tmp_path / "text.h5")
    with pytest.raises(ValueError, match="--device 'tpu'"):
        verify_store(store, device="tpu")
    with h5py.File(store, "r+") as h5:
        config = json.loads(h5.attrs["featx_config"])
        del config["stages"]
        h5.attrs["featx_config"] = json.dumps(config)
    with pytest.raises(StoreError, match="does not record its stages settings"):
        verify_store(store)
    assert main(["verify", str(tmp_path / "absent.h5")]) == 2
    assert capsys.readouterr().err.startswith("featx: error: no store at")


@pytest.mark.parametrize(("precision", "storage", "devices", "expected"), [
    ("fp32", "float32", ("cpu",), 1e-4),
    ("fp32", "float16", ("cpu", "cpu"), 1e-4 + 2e-3),
    ("fp32", "float32", ("cuda:0 (NVIDIA H100)", "cpu"), 1e-2),
    ("bf16", "float32", ("cpu",), 5e-2),
])
def test_default_tolerance(precision, storage, devices, expected):
    assert default_rtol(precision, storage, devices) == pytest.approx(expected)


def test_audio_windows_are_matched_by_onset(tmp_path):
    """Windowed audio: rows share a file and differ by onset."""
    sound = tmp_path / "chirp.flac"
    shutil.copy(REPO / "examples" / "sounds" / "chirp_16k.flac", sound)
    out = tmp_path / "sound.h5"
    with pytest.MonkeyPatch.context() as mp:
        for name in RUN_MODE_VARIABLES:
            mp.delenv(name, raising=False)
        assert main(["extract", "coch_cnn9", str(sound), "-o", str(out), "--stages", "cochleagram",
                     "--weights", "random", "--clip", "windows", "--hop", "0.5", "--workers", "0",
                     "--no-progress"]) == 0
    with h5py.File(out, "r+") as h5:
        onsets = h5["onset_s"][()]
        assert len(onsets) >= 2 and len(set(onsets)) == len(onsets)
        h5["cochleagram"][1] = h5["cochleagram"][0]  # the second window's values = the first's
    report = verify_store(out, sample=len(onsets))
    assert [r.status for r in report.rows] == [MATCH, DIFFERS] + [MATCH] * (len(onsets) - 2), \
        report.summary()
