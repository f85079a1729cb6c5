"""featx.store: round trips through h5py and xarray, SWMR readers, crashes, resume,
size planning, merging. Every store here is tiny and lives in tmp_path."""

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import xarray as xr

from featx import store as fs
from featx.store import (
    IncompleteStoreWarning,
    StageSpec,
    StoreBusyError,
    StoreCompleteError,
    StoreError,
    StoreLayout,
    StoreMismatchError,
    StoreOverflowError,
    StoreSizeError,
    StoreWriter,
    merge_stores,
    open_store,
    store_header,
    store_info,
)

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
STAGES = {
    "relu0": StageSpec((4, 5, 6), ("channel", "y", "x")),
    "final": StageSpec((7,), ("feature",)),
    "mystage@t1": StageSpec((3,), ("feature",)),
}
WAIT_S = 60  # bound on every wait for a child process


def make_layout(n=10, *, start=0, config=None, stages=None, **kwargs) -> StoreLayout:
    """A small layout with the columns a pipeline gives; row i is stimulus start+i."""
    ids = np.array([f"img/{start + i:03d}.png" for i in range(n)], dtype=object)
    columns = {
        "stimulus": ids,
        "stimulus_path": np.array([f"/data/{s}" for s in ids], dtype=object),
        "stimulus_sha256": np.array([f"{start + i:064x}" for i in range(n)], dtype=object),
        "stimulus_bytes": np.arange(start, start + n, dtype=np.int64) + 1000,
        "onset_s": np.linspace(0.0, 1.0, n),
        "padded": (np.arange(n) % 2 == 0),
    }
    config = config or {
        "model": {"name": "toy", "registry_sha256": "r" * 8},
        "weights": {"sha256": "w" * 64},
        "precision": "fp32",
    }
    attrs = {"command": "featx extract toy imgs out.h5", "device": "cpu",
             "start_time": "2026-01-01T00:00:00+00:00", "weights_sha256": "w" * 64,
             "model": "toy"}
    return StoreLayout(stages=stages or STAGES, n_rows=n, row_columns=columns,
                       config=config, attrs=attrs, **kwargs)


def row_values(rows, start=0, stages=None) -> dict:
    """Deterministic values: every value of row r encodes r (exact in float16)."""
    rows = np.asarray(rows)
    out = {}
    for k, (name, spec) in enumerate((stages or STAGES).items()):
        base = (rows + start)[:, None] * 8.0 + k
        ramp = (np.arange(spec.size) % 8) / 8.0
        out[name] = (base + ramp).reshape(len(rows), *spec.shape).astype(np.float32)
    return out


def write_all(path, layout, *, batch=4, start=0, finish=True, **open_kwargs):
    with StoreWriter.open(path, layout, **open_kwargs) as writer:
        todo = writer.pending_rows()
        for i in range(0, len(todo), batch):
            rows = todo[i:i + batch]
            writer.write_rows(rows, row_values(rows, start, layout.stages))
        if finish:
            writer.finish({"end_time": "2026-01-01T00:01:00+00:00"})
    return path


# Child processes import featx.store without running featx/__init__.py, which imports
# torch (seconds per process); the store module needs nothing else from the package.
CHILD_PRELUDE = f"""
import sys, types
featx = types.ModuleType("featx")
featx.__path__ = [{str(REPO / "featx")!r}]
sys.modules["featx"] = featx
sys.path.insert(0, {str(TESTS)!r})
"""


def start_child(code: str, *args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD_PRELUDE + code, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)


