"""The ``featx`` command line, run in-process with ``featx.cli.main([...])``.

Listing commands are checked against the registry files read directly; ``info``
and the recorded provenance against the files and libraries themselves; user
errors must give exit code 2 and a one-line message, without a traceback.
Extractions are tiny: alexnet's first stage with random weights over a few small
generated images.
"""

import hashlib
import json
import shutil
import subprocess
import tomllib
from datetime import datetime
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import featx
from featx.cli import main
from conftest import RUN_MODE_VARIABLES

REPO = Path(__file__).resolve().parents[1]
FAST = ["--stages", "relu0", "--weights", "random", "--batch-size", "1", "--workers", "0",
        "--no-progress"]
RELU0_VALUES = 64 * 55 * 55  # per stimulus, from the seed document's table


def make_images(folder: Path, n: int, *, seed: int = 3, prefix: str = "im") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 256, (36 + 4 * i, 50, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{prefix}{i}.png")
    return folder


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert err.startswith("featx: error: ") and err.endswith("\n"), err
    assert err.count("\n") == 1, f"expected one line:\n{err}"
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("cli") / "images", 3)


@pytest.fixture(scope="module")
def store(images) -> Path:
    out = images.parent / "store.h5"
    with pytest.MonkeyPatch.context() as mp:
        for name in RUN_MODE_VARIABLES:
            mp.delenv(name, raising=False)
        assert main(["extract", "alexnet", str(images), "-o", str(out), "--background", "black", *FAST]) == 0
    return out


# --------------------------------------------------------------------------- listing


def test_models_lists_every_registry_file(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0
    files = sorted((REPO / "registry").glob("*.toml"))
    names = [line.split()[0] for line in out.splitlines()]
    assert names == sorted(p.stem for p in files)
    for line, path in zip(out.splitlines(), files):
        data = tomllib.loads(path.read_text())
        assert f" {data['modality']} " in line and f"{len(data['stages'])} stages" in line


def test_stages_prints_the_registry_table(capsys):
    code, out, _ = run(capsys, "stages", "alexnet")
    assert code == 0
    table = tomllib.loads((REPO / "registry" / "alexnet.toml").read_text())["stages"]
    lines = out.splitlines()
    for stage in table:
        row = next(line for line in lines if line.split()[:1] == [stage["name"]])
        shape = "(" + ", ".join(map(str, stage["shape"])) + ")"
        assert shape in row and row.split()[-1] == str(stage["features"])
        assert (stage["module"] or "(input)") in row


@pytest.mark.parametrize("command", ["stages", "extract"])
def test_unknown_model(capsys, tmp_path, command):
    argv = [command, "alexnt"] + (["in", "-o", tmp_path / "x.h5"] if command == "extract" else [])
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, "'alexnt'", "Did you mean 'alexnet'", "featx models")


# --------------------------------------------------------------------------- user errors


def test_unknown_stage_fails_before_any_work(capsys, images, tmp_path):
    code, _, err = run(capsys, "extract", "alexnet", images, "-o", tmp_path / "x.h5", "--stages", "relu0,relu9",
                       "--weights", "random")
    assert_one_line_error(code, err, "no stage 'relu9'", "featx stages alexnet")
    assert not (tmp_path / "x.h5").exists()


def test_empty_and_missing_folders(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    code, _, err = run(capsys, "extract", "alexnet", tmp_path / "empty", "-o", tmp_path / "x.h5", *FAST)
    assert_one_line_error(code, err, "no image files found", str(tmp_path / "empty"))
    code, _, err = run(capsys, "extract", "alexnet", tmp_path / "absent", "-o", tmp_path / "x.h5", *FAST)
    assert_one_line_error(code, err, str(tmp_path / "absent"), "does not exist")


@pytest.mark.parametrize(("flag", "value", "fragment"), [
    ("--background", "pink", "--background 'pink'"),
    ("--background", "1,2", "--background '1,2'"),
    ("--background", "300,0,0", "--background '300,0,0'"),
    ("--max-store-size", "lots", "--max-store-size 'lots'"),
    ("--max-store-size", "0", "must be positive"),
    ("--max-store-size", "12Q", "--max-store-size '12Q'"),
    ("--model-option", "noise", "--model-option 'noise' must be KEY=VALUE"),
    ("--model-option", "=3", "--model-option '=3' must be KEY=VALUE"),
    ("--model-option", "noise=off", "has no option 'noise'"),
    ("--batch-size", "0", "--batch-size 0"),
    ("--reduce", "mean", "--reduce 'mean'"),
])
def test_bad_flag_values(capsys, images, tmp_path, flag, value, fragment):
    argv = ["extract", "alexnet", images, "-o", tmp_path / "x.h5", *FAST, flag, value]
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "x.h5").exists()


