"""featx.distributed: torchrun ranks, job-array shards and merges give the store of a
single-process run (same values, ids and order), also after a rank is killed midway.

Every run is alexnet with random weights, two stages, the bundled images, batch size 2,
on the CPU with one thread per process (so that the processes compute the same floats
bit for bit). torch.distributed uses gloo on the loopback interface only.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch.distributed as dist

from featx import cli
from featx.distributed import (
    DistributedError,
    _Board,
    _Heartbeat,
    _wait_for_ranks,
    order_shards,
    parse_shard,
    rank_device,
    resolve_shard,
    run_extraction,
    shard_path,
    slurm_array_shard,
    torchrun_env,
)
from featx.store import StoreCompleteError, store_header

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "examples" / "images"
EXTRACT = ["extract", "alexnet", str(IMAGES), "--weights", "random", "--stages", "relu4,final",
           "--batch-size", "2", "--device", "cpu", "--workers", "0", "--no-progress"]
STAGES = ("relu4", "final")
ROW_COLUMNS = ("stimulus", "stimulus_path", "stimulus_sha256", "stimulus_bytes")
RUN_TIMEOUT_S = 240  # bound on every child process
DIST_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "GROUP_RANK", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_RUN_ID")

# Runs featx like `-m featx.cli`, except that rank 1 dies (as if killed) right after its
# first batch of rows is in its shard store.
KILL_RANK_1 = textwrap.dedent("""
    import os
    import sys

    from featx import cli
    from featx.store import StoreWriter

    if os.environ["RANK"] == "1":
        write_rows = StoreWriter.write_rows

        def write_then_die(self, rows, values):
            write_rows(self, rows, values)
            os._exit(17)

        StoreWriter.write_rows = write_then_die
    sys.exit(cli.main(sys.argv[1:]))
""")


# --------------------------------------------------------------------------- helpers


def child_env(**extra: str) -> dict[str, str]:
    """The environment of child runs: no inherited rank or array variables, one thread."""
    env = {k: v for k, v in os.environ.items()
           if k not in DIST_VARIABLES and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    env.update(extra)
    return env


def run_featx(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "featx.cli", *args], cwd=REPO, env=child_env(**env),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(program: list[str], args: list[str]) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2`` on this machine, rendezvous on 127.0.0.1."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "--max-restarts", "0"]
    return subprocess.run([*launcher, *program, *args], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def output(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr[-6000:]}"


def assert_same_store(expected: Path, actual: Path) -> None:
    """Same stimulus ids and order, same row columns, bit-identical stage values."""
    assert store_header(actual).is_complete
    with h5py.File(expected, "r") as a, h5py.File(actual, "r") as b:
        for name in ROW_COLUMNS:
            np.testing.assert_array_equal(a[name][()], b[name][()], err_msg=name)
        for name in STAGES:
            assert b[name].shape == a[name].shape
            np.testing.assert_array_equal(a[name][()], b[name][()], err_msg=name)
        assert b["row_complete"][()].all()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The store of one process over all the bundled images."""
    path = tmp_path_factory.mktemp("single") / "single.h5"
    result = run_featx([*EXTRACT, "-o", str(path), "--shard", "none"])
    assert result.returncode == 0, output(result)
    with h5py.File(path, "r") as h5:
        assert len(h5["stimulus"]) == 8  # the bundled images, in four batches
    return path


# --------------------------------------------------------------------------- end to end


def test_torchrun_two_ranks_equal_single_process(reference, tmp_path):
    store = tmp_path / "features.h5"
    result = torchrun(["-m", "featx.cli"], [*EXTRACT, "-o", str(store)])
    assert result.returncode == 0, output(result)

    assert_same_store(reference, store)
    merged_from = store_header(store).provenance["merged_from"]
    assert [m["stimuli"]["shard"] for m in merged_from] == [[0, 2], [1, 2]]
    assert [m["rows"] for m in merged_from] == [4, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.h5"]  # shards removed


def test_shard_tasks_and_merge_equal_single_process(reference, tmp_path):
    store = tmp_path / "features.h5"
    # task ids 4 and 5 of a SLURM array --array=4-5: shard 1 from the environment
    array_task = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_MAX": "5",
                  "SLURM_ARRAY_TASK_COUNT": "2"}
    second = run_featx([*EXTRACT, "-o", str(store)], **array_task)
    assert second.returncode == 0, output(second)
    first = run_featx([*EXTRACT, "-o", str(store), "--shard", "0/2"])
    assert first.returncode == 0, output(first)
    shards = [tmp_path / "features.shard-000-of-002.h5", tmp_path / "features.shard-001-of-002.h5"]
    assert [store_header(p).n_rows for p in shards] == [4, 4]

    # an incomplete set is refused; the full set is put in shard order
    assert cli.main(["merge", str(shards[1]), "-o", str(store)]) == 2
    assert not store.exists()
    assert cli.main(["merge", str(shards[1]), str(shards[0]), "-o", str(store)]) == 0
    assert_same_store(reference, store)