def read_line(proc, timeout=WAIT_S) -> str:
    """The child's next stdout line, or fail after ``timeout`` seconds."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        proc.kill()
        pytest.fail(f"child process sent nothing for {timeout} s")
    line = proc.stdout.readline()
    if not line:
        err = proc.stderr.read() if proc.stderr else ""
        pytest.fail(f"child process ended early:\n{err}")
    return line.strip()


# ----------------------------------------------------------------------------- layout


def test_chunk_rule():
    # small rows: as many rows as fit in 1 MiB, never more than the store has
    assert fs._chunk_shape(10_000, (1000,), 4, False) == (262, 1000)
    assert fs._chunk_shape(5, (1000,), 4, False) == (5, 1000)
    # compressed: one row per chunk
    assert fs._chunk_shape(10_000, (1000,), 4, True) == (1, 1000)
    # a row over 4 MiB is split into equal pieces along the first axis
    assert fs._chunk_shape(100, (64, 224, 224), 4, False) == (1, 16, 224, 224)
    # a single channel over 4 MiB: split the next axis too
    chunk = fs._chunk_shape(3, (2, 3000, 1000), 4, False)
    assert chunk[:2] == (1, 1) and 4 * np.prod(chunk) <= fs.CHUNK_MAX_BYTES


def test_variable_names():
    assert fs.variable_name("mystage@t1") == "mystage@t1"
    assert fs.variable_name("V4.conv2@t1") == "V4.conv2@t1"
    assert fs.variable_name("relu0.spatial-mean") == "relu0.spatial-mean"
    assert fs.variable_name("a/b") == "a%2Fb"
    assert fs.variable_name(".hidden") == "%2Ehidden"
    assert fs.variable_name("50%") == "50%25"


def test_layout_refuses_bad_input():
    with pytest.raises(ValueError, match="bfloat16.*float32"):
        make_layout(storage_dtype="bfloat16")
    with pytest.raises(ValueError, match="compression"):
        make_layout(compression="zstd")
    with pytest.raises(ValueError, match="one name per axis"):
        StageSpec((3, 4), ("channel",))
    layout = make_layout()
    columns = dict(layout.row_columns)
    columns["stimulus"] = np.array(["a"] * 10, dtype=object)
    with pytest.raises(ValueError, match="unique.*'a'"):
        StoreLayout(STAGES, 10, columns, {"m": 1})
    del columns["stimulus_sha256"]
    with pytest.raises(ValueError, match="stimulus_sha256"):
        StoreLayout(STAGES, 10, columns, {"m": 1})
    # a stage that takes a row column's name, and two stages whose dims collide
    with pytest.raises(ValueError, match="onset_s"):
        make_layout(stages={"onset_s": StageSpec((2,), ("feature",))})
    with pytest.raises(ValueError, match="a_b_c"):
        make_layout(stages={"a": StageSpec((2,), ("b_c",)), "a_b": StageSpec((2,), ("c",))})


# ----------------------------------------------------------------------------- round trip


def test_round_trip_h5py_and_xarray(tmp_path):
    path = write_all(tmp_path / "run.h5", make_layout())
    expected = row_values(np.arange(10))

    with h5py.File(path, "r") as h5:  # plain h5py, no featx
        assert h5.attrs["store_state"] == "complete"
        assert h5["mystage@t1"].shape == (10, 3)
        assert h5["relu0"].attrs["featx_stage"] == "relu0"
        np.testing.assert_array_equal(h5["relu0"][3], expected["relu0"][3])
        assert h5["stimulus"][2].decode() == "img/002.png"
        assert h5["row_complete"][()].tolist() == [1] * 10
        config = json.loads(h5.attrs["featx_config"])
        provenance = json.loads(h5.attrs["featx_provenance"])

    assert config["model"]["name"] == "toy"
    assert config["store_layout"]["stages"]["relu0"] == {"shape": [4, 5, 6],
                                                         "dims": ["channel", "y", "x"]}
    assert config["stimuli"]["count"] == 10
    assert provenance["command"].startswith("featx extract")
    assert provenance["end_time"] == "2026-01-01T00:01:00+00:00"

    ds = xr.open_dataset(path, engine="h5netcdf")  # plain xarray, no featx
    with ds:
        assert ds["relu0"].dims == ("stimulus", "relu0_channel", "relu0_y", "relu0_x")
        assert ds["mystage@t1"].dims == ("stimulus", "mystage@t1_feature")
        assert ds["final"].dtype == np.float32
        assert ds.indexes["stimulus"].tolist() == [f"img/{i:03d}.png" for i in range(10)]
        assert not set(ds.data_vars) & set(ds.dims)
        assert set(ds.data_vars) == {"relu0", "final", "mystage@t1", "stimulus_path",
                                     "stimulus_sha256", "stimulus_bytes", "onset_s",
                                     "padded", "row_complete"}
        assert ds["padded"].dtype == bool
        assert ds["padded"].values.tolist() == [i % 2 == 0 for i in range(10)]
        assert ds["stimulus_bytes"].values[4] == 1004
        for stage, values in expected.items():
            np.testing.assert_array_equal(ds[stage].values, values)
        np.testing.assert_array_equal(
            ds["relu0"].sel(stimulus="img/007.png").values, expected["relu0"][7])
        # flat, human-readable provenance beside the JSON records
        assert ds.attrs["model"] == "toy"
        assert ds.attrs["weights_sha256"] == "w" * 64
        assert ds.attrs["precision"] == "fp32"
        assert ds.attrs["command"] == "featx extract toy imgs out.h5"
        assert ds.attrs["store_state"] == "complete"
        assert ds.attrs["featx_version"]
        assert "created" in ds.attrs and "finished" in ds.attrs


def test_open_store_is_lazy(tmp_path):
    path = write_all(tmp_path / "run.h5", make_layout())
    ds = open_store(path)
    with ds:
        assert not ds["relu0"].variable._in_memory
        np.testing.assert_array_equal(ds["relu0"][2].values, row_values([2])["relu0"][0])


def test_slash_in_stage_name_is_encoded(tmp_path):
    stages = {"block/conv": StageSpec((2,), ("feature",))}
    path = write_all(tmp_path / "run.h5", make_layout(stages=stages))
    with open_store(path) as ds:
        assert ds["block%2Fconv"].attrs["featx_stage"] == "block/conv"
        assert ds["block%2Fconv"].dims == ("stimulus", "block%2Fconv_feature")
    assert "block/conv" in store_info(path)


# ----------------------------------------------------------------------------- partial stores


def test_partial_store_hides_or_shows_incomplete_rows(tmp_path):
    path = tmp_path / "run.h5"
    layout = make_layout()
    with StoreWriter.open(path, layout) as writer:
        writer.write_rows(np.array([5, 1]), row_values([5, 1]))
    # closed without finish(): unfinished, and closed cleanly, so plain xarray opens it
    with xr.open_dataset(path, engine="h5netcdf") as ds:
        assert ds.attrs["store_state"] == "writing"
        assert np.isnan(ds["final"].values[0]).all()
        assert ds["row_complete"].values.tolist() == [0, 1, 0, 0, 0, 1, 0, 0, 0, 0]

    with pytest.warns(IncompleteStoreWarning, match="2 of 10 rows"):
        ds = open_store(path)
    with ds:
        assert ds.indexes["stimulus"].tolist() == ["img/001.png", "img/005.png"]
        np.testing.assert_array_equal(ds["final"].values, row_values([1, 5])["final"])

    with pytest.warns(IncompleteStoreWarning, match="NaN"):
        ds = open_store(path, complete_only=False)
    with ds:
        assert ds.sizes["stimulus"] == 10
        assert np.isnan(ds["relu0"].values[[0, 2, 3, 4, 6, 7, 8, 9]]).all()


def test_write_rows_checks_before_writing(tmp_path):
    path = tmp_path / "run.h5"
    with StoreWriter.open(path, make_layout()) as writer:
        values = row_values([0, 1])
        with pytest.raises(ValueError, match="missing 'final'"):
            writer.write_rows([0, 1], {k: v for k, v in values.items() if k != "final"})
        with pytest.raises(ValueError, match=r"stage 'relu0'.*\(2, 4, 5, 6\)"):
            writer.write_rows([0, 1], {**values, "relu0": values["relu0"][:, :2]})
        with pytest.raises(ValueError, match="distinct"):
            writer.write_rows([1, 1], values)
        with pytest.raises(ValueError, match=r"\[0, 10\)"):
            writer.write_rows([9, 10], values)
        with pytest.raises(StoreError, match="10 of 10 rows are not written"):
            writer.finish()
        assert writer.n_complete == 0
    with h5py.File(path, "r") as h5:
        assert not h5["row_complete"][()].any()


def test_float16_storage_and_overflow(tmp_path):
    path = tmp_path / "run.h5"
    with StoreWriter.open(path, make_layout(storage_dtype="float16")) as writer:
        writer.write_rows([0, 1], row_values([0, 1]))
        values = row_values([2, 3])
        values["final"][1, 4] = 1e5
        with pytest.raises(StoreOverflowError, match=r"stage 'final'.*img/003\.png.*float16"):
            writer.write_rows([2, 3], values)
        assert writer.pending_rows().tolist() == list(range(2, 10))
        values["final"][1, 4] = np.inf  # non-finite from the model itself is kept
        writer.write_rows([2, 3], values)
    with h5py.File(path, "r", swmr=True) as h5:
        assert h5["relu0"].dtype == np.float16
        assert np.isnan(h5["final"][4]).all()
        assert h5["final"][3, 4] == np.inf
    with pytest.warns(IncompleteStoreWarning):
        ds = open_store(path)
    with ds:
        assert ds["final"].dtype == np.float16
        np.testing.assert_array_equal(ds["relu0"].values[:2], row_values([0, 1])["relu0"])


@pytest.mark.parametrize("compression", ["gzip", "lzf"])
def test_compression_round_trip(tmp_path, compression):
    path = write_all(tmp_path / "run.h5", make_layout(compression=compression))
    with h5py.File(path, "r") as h5:
        assert h5["relu0"].compression == compression
        assert h5["relu0"].chunks == (1, 4, 5, 6)
    with open_store(path) as ds:
        for stage, values in row_values(np.arange(10)).items():
            np.testing.assert_array_equal(ds[stage].values, values)


# ----------------------------------------------------------------------------- readers and crashes

READER = """
import sys, warnings
import h5py, numpy as np
from test_store import row_values
from featx.store import open_store