def test_a_bad_choice_is_an_argparse_error(capsys, images, tmp_path):
    with pytest.raises(SystemExit) as stop:
        main(["extract", "alexnet", str(images), "-o", str(tmp_path / "x.h5"), "--precision", "fp8"])
    assert stop.value.code == 2
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


def test_existing_output_without_overwrite(capsys, images, store, tmp_path):
    other = tmp_path / "notes.h5"
    other.write_text("my notes, not a store")
    code, _, err = run(capsys, "extract", "alexnet", images, "-o", other, *FAST)
    assert_one_line_error(code, err, str(other), "not a featx store", "--overwrite")
    assert other.read_text() == "my notes, not a store"

    # a finished store made with other settings is neither resumed nor replaced
    copy = Path(shutil.copy(store, tmp_path / "store.h5"))
    code, _, err = run(capsys, "extract", "alexnet", images, "-o", copy, *FAST)  # white background
    assert code == 2 and "preprocessing.background" in err and "--overwrite" in err
    code, _, err = run(capsys, "extract", "alexnet", images, "-o", copy, *FAST, "--overwrite")
    assert code == 0, err


# --------------------------------------------------------------------------- size and precision


def test_size_limit_refusal_says_how_much_is_needed(capsys, images, tmp_path):
    out = tmp_path / "big.h5"
    code, _, err = run(capsys, "extract", "alexnet", images, "-o", out, *FAST, "--max-store-size", "1M")
    assert_one_line_error(code, err, "more than the limit of 1.0 MiB")
    needed_mib = float(err.split("needs about ")[1].split(" MiB")[0])
    values_mib = 3 * RELU0_VALUES * 4 / 2**20  # 3 stimuli x relu0, float32
    assert values_mib <= needed_mib <= values_mib + 2
    assert not out.exists()
    # float16 halves the values: a limit between the two sizes refuses float32 only
    limit = f"{int((values_mib / 2 + 1.5) * 2**20)}"
    code, _, err = run(capsys, "extract", "alexnet", images, "-o", out, *FAST, "--max-store-size", limit)
    assert_one_line_error(code, err, "more than the limit")
    code, _, err = run(capsys, "extract", "alexnet", images, "-o", out, *FAST, "--max-store-size", limit,
                       "--dtype", "float16")
    assert code == 0, err


def test_disk_space_refusal(capsys, images, tmp_path, monkeypatch):
    free = 5 << 20

    def disk_usage(path):
        return shutil._ntuple_diskusage(100 << 30, (100 << 30) - free, free)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    out = tmp_path / "x.h5"
    code, _, err = run(capsys, "extract", "alexnet", images, "-o", out, *FAST)
    assert_one_line_error(code, err, "needs about", "has only 5.0 MiB free")
    assert not out.exists()


def test_float16_overflow_names_the_stage(capsys, images, tmp_path, monkeypatch):
    """A value beyond float16's range (65504) stops the run, naming the stage;
    the batches before it stay written, and float32 storage takes the values."""
    import featx.pipeline

    original = featx.pipeline.Job.run_batch
    calls = []

    def run_batch(self, batch):
        values = original(self, batch)
        calls.append(1)
        if len(calls) == 2:  # the second stimulus has one huge activation
            values["relu0"][0, 3, 10, 10] = 1e6
        return values

    monkeypatch.setattr(featx.pipeline.Job, "run_batch", run_batch)
    out = tmp_path / "half.h5"
    code, _, err = run(capsys, "extract", "alexnet", images, "-o", out, *FAST, "--dtype", "float16")
    assert_one_line_error(code, err, "stage 'relu0'", "float16", "'im1.png'", "--storage-dtype float32")
    with h5py.File(out, "r", swmr=True) as h5:
        assert h5["row_complete"][()].tolist()[:2] == [1, 0]
        assert h5.attrs["store_state"] == "writing"

    calls.clear()
    code, _, err = run(capsys, "extract", "alexnet", images, "-o", out, *FAST, "--storage-dtype", "float32",
                       "--overwrite")
    assert code == 0, err
    with h5py.File(out, "r") as h5:
        assert h5["relu0"][1, 3, 10, 10] == 1e6


# --------------------------------------------------------------------------- info and provenance


def test_info_summarises_a_store(capsys, store):
    code, out, _ = run(capsys, "info", store)
    assert code == 0
    assert out.startswith(f"featx store {store}\n")
    assert "state: complete (3 of 3 rows complete)" in out
    assert "relu0  (channel=64, y=55, x=55)  float32" in out
    assert "model: alexnet" in out and "weights_sha256: random init, seed 0" in out
    assert "command: featx extract alexnet " in out