def test_killed_rank_resumes_to_same_store(reference, tmp_path):
    store = tmp_path / "features.h5"
    wrapper = tmp_path / "kill_rank_1.py"
    wrapper.write_text(KILL_RANK_1)

    killed = torchrun([str(wrapper)], [*EXTRACT, "-o", str(store)])
    assert killed.returncode != 0, output(killed)
    assert not store.exists()  # no merged store after a failed rank
    shard_1 = store_header(tmp_path / "features.shard-001-of-002.h5")
    assert (shard_1.state, shard_1.n_complete, shard_1.n_rows) == ("writing", 2, 4)

    rerun = torchrun(["-m", "featx.cli"], [*EXTRACT, "-o", str(store)])
    assert rerun.returncode == 0, output(rerun)
    assert_same_store(reference, store)
    resumes = store_header(store).provenance["merged_from"][1]["provenance"]["resumed"]
    assert [r["rows_complete"] for r in resumes] == [2]  # rank 1 continued its shard


def test_complete_store_is_refused_before_any_rank_joins(reference):
    rank_0 = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    with pytest.raises(StoreCompleteError, match="already complete"):
        run_extraction("alexnet", IMAGES, reference, shard=None, environ=rank_0, device="cpu")


# --------------------------------------------------------------------------- rank failures


def test_wait_returns_when_every_rank_reports_ok():
    board = _Board(dist.HashStore())
    for rank in (1, 2):
        board.set_status(rank, "ok")
    _wait_for_ranks(board, 3, timeout=5, poll=0.01)


def test_wait_names_a_failed_rank():
    board = _Board(dist.HashStore())
    board.set_status(1, "ok")
    board.set_status(2, "failed: ValueError: 3 stimulus files cannot be used")
    with pytest.raises(DistributedError, match=r"rank 2 failed \(ValueError: 3 stimulus files"):
        _wait_for_ranks(board, 3, timeout=5, poll=0.01)


def test_wait_gives_up_on_a_silent_rank():
    board = _Board(dist.HashStore())
    started = time.monotonic()
    with pytest.raises(DistributedError, match="rank 1 sent no heartbeat for 0.3 s"):
        _wait_for_ranks(board, 2, timeout=0.3, poll=0.01)
    assert time.monotonic() - started < 5


def test_heartbeats_keep_a_slow_rank_waited_for():
    board = _Board(dist.HashStore())
    report = threading.Timer(1.0, board.set_status, (1, "ok"))
    with _Heartbeat(board, 1, interval=0.05):
        report.start()
        _wait_for_ranks(board, 2, timeout=0.3, poll=0.01)  # slower than the timeout, not silent
    report.join()


# --------------------------------------------------------------------------- environment


def test_torchrun_env():
    assert torchrun_env({}) is None
    env = torchrun_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (env.rank, env.world_size, env.local_rank) == (3, 4, 1)
    with pytest.raises(ValueError, match="LOCAL_RANK not"):
        torchrun_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="0 <= RANK < WORLD_SIZE"):
        torchrun_env({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


@pytest.mark.parametrize(("environ", "shard"), [
    ({}, None),
    ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "4"}, (0, 4)),
    ({"SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "8",
      "SLURM_ARRAY_TASK_COUNT": "8"}, (7, 8)),
    ({"SLURM_ARRAY_TASK_ID": "14", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_MAX": "16",
      "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_COUNT": "4"}, (2, 4)),
])
def test_slurm_array_shard(environ, shard):
    assert slurm_array_shard(environ) == shard
    assert resolve_shard("auto", environ) == shard


@pytest.mark.parametrize(("environ", "message"), [
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_MAX": "3",
      "SLURM_ARRAY_TASK_COUNT": "1"}, "only task of its array"),
    ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "9",
      "SLURM_ARRAY_TASK_COUNT": "3"}, "evenly spaced"),
    ({"SLURM_ARRAY_TASK_ID": "3"}, "SLURM_ARRAY_TASK_COUNT"),
])
def test_slurm_array_shard_refuses_unknowable_shards(environ, message):
    with pytest.raises(ValueError, match=message):
        slurm_array_shard(environ)


def test_parse_shard():
    assert parse_shard("2/8") == (2, 8)
    assert parse_shard("auto") == "auto"
    assert parse_shard("none") is None
    for bad in ("8/8", "-1/8", "1/0", "1-8", "two/8"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


def test_explicit_shard_wins_over_slurm():
    environ = {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert resolve_shard((3, 5), environ) == (3, 5)
    assert resolve_shard(None, environ) is None


def test_shard_path_names_sort_in_shard_order():
    assert shard_path("/out/run.h5", 2, 16) == Path("/out/run.shard-002-of-016.h5")
    names = [shard_path("run.h5", k, 1200).name for k in (9, 10, 999, 1000)]
    assert names == sorted(names) and names[-1] == "run.shard-1000-of-1200.h5"
    with pytest.raises(ValueError, match="0 <= K < N"):
        shard_path("run.h5", 4, 4)


def test_rank_device_on_cpu_only_machines():
    if rank_device("auto", 0).startswith("cuda"):
        pytest.skip("CUDA is available here")
    assert rank_device("auto", 1) == "cpu"
    assert rank_device("cpu", 5) == "cpu"
    with pytest.raises(ValueError, match="LOCAL_RANK 0 has no GPU"):
        rank_device("cuda", 0)


def test_order_shards_keeps_plain_stores_in_given_order(reference):
    assert order_shards([reference]) == [reference]