path = sys.argv[1]
h5 = h5py.File(path, "r", swmr=True)
print("ready", flush=True)
for line in sys.stdin:
    done_ds, final = h5["row_complete"], h5["final"]
    done_ds.refresh()
    final.refresh()
    done = np.flatnonzero(done_ds[()])
    ok_h5 = np.array_equal(final[done], row_values(done)["final"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with open_store(path) as ds:
            ok_xr = (ds.sizes["stimulus"] == len(done)
                     and np.array_equal(ds["final"].values, row_values(done)["final"]))
    print(len(done), ok_h5, ok_xr, flush=True)
"""


def test_reader_in_another_process_follows_the_writer(tmp_path):
    path = tmp_path / "run.h5"
    layout = make_layout(12)
    with StoreWriter.open(path, layout) as writer:
        reader = start_child(READER, path, stdin=subprocess.PIPE)
        try:
            assert read_line(reader) == "ready"
            for stop in (0, 4, 9, 12):
                rows = np.arange(writer.n_complete, stop)
                if len(rows):
                    writer.write_rows(rows, row_values(rows))
                reader.stdin.write("check\n")
                reader.stdin.flush()
                assert read_line(reader) == f"{stop} True True"
            # finishing works while the reader still holds the file open
            writer.finish()
            assert writer.is_complete
        finally:
            reader.kill()
            reader.communicate(timeout=WAIT_S)
    assert store_header(path).is_complete


WRITER = """
import sys, time
import numpy as np
from test_store import make_layout, row_values
from featx.store import StoreWriter

writer = StoreWriter.open(sys.argv[1], make_layout(40))
print("open", flush=True)
todo = writer.pending_rows()
for i in range(0, len(todo), 3):
    rows = todo[i:i + 3]
    writer.write_rows(rows, row_values(rows))
    print("wrote", rows[-1], flush=True)
    time.sleep(0.01)
writer.finish()
print("finished", flush=True)
"""


def assert_completed_rows_intact(path) -> np.ndarray:
    with h5py.File(path, "r", swmr=True) as h5:
        done = np.flatnonzero(h5["row_complete"][()])
        expected = row_values(done)
        for stage in STAGES:
            np.testing.assert_array_equal(h5[stage][()][done], expected[stage])
    with pytest.warns(IncompleteStoreWarning):
        ds = open_store(path)
    with ds:
        assert ds.sizes["stimulus"] == len(done)
        np.testing.assert_array_equal(ds["relu0"].values, expected["relu0"])
    with xr.open_dataset(path, engine="h5netcdf", driver_kwds={"swmr": True}) as ds:
        assert ds["row_complete"].values.sum() == len(done)
    return done


@pytest.mark.parametrize("kill_after", [0, 4, 9])
def test_sigkill_leaves_a_readable_resumable_store(tmp_path, kill_after):
    """Kill the writer after ``kill_after`` batches (plus a moment), then read and resume."""
    path = tmp_path / "run.h5"
    child = start_child(WRITER, path)
    try:
        assert read_line(child) == "open"
        for _ in range(kill_after):
            assert read_line(child).startswith("wrote")
        time.sleep(0.001 * kill_after)  # land some kills in the middle of a batch
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=WAIT_S)
    finally:
        child.kill()
        child.communicate(timeout=WAIT_S)

    done = assert_completed_rows_intact(path)
    assert len(done) >= 3 * kill_after

    # resume in this process: only the missing rows are written
    layout = make_layout(40)
    with StoreWriter.open(path, layout) as writer:
        assert writer.resumed
        todo = writer.pending_rows()
        assert set(todo) == set(range(40)) - set(done)
        for i in range(0, len(todo), 8):
            writer.write_rows(todo[i:i + 8], row_values(todo[i:i + 8]))
        writer.finish()
    with h5py.File(path, "r") as h5:  # marks cleared: plain h5py opens it again
        provenance = json.loads(h5.attrs["featx_provenance"])
        assert provenance["resumed"][-1]["rows_complete"] == len(done)
    with open_store(path) as ds:
        np.testing.assert_array_equal(ds["final"].values, row_values(np.arange(40))["final"])


def test_clear_write_flags_after_a_kill(tmp_path):
    path = tmp_path / "run.h5"
    code = WRITER.replace("writer.finish()", "import os; os.kill(os.getpid(), 9)")
    child = start_child(code, path)
    child.communicate(timeout=WAIT_S)
    assert child.returncode == -signal.SIGKILL
    assert fs.clear_write_flags(path)
    with h5py.File(path, "r") as h5:  # plain h5py, no SWMR
        assert h5["row_complete"][()].all()
        assert h5.attrs["store_state"] == "writing"
        np.testing.assert_array_equal(h5["relu0"][()], row_values(np.arange(40))["relu0"])
    with xr.open_dataset(path, engine="h5netcdf") as ds:
        assert ds.sizes["stimulus"] == 40
    assert not fs.clear_write_flags(path)


def test_kill_while_finishing(tmp_path):
    """Killed inside finish() (outside SWMR mode): readers are told how to repair,
    and reopening the store repairs it and finishes."""
    path = tmp_path / "run.h5"
    code = WRITER.replace("writer.finish()", (
        "import os, featx.store as fs\n"
        "fs._flat_attrs = lambda *a: os.kill(os.getpid(), 9)\n"
        "writer.finish()"))
    child = start_child(code, path)
    child.communicate(timeout=WAIT_S)
    assert child.returncode == -signal.SIGKILL
    with pytest.raises(StoreError, match="clear_write_flags"):
        store_header(path)
    with StoreWriter.open(path, make_layout(40)) as writer:
        assert len(writer.pending_rows()) == 0
        writer.finish()
    with open_store(path) as ds:
        np.testing.assert_array_equal(ds["final"].values, row_values(np.arange(40))["final"])


# ----------------------------------------------------------------------------- resume rules


def test_resume_refuses_other_settings(tmp_path):
    path = tmp_path / "run.h5"
    write_all(path, make_layout(), finish=False)
    config = {"model": {"name": "toy", "registry_sha256": "r" * 8},
              "weights": {"sha256": "x" * 64}, "precision": "fp16", "extra": "z" * 500}
    with pytest.raises(StoreMismatchError) as err:
        StoreWriter.open(path, make_layout(config=config))
    message = str(err.value)
    assert f"weights.sha256: {'w' * 64!r} -> {'x' * 64!r}" in message
    assert "precision: 'fp32' -> 'fp16'" in message
    assert "extra: (absent) -> 'zzz" in message and "(502 characters)" in message
    assert "--overwrite" in message
    assert [d[0] for d in err.value.differences] == ["weights.sha256", "precision", "extra"]

    # another stimulus set, and another storage dtype, are settings too
    with pytest.raises(StoreMismatchError, match=r"stimuli\.count: 10 -> 11"):
        StoreWriter.open(path, make_layout(11))
    with pytest.raises(StoreMismatchError,
                       match=r"store_layout\.storage_dtype: 'float32' -> 'float16'"):
        StoreWriter.open(path, make_layout(storage_dtype="float16"))


def test_complete_store_is_reported(tmp_path):
    path = write_all(tmp_path / "run.h5", make_layout())
    with pytest.raises(StoreCompleteError, match="already complete") as err:
        StoreWriter.open(path, make_layout())
    assert err.value.path == path


def test_existing_file_that_is_not_a_store(tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    with pytest.raises(StoreError, match="not a featx store.*overwrite"):
        StoreWriter.open(text, make_layout())
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as h5:
        h5["x"] = np.arange(3)
    with pytest.raises(StoreError, match="not a featx store"):
        StoreWriter.open(other, make_layout())
    write_all(other, make_layout(), overwrite=True)
    assert store_header(other).is_complete


def test_overwrite_keeps_the_old_file_until_the_new_one_exists(tmp_path):
    path = write_all(tmp_path / "run.h5", make_layout())
    before = path.read_bytes()
    with pytest.raises(StoreSizeError):
        StoreWriter.open(path, make_layout(), overwrite=True, max_bytes=1000)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5"]

    config = {"model": {"name": "other"}}
    write_all(path, make_layout(config=config), overwrite=True)
    assert store_header(path).config["model"] == {"name": "other"}


def test_second_writer_is_refused(tmp_path):
    path = tmp_path / "run.h5"
    with StoreWriter.open(path, make_layout()):
        with pytest.raises(StoreBusyError, match=f"pid {os.getpid()}"):
            StoreWriter.open(path, make_layout())
    assert not (tmp_path / "run.h5.lock").exists()


# ----------------------------------------------------------------------------- size planning


def test_size_refusals(tmp_path, monkeypatch):
    layout = make_layout()
    assert layout.estimated_bytes() > layout.data_bytes() == 10 * 4 * (120 + 7 + 3)
    with pytest.raises(StoreSizeError, match=r"needs about .*MiB.*limit of 1000 bytes"):
        StoreWriter.open(tmp_path / "a.h5", layout, max_bytes=1000)

    class Usage:
        free = 10 << 20
    monkeypatch.setattr(fs.shutil, "disk_usage", lambda folder: Usage)
    with pytest.raises(StoreSizeError, match=r"only 10\.0 MiB free"):
        StoreWriter.open(tmp_path / "b.h5", layout)
    assert list(tmp_path.iterdir()) == []
    write_all(tmp_path / "new" / "c.h5", layout, check_space=False)  # creates the folder
    assert store_header(tmp_path / "new" / "c.h5").is_complete


# ----------------------------------------------------------------------------- merge and info


def test_merge_disjoint_stores(tmp_path):
    a = write_all(tmp_path / "a.h5", make_layout(6, start=0), start=0)
    b = write_all(tmp_path / "b.h5", make_layout(4, start=6), start=6)
    out = merge_stores([b, a], tmp_path / "ab.h5")

    with open_store(out) as ds:
        ids = ds.indexes["stimulus"].tolist()
        assert ids == [f"img/{i:03d}.png" for i in [6, 7, 8, 9, 0, 1, 2, 3, 4, 5]]
        expected = row_values(np.array([6, 7, 8, 9, 0, 1, 2, 3, 4, 5]))
        for stage in STAGES:
            np.testing.assert_array_equal(ds[stage].values, expected[stage])
        assert ds["padded"].values.tolist() == [True, False] * 2 + [True, False] * 3
    header = store_header(out)
    merged = header.provenance["merged_from"]
    assert [Path(m["path"]).name for m in merged] == ["b.h5", "a.h5"]
    assert merged[0]["provenance"]["command"].startswith("featx extract")
    assert header.config["stimuli"]["count"] == 10
    assert header.settings["model"] == store_header(a).settings["model"]
    assert "merged from 2 stores: b.h5, a.h5" in store_info(out)


def test_merge_refusals(tmp_path):
    a = write_all(tmp_path / "a.h5", make_layout(6, start=0), start=0)
    overlap = write_all(tmp_path / "o.h5", make_layout(4, start=3), start=3)
    with pytest.raises(StoreError, match="'img/003.png' in a.h5 and o.h5"):
        merge_stores([a, overlap], tmp_path / "m1.h5")

    config = {"model": {"name": "toy", "registry_sha256": "r" * 8},
              "weights": {"sha256": "w" * 64}, "precision": "bf16"}
    other = write_all(tmp_path / "x.h5", make_layout(4, start=6, config=config), start=6)
    with pytest.raises(StoreMismatchError, match="precision: 'fp32' -> 'bf16'"):
        merge_stores([a, other], tmp_path / "m2.h5")

    unfinished = write_all(tmp_path / "u.h5", make_layout(4, start=6), start=6, finish=False)
    with pytest.raises(StoreError, match="u.h5: it is unfinished"):
        merge_stores([a, unfinished], tmp_path / "m3.h5")
    assert not (tmp_path / "m1.h5").exists() and not (tmp_path / "m3.h5").exists()


def test_store_info(tmp_path):
    path = tmp_path / "run.h5"
    write_all(path, make_layout(), finish=False)
    info = store_info(path)
    assert "state: writing (10 of 10 rows complete)" in info
    assert "relu0       (channel=4, y=5, x=6)  float32" in info
    assert "mystage@t1  (feature=3)" in info
    assert "model: toy" in info
    assert "command: featx extract toy imgs out.h5" in info
    assert "storage: float32, compression none" in info