def test_info_on_an_unfinished_store(capsys, store, tmp_path):
    copy = Path(shutil.copy(store, tmp_path / "partial.h5"))
    with h5py.File(copy, "r+") as h5:
        h5["row_complete"][2] = 0
        h5.attrs["store_state"] = "writing"
    code, out, _ = run(capsys, "info", copy)
    assert code == 0 and "state: writing (2 of 3 rows complete)" in out


def test_info_on_a_missing_store(capsys, tmp_path):
    code, _, err = run(capsys, "info", tmp_path / "absent.h5")
    assert_one_line_error(code, err, "no store at")


def test_provenance_is_recorded(store, images):
    with h5py.File(store, "r") as h5:
        config = json.loads(h5.attrs["featx_config"])
        prov = json.loads(h5.attrs["featx_provenance"])
        rows = {name: [v.decode() if isinstance(v, bytes) else v for v in h5[name][()]]
                for name in ("stimulus", "stimulus_path", "stimulus_sha256", "stimulus_bytes")}
        assert h5["row_complete"][()].tolist() == [1, 1, 1]
        assert h5.attrs["store_state"] == "complete"

    # per stimulus: id, source path, size and sha256 of the file itself
    files = sorted(images.glob("*.png"))
    assert rows["stimulus"] == [f.name for f in files]
    assert rows["stimulus_path"] == [str(f.resolve()) for f in files]
    assert rows["stimulus_bytes"] == [f.stat().st_size for f in files]
    assert rows["stimulus_sha256"] == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]

    # model, registry entry with its hash, weights, every setting that made the values
    toml = REPO / "registry" / "alexnet.toml"
    assert config["model"] == {"name": "alexnet", "options": {},
                               "registry_sha256": hashlib.sha256(toml.read_bytes()).hexdigest()}
    assert config["weights"]["source"] == "random" and config["weights"]["seed"] == 0
    assert config["stages"] == {"relu0": "features.1"}
    contract = tomllib.loads(toml.read_text())["input"]
    pre = config["preprocessing"]
    assert (pre["size"], pre["resize"], pre["background"]) == (contract["size"], contract["resize"], [0, 0, 0])
    assert config["precision"] == "fp32" and config["storage_dtype"] == "float32"
    assert config["store_layout"]["compression"] is None

    # software, machine, run
    assert prov["featx_version"] == featx.__version__
    assert (prov["torch_version"], prov["numpy_version"], prov["h5py_version"]) == (
        torch.__version__, np.__version__, h5py.__version__)
    if (REPO / ".git").exists() and shutil.which("git"):
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
        assert prov["featx_git_revision"] == head.stdout.strip()
    assert prov["device"] == "cpu" and prov["precision"] == "fp32" and prov["batch_size"] == 1
    assert prov["command"] == (f"featx extract alexnet {images} -o {store} --background black "
                               + " ".join(FAST))
    start = datetime.fromisoformat(prov["start_time"])
    assert start <= datetime.fromisoformat(prov["end_time"])


# --------------------------------------------------------------------------- merge


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict:
    """Stores over two disjoint folders, and one store over both folders at once."""
    root = tmp_path_factory.mktemp("merge")
    both = root / "both"
    make_images(both / "a", 3, seed=1, prefix="a")
    make_images(both / "b", 2, seed=2, prefix="b")
    stores = {}
    with pytest.MonkeyPatch.context() as mp:
        for name in RUN_MODE_VARIABLES:
            mp.delenv(name, raising=False)
        for name, folder in (("a", both / "a"), ("b", both / "b"), ("both", both)):
            stores[name] = root / f"{name}.h5"
            assert main(["extract", "alexnet", str(folder), "-o", str(stores[name]), *FAST,
                         "--reduce", "spatial-mean"]) == 0
    return stores


def read(path) -> dict:
    with h5py.File(path, "r") as h5:
        out = {"stimulus": [v.decode() for v in h5["stimulus"][()]], "state": h5.attrs["store_state"]}
        out.update({name: h5[name][()] for name in ("relu0", "relu0.spatial_mean")})
    return out


def test_merge_equals_one_run_over_all_stimuli(capsys, parts, tmp_path):
    merged = tmp_path / "all.h5"
    code, out, err = run(capsys, "merge", parts["a"], parts["b"], "-o", merged)
    assert code == 0, err
    got, a, b, both = read(merged), read(parts["a"]), read(parts["b"]), read(parts["both"])
    assert got["state"] == "complete"
    assert got["stimulus"] == a["stimulus"] + b["stimulus"]
    assert both["stimulus"] == ["a/" + s for s in a["stimulus"]] + ["b/" + s for s in b["stimulus"]]
    for name in ("relu0", "relu0.spatial_mean"):
        np.testing.assert_array_equal(got[name], np.concatenate([a[name], b[name]]))
        np.testing.assert_array_equal(got[name], both[name])
    code, out, _ = run(capsys, "info", merged)
    assert "merged from 2 stores: a.h5, b.h5" in out


