"""``featx extract`` end to end: interrupted runs (Ctrl-C, SIGKILL) resume to a store
equal to an uninterrupted run; a changed setting is refused by name; a second
process reads a store while it is written.

Small on purpose: alexnet with random weights, stages relu0 and relu4 (relu4 keeps
several rows per HDF5 chunk, so a crash can land between rows of one chunk), ten
small generated images, two per batch. Subprocess runs are slowed down by a delay
before each batch (patched in the child, not in featx), and every wait is bounded.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import xarray as xr
from PIL import Image

from featx.cli import main
from featx.store import IncompleteStoreWarning, open_store

from conftest import RUN_MODE_VARIABLES

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 10
BATCH = 2
STAGES = ("relu0", "relu4")
OPTIONS = {"--stages": ",".join(STAGES), "--weights": "random", "--batch-size": str(BATCH)}
WAIT_S = 180  # bound on every wait for a child process

# The child: the real CLI, with a pause before each batch so that the parent can
# act between batches.
SLOW_CLI = """
import sys, time
import featx.pipeline

run_batch = featx.pipeline.Job.run_batch

def slow_run_batch(self, batch):
    time.sleep(float(sys.argv[1]))
    return run_batch(self, batch)

featx.pipeline.Job.run_batch = slow_run_batch
from featx.cli import main
sys.exit(main(sys.argv[2:]))
"""


# --------------------------------------------------------------------------- helpers


def make_images(folder: Path, n: int = N_IMAGES) -> Path:
    """``n`` small noise images of slightly different sizes (seeded)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    for i in range(n):
        pixels = rng.integers(0, 256, (40 + 3 * i, 56, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    return folder


def extract_argv(images, out, **overrides) -> list[str]:
    """``featx extract`` arguments; ``overrides`` replace or add options
    (``background="black"`` -> ``--background black``)."""
    options = dict(OPTIONS)
    options.update({"--" + key.replace("_", "-"): value for key, value in overrides.items()})
    argv = ["extract", "alexnet", str(images), "-o", str(out), "--no-progress"]
    for flag, value in options.items():
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def read_store(path) -> dict:
    """Ids, row_complete, state and stage values, read with h5py alone."""
    with h5py.File(path, "r", swmr=True) as h5:
        out = {"stimulus": [s.decode() if isinstance(s, bytes) else s for s in h5["stimulus"][()]],
               "row_complete": h5["row_complete"][()].astype(bool),
               "state": h5.attrs["store_state"],
               "provenance": json.loads(h5.attrs["featx_provenance"])}
        out.update({stage: h5[stage][()] for stage in STAGES})
    return out


def assert_equal_stores(got: dict, expected: dict) -> None:
    assert got["stimulus"] == expected["stimulus"]
    assert got["state"] == "complete" and got["row_complete"].all()
    for stage in STAGES:
        np.testing.assert_array_equal(got[stage], expected[stage], err_msg=stage)


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in RUN_MODE_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def start_slow_cli(argv, delay: float, log: Path) -> subprocess.Popen:
    """The CLI in a child process (its own process group), ``delay`` s before each batch."""
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-c", SLOW_CLI, str(delay), *argv], cwd=REPO,
                                env=child_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop_group(proc: subprocess.Popen) -> None:
    """Kill the child with its DataLoader workers (its process group) if it still runs."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=WAIT_S)


def complete_rows(path: Path) -> int:
    """Rows marked complete, read like a notebook would (-1: not readable yet)."""
    try:
        with h5py.File(path, "r", swmr=True) as h5:
            return int(h5["row_complete"][()].sum())
    except (OSError, KeyError):  # not created yet, or held in non-SWMR mode for a moment
        return -1


def wait_for_rows(path: Path, proc: subprocess.Popen, at_least: int, log: Path) -> int:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        n = complete_rows(path)
        if n >= at_least:
            return n
        if proc.poll() is not None:
            pytest.fail(f"the extraction ended (exit {proc.returncode}) before {at_least} rows were "
                        f"complete:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.02)
    pytest.fail(f"no {at_least} complete rows within {WAIT_S} s:\n{log.read_text(errors='replace')[-3000:]}")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("resume") / "images")


@pytest.fixture(scope="module")
def reference(images) -> dict:
    """An uninterrupted run of the command every test here runs."""
    out = images.parent / "reference.h5"
    with pytest.MonkeyPatch.context() as mp:
        for name in RUN_MODE_VARIABLES:
            mp.delenv(name, raising=False)
        assert main(extract_argv(images, out)) == 0
    store = read_store(out)
    assert store["state"] == "complete" and len(store["stimulus"]) == N_IMAGES
    return store


@pytest.fixture(scope="module")
def interrupted(images) -> Path:
    """A run stopped by Ctrl-C (KeyboardInterrupt) as its third batch starts."""
    out = images.parent / "interrupted.h5"
    calls = []

    def run_batch(self, batch):
        calls.append(len(batch))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, batch)

    import featx.pipeline

    original = featx.pipeline.Job.run_batch
    with pytest.MonkeyPatch.context() as mp:
        for name in RUN_MODE_VARIABLES:
            mp.delenv(name, raising=False)
        mp.setattr(featx.pipeline.Job, "run_batch", run_batch)
        assert main(extract_argv(images, out)) == 130
    return out


# --------------------------------------------------------------------------- tests


def test_ctrl_c_then_rerun_equals_an_uninterrupted_run(interrupted, reference, tmp_path, capsys):
    out = tmp_path / "run.h5"
    shutil.copy(interrupted, out)
    partial = read_store(out)
    # the two batches computed before Ctrl-C are written and marked; nothing else is
    assert partial["state"] == "writing"
    assert partial["row_complete"].tolist() == [True] * 2 * BATCH + [False] * (N_IMAGES - 2 * BATCH)
    for stage in STAGES:
        np.testing.assert_array_equal(partial[stage][:2 * BATCH], reference[stage][:2 * BATCH])
        assert np.isnan(partial[stage][2 * BATCH:]).all()

    assert main(extract_argv(interrupted.parent / "images", out)) == 0
    final = read_store(out)
    assert_equal_stores(final, reference)
    assert [r["rows_complete"] for r in final["provenance"]["resumed"]] == [2 * BATCH]


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM],
                         ids=["kill-9", "ctrl-c", "sigterm"])
def test_stopped_after_some_batches_then_rerun(images, reference, tmp_path, stop):
    """SIGKILL (kill -9, OOM killer), SIGINT (Ctrl-C in a terminal) or SIGTERM (a
    scheduler's preemption) to the whole process group, DataLoader workers included,
    once some rows are complete."""
    out, log = tmp_path / "run.h5", tmp_path / "child.log"
    argv = extract_argv(images, out)
    proc = start_slow_cli(argv, delay=0.5, log=log)
    try:
        wait_for_rows(out, proc, at_least=1, log=log)
        os.killpg(proc.pid, stop)
        proc.wait(timeout=WAIT_S)
    finally:
        stop_group(proc)
    if stop == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        code, said = (130, "interrupted") if stop == signal.SIGINT else (143, "terminated (SIGTERM)")
        assert proc.returncode == code, log.read_text(errors="replace")[-3000:]
        assert f"{said}; rerun the same command to resume" in log.read_text()
        with h5py.File(out, "r") as h5:  # closed cleanly: plain h5py opens it
            assert h5.attrs["store_state"] == "writing"

    # The partial file opens with h5py (SWMR read, which also works after a kill
    # left the "open for writing" mark) and holds the completed rows exactly; the
    # others are NaN.
    partial = read_store(out)
    done = partial["row_complete"]
    assert partial["state"] == "writing"
    assert 0 < done.sum() < N_IMAGES, done
    assert partial["stimulus"] == reference["stimulus"]
    for stage in STAGES:
        np.testing.assert_array_equal(partial[stage][done], reference[stage][done], err_msg=stage)
        assert np.isnan(partial[stage][~done]).all()
    # ... with xarray (no featx), and with featx.open_store, which shows only complete rows
    with xr.open_dataset(out, engine="h5netcdf", driver_kwds={"swmr": True}) as ds:
        assert ds["row_complete"].values.astype(bool).tolist() == done.tolist()
        np.testing.assert_array_equal(ds["relu4"].values[done], reference["relu4"][done])
    with pytest.warns(IncompleteStoreWarning):
        ds = open_store(out)
    with ds:
        assert ds["stimulus"].values.tolist() == [s for s, d in zip(reference["stimulus"], done) if d]

    # Rerunning the same command finishes the store; it equals the uninterrupted run.
    assert main(argv) == 0
    final = read_store(out)
    assert_equal_stores(final, reference)
    assert final["provenance"]["resumed"][-1]["rows_complete"] == done.sum()
    with h5py.File(out, "r") as h5:  # finished: plain h5py opens it again
        assert h5.attrs["store_state"] == "complete"


def test_reader_in_a_second_process_sees_completed_rows(images, reference, tmp_path):
    """This process reads while a child writes: rows appear as batches complete."""
    out, log = tmp_path / "run.h5", tmp_path / "child.log"
    proc = start_slow_cli(extract_argv(images, out), delay=0.8, log=log)
    seen = []
    try:
        wait_for_rows(out, proc, at_least=1, log=log)
        with pytest.warns(IncompleteStoreWarning):
            ds = open_store(out)  # featx's reader: complete rows only
        with ds:
            n = ds.sizes["stimulus"]
            assert 0 < n < N_IMAGES
            np.testing.assert_array_equal(ds["relu0"].values, reference["relu0"][_rows(reference, ds)])
        assert proc.poll() is None, "the writer finished before the reader was done; slow it down"

        # A notebook following the file with plain h5py: refresh, then read complete rows.
        with h5py.File(out, "r", swmr=True) as h5:
            marks, relu4 = h5["row_complete"], h5["relu4"]
            while proc.poll() is None and len(seen) < N_IMAGES:
                marks.refresh()
                relu4.refresh()
                done = marks[()].astype(bool)
                np.testing.assert_array_equal(relu4[()][done], reference["relu4"][done])
                if not seen or done.sum() != seen[-1]:
                    seen.append(int(done.sum()))
                time.sleep(0.05)
        assert proc.wait(timeout=WAIT_S) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        stop_group(proc)
    assert len(seen) >= 2 and seen == sorted(seen), seen  # the reader saw rows being added
    assert_equal_stores(read_store(out), reference)


def _rows(reference: dict, ds) -> list[int]:
    ids = reference["stimulus"]
    return [ids.index(s) for s in ds["stimulus"].values.tolist()]


@pytest.mark.parametrize(("change", "setting"), [
    ({"background": "black"}, "preprocessing.background"),
    ({"weights": "random:1"}, "weights.seed"),
    ({"stages": "relu0"}, "stages"),
    ({"reduce": "spatial-mean"}, "reduce.reductions"),
    ({"precision": "bf16"}, "precision"),
    ({"stimuli": "reversed"}, "stimuli"),
])
def test_rerun_with_a_changed_setting_is_refused(interrupted, tmp_path, capsys, change, setting):
    out = tmp_path / "run.h5"
    shutil.copy(interrupted, out)
    before = read_store(out)
    images = interrupted.parent / "images"
    if change.get("stimuli") == "reversed":  # same files, other order
        listing = tmp_path / "order.txt"
        listing.write_text("\n".join(f"img{i}.png" for i in reversed(range(N_IMAGES))) + "\n")
        change = {"stimuli": listing}
    capsys.readouterr()

    assert main(extract_argv(images, out, **change)) == 2
    err = capsys.readouterr().err
    assert "different settings" in err and f"  {setting}" in err, err
    assert "--overwrite" in err
    after = read_store(out)  # untouched, still resumable
    assert after["row_complete"].tolist() == before["row_complete"].tolist()
    assert after["state"] == "writing"


def test_same_order_given_as_a_list_resumes(interrupted, reference, tmp_path):
    """The stimulus-list route with the same ids and order is the same stimulus set."""
    out = tmp_path / "run.h5"
    shutil.copy(interrupted, out)
    listing = tmp_path / "order.txt"
    listing.write_text("\n".join(f"img{i}.png" for i in range(N_IMAGES)) + "\n")
    assert main(extract_argv(interrupted.parent / "images", out, stimuli=listing)) == 0
    assert_equal_stores(read_store(out), reference)


def test_overwrite_starts_again_with_the_new_setting(interrupted, reference, tmp_path):
    out = tmp_path / "run.h5"
    shutil.copy(interrupted, out)
    argv = extract_argv(interrupted.parent / "images", out, dtype="float16", overwrite=True)
    assert main(argv) == 0
    with h5py.File(out, "r") as h5:
        assert h5.attrs["store_state"] == "complete"
        assert "resumed" not in json.loads(h5.attrs["featx_provenance"])
        for stage in STAGES:
            assert h5[stage].dtype == np.float16
            # float16 storage holds the float32 values rounded to float16
            np.testing.assert_array_equal(h5[stage][()], reference[stage].astype(np.float16))


def test_interrupted_while_finishing_then_rerun(images, reference, tmp_path):
    """Every row written but the store not yet marked complete: the rerun only finishes it."""
    import featx.pipeline
    from featx.store import StoreWriter

    out = tmp_path / "run.h5"

    def finish(self, attrs=None):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StoreWriter, "finish", finish)
        assert main(extract_argv(images, out)) == 130
    unfinished = read_store(out)
    assert unfinished["row_complete"].all() and unfinished["state"] == "writing"

    batches = []
    original = featx.pipeline.Job.run_batch
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(featx.pipeline.Job, "run_batch",
                   lambda self, batch: batches.append(len(batch)) or original(self, batch))
        assert main(extract_argv(images, out)) == 0
    assert batches == []  # nothing extracted again
    assert_equal_stores(read_store(out), reference)