def test_merge_refuses_other_settings_and_shared_stimuli(capsys, parts, images, tmp_path):
    other = tmp_path / "black.h5"
    assert main(["extract", "alexnet", str(images), "-o", str(other), *FAST, "--reduce", "spatial-mean",
                 "--background", "black"]) == 0
    code, _, err = run(capsys, "merge", parts["a"], other, "-o", tmp_path / "x.h5")
    assert code == 2 and "different settings" in err and "preprocessing.background" in err, err
    assert not (tmp_path / "x.h5").exists()

    again = Path(shutil.copy(parts["a"], tmp_path / "a_again.h5"))
    code, _, err = run(capsys, "merge", parts["a"], again, "-o", tmp_path / "x.h5")
    assert_one_line_error(code, err, "appear in more than one input", "'a0.png'")
    assert not (tmp_path / "x.h5").exists()

    code, _, err = run(capsys, "merge", parts["a"], tmp_path / "absent.h5", "-o", tmp_path / "x.h5")
    assert_one_line_error(code, err, str(tmp_path / "absent.h5"))



# --- found by a first-use test ---------------------------------------------------

IMAGES = Path(__file__).resolve().parents[1] / "examples" / "images"


def test_uint8_input_is_refused_not_turned_into_nan():
    import torch

    import featx

    model = featx.load_model("alexnet", "random")
    with pytest.raises(TypeError, match="x.float\\(\\) / 255"):
        featx.Extractor(model, ["relu0"])((torch.rand(1, 3, 224, 224) * 255).to(torch.uint8))


def test_input_in_0_255_warns_that_it_is_clamped():
    import torch

    import featx
    from featx.models._input import InputRangeWarning

    model = featx.load_model("alexnet", "random")
    with pytest.warns(InputRangeWarning, match="0-255"):
        featx.Extractor(model, ["relu0"])(torch.rand(1, 3, 224, 224) * 255)


def test_reduce_only_refuses_to_drop_a_stage_it_cannot_reduce(tmp_path, capsys):
    code = main(["extract", "alexnet", str(IMAGES), "-o", str(tmp_path / "r.h5"), "--weights", "random",
                 "--stages", "relu0,final", "--reduce", "spatial-mean", "--reduce-only", "--no-progress"])
    assert code == 2
    assert "'final'" in capsys.readouterr().err
    assert not (tmp_path / "r.h5").exists()


def test_stage_name_clashing_with_a_reduction_is_refused(tmp_path, capsys):
    code = main(["extract", "alexnet", str(IMAGES), "-o", str(tmp_path / "r.h5"), "--weights", "random",
                 "--stages", "relu0.spatial_mean=features.3,relu0", "--reduce", "spatial-mean", "--no-progress"])
    assert code == 2
    assert "relu0.spatial_mean" in capsys.readouterr().err


def test_oversized_projection_is_refused(tmp_path, capsys):
    code = main(["extract", "alexnet", str(IMAGES), "-o", str(tmp_path / "r.h5"), "--weights", "random",
                 "--stages", "final", "--reduce", "srp:5000", "--no-progress"])
    assert code == 2
    assert "only 1000 features" in capsys.readouterr().err


def test_bad_workers_leaves_an_existing_store_untouched(tmp_path):
    store = tmp_path / "keep.h5"
    argv = ["extract", "alexnet", str(IMAGES / "space"), "-o", str(store), "--weights", "random",
            "--stages", "relu0", "--no-progress"]
    assert main(argv) == 0
    before = store.read_bytes()
    assert main([*argv, "--workers", "-1", "--overwrite"]) == 2
    assert store.read_bytes() == before


def test_rerun_of_a_complete_store_is_nothing_to_do(tmp_path):
    store = tmp_path / "done.h5"
    argv = ["extract", "alexnet", str(IMAGES / "space"), "-o", str(store), "--weights", "random",
            "--stages", "relu0", "--no-progress"]
    assert main(argv) == 0
    before = store.read_bytes()
    assert main(argv) == 0
    assert store.read_bytes() == before


def test_open_store_after_a_plain_xarray_open_in_the_same_process(tmp_path):
    import xarray as xr

    import featx

    store = tmp_path / "s.h5"
    assert main(["extract", "alexnet", str(IMAGES / "space"), "-o", str(store), "--weights", "random",
                 "--stages", "relu0", "--no-progress"]) == 0
    with xr.open_dataset(store, engine="h5netcdf") as plain:
        ds = featx.open_store(store)
        assert ds["relu0"].shape == plain["relu0"].shape
        ds.close()
