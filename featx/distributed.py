"""Extraction beyond one process: torchrun ranks and job-array shards.

Three ways to run ``featx extract``, chosen from the environment:

one process
    No torchrun variables and no shard: :func:`featx.pipeline.extract` writes the store.
one shard (job arrays)
    ``--shard K/N`` (K is 0-based), or a SLURM job array (``SLURM_ARRAY_TASK_ID`` and
    friends, see :func:`slurm_array_shard`): the process extracts the K-th of N
    contiguous blocks of the stimuli into its shard store (see :func:`shard_path`).
    ``featx merge`` combines the shard stores once every task is done
    (:func:`order_shards` puts them in order and refuses an incomplete set).
one rank of a torchrun job
    ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` are set (see :func:`torchrun_env`):
    each rank runs on its own device, extracts its own shard into its shard store,
    reports to rank 0, and rank 0 merges the shard stores into the requested store.

Shard stores
------------
Shard K of N of the store ``out/run.h5`` is ``out/run.shard-K-of-N.h5`` with K and N
zero-padded to the same width (at least three digits), e.g.
``run.shard-002-of-016.h5``, so that a shell glob lists them in shard order. A shard
store is an ordinary featx store: it resumes when its extraction is rerun with the same
settings, and a complete one is left as it is (the rerun does nothing for that shard),
so rerunning a whole array or torchrun job after one task or rank failed redoes only
the unfinished work.

How rank 0 combines the shards
------------------------------
By copying, with :func:`featx.store.merge_stores`, not with HDF5 virtual datasets. A
copy is one self-contained file: it can be moved, archived or read on another machine
without the shard files beside it, netCDF and xarray readers see plain datasets, and
it is written like any store (``store_state`` stays ``"writing"`` until the last row is
in, and a killed merge resumes). A virtual dataset would save the copy's time and
transient disk space, but it breaks when the shard files move or disappear, and a
missing source reads as fill values instead of an error. After a successful merge the
shard files are deleted, since the merged store holds all their values and their
provenance; pass ``keep_shards=True`` (``--keep-shards``) to keep them. A failed
merge keeps them.

Failures
--------
A rank whose extraction raises reports the error to rank 0 and exits with an error.
Rank 0 merges only after every rank reported success, so a failed or lost rank never
leaves a merged store behind (and :func:`featx.store.merge_stores` refuses unfinished
shards in any case). torchrun itself stops the other ranks when one exits with an
error; to not wait forever where nobody does that, every rank sends a heartbeat
through the process group's key-value store, and rank 0 gives up on a rank whose
heartbeat stopped for ``timeout`` seconds (default 600), naming it. The same timeout
bounds the start-up rendezvous. A rank that hangs while its process stays alive is not
detected. Rerun the same command, with the same number of processes, to resume.

The process group always uses the ``gloo`` backend, also on GPU nodes: the ranks
exchange only a few bytes of status through it, never tensors, and gloo needs no GPU
per rank. The network interface is gloo's choice (``GLOO_SOCKET_IFNAME`` sets it).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

__all__ = [
    "DistributedError",
    "RankEnv",
    "order_shards",
    "parse_shard",
    "rank_device",
    "resolve_shard",
    "run_extraction",
    "shard_path",
    "slurm_array_shard",
    "torchrun_env",
]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
STATUS_OK = "ok"
_POLL_S = 0.5

Shard = tuple[int, int]
ShardRequest = Shard | str | None  # (k, n), "auto" or None


class DistributedError(RuntimeError):
    """A rank failed or stopped reporting; nothing was merged."""


# --------------------------------------------------------------------------- environment


@dataclass(frozen=True)
class RankEnv:
    """This process's place in a torchrun job."""

    rank: int
    world_size: int
    local_rank: int

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world_size}"


def _int_variable(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def torchrun_env(environ: Mapping[str, str] | None = None) -> RankEnv | None:
    """The torchrun rank of this process, from ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``.

    Returns None when none of the three is set (not started by torchrun).

    Raises:
        ValueError: only some of them are set, or their values do not fit together.
    """
    environ = os.environ if environ is None else environ
    present = [name for name in TORCHRUN_VARIABLES if name in environ]
    if not present:
        return None
    if len(present) < len(TORCHRUN_VARIABLES):
        missing = ", ".join(name for name in TORCHRUN_VARIABLES if name not in present)
        raise ValueError(f"{', '.join(present)} set but {missing} not: start featx with torchrun "
                         "(which sets all of RANK, WORLD_SIZE and LOCAL_RANK), or unset them")
    env = RankEnv(*(_int_variable(environ, name) for name in TORCHRUN_VARIABLES))
    if env.world_size < 1 or not 0 <= env.rank < env.world_size or env.local_rank < 0:
        raise ValueError(f"RANK={env.rank}, WORLD_SIZE={env.world_size}, LOCAL_RANK={env.local_rank} "
                         "do not fit together: need 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0")
    return env


def slurm_array_shard(environ: Mapping[str, str] | None = None) -> Shard | None:
    """The shard ``(k, n)`` of this SLURM array task, or None outside job arrays.

    ``k`` counts tasks from 0 whatever ids the array has: ``(SLURM_ARRAY_TASK_ID -
    SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP`` (``--array=1-8`` gives shards 0..7),
    and ``n`` is ``SLURM_ARRAY_TASK_COUNT``.

    Raises:
        ValueError: the array's ids are not an evenly spaced range (``--array=1,4,9``),
            or it has a single task (a rerun of one task with ``--array=3`` looks like
            that, and its shard cannot be told): pass ``--shard K/N`` then.
    """
    environ = os.environ if environ is None else environ
    if "SLURM_ARRAY_TASK_ID" not in environ:
        return None
    task = _int_variable(environ, "SLURM_ARRAY_TASK_ID")
    if "SLURM_ARRAY_TASK_COUNT" not in environ:
        raise ValueError(f"SLURM array task {task} without SLURM_ARRAY_TASK_COUNT (SLURM older "
                         "than 18.08?): pass --shard K/N")
    count = _int_variable(environ, "SLURM_ARRAY_TASK_COUNT")
    first = _int_variable(environ, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in environ else 0
    step = _int_variable(environ, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in environ else 1
    last = _int_variable(environ, "SLURM_ARRAY_TASK_MAX") if "SLURM_ARRAY_TASK_MAX" in environ else None
    if count == 1:
        raise ValueError(f"SLURM array task {task} is the only task of its array (a rerun of one task "
                         "with --array=ID?), so its shard is unknown: pass --shard K/N (K 0-based), "
                         "or --shard none to extract every stimulus")
    k, off = divmod(task - first, max(step, 1))
    evenly_spaced = off == 0 and 0 <= k < count and (last is None or first + (count - 1) * step == last)
    if not evenly_spaced:
        raise ValueError(f"SLURM array task {task} (ids {first}..{last}, step {step}, {count} tasks) "
                         "is not part of an evenly spaced range of ids, so its shard is unknown: "
                         "submit the array as --array=FIRST-LAST, or pass --shard K/N (K 0-based)")
    return k, count


def parse_shard(text: str) -> ShardRequest:
    """``--shard`` text: ``K/N`` (K 0-based) -> ``(K, N)``; ``auto``; ``none`` -> None."""
    word = text.strip().lower()
    if word == "auto":
        return "auto"
    if word in ("none", "off"):
        return None
    k_text, sep, n_text = word.partition("/")
    try:
        shard = (int(k_text), int(n_text)) if sep else None
    except ValueError:
        shard = None
    if shard is None:
        raise ValueError(f"--shard {text!r}: use K/N with K counted from 0 (e.g. --shard 0/8 to "
                         "--shard 7/8), auto (SLURM array variables when present) or none")
    return _check_shard(shard, f"--shard {text!r}")


def _check_shard(shard: Sequence[int], what: str) -> Shard:
    k, n = (int(v) for v in shard)
    if n < 1 or not 0 <= k < n:
        raise ValueError(f"{what}: need 0 <= K < N (K counts shards from 0, so the last of N "
                         f"shards is K = N-1); got K={k}, N={n}")
    return k, n


def resolve_shard(shard: ShardRequest, environ: Mapping[str, str] | None = None) -> Shard | None:
    """The shard to extract: explicit ``(k, n)``, None, or ``"auto"`` (SLURM arrays)."""
    if shard is None:
        return None
    if isinstance(shard, str):
        if shard != "auto":
            return resolve_shard(parse_shard(shard), environ)
        found = slurm_array_shard(environ)
        if found is not None:
            log.info("SLURM array task: shard %d of %d (0-based)", *found)
        return found
    return _check_shard(shard, f"shard {shard!r}")


def rank_device(device: str, local_rank: int) -> str:
    """The device of a torchrun rank: ``cuda:LOCAL_RANK`` for ``auto``/``cuda`` on GPUs.

    ``auto`` falls back to the CPU where CUDA is not available; ``cpu`` and explicit
    ``cuda:N`` are kept as given.

    Raises:
        ValueError: ``LOCAL_RANK`` has no GPU of its own on this node.
    """
    import torch

    if device not in ("auto", "cuda"):
        return device
    if device == "auto" and not torch.cuda.is_available():
        return "cpu"
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(f"LOCAL_RANK {local_rank} has no GPU: {count} CUDA device(s) visible on "
                         f"this node; start at most {count} processes per node "
                         "(torchrun --nproc-per-node), or pass --device cpu")
    return f"cuda:{local_rank}"


# --------------------------------------------------------------------------- shard files


def shard_path(store: str | os.PathLike, k: int, n: int) -> Path:
    """Where shard ``k`` (0-based) of ``n`` of ``store`` is written.

    ``out/run.h5`` -> ``out/run.shard-002-of-016.h5``; both numbers are padded to the
    same width (at least 3), so names sort in shard order.
    """
    k, n = _check_shard((k, n), "shard_path")
    return _shard_name(store, f"{k:0{_width(n)}d}", n)


def _width(n: int) -> int:
    return max(3, len(str(n)))


def _shard_name(store: str | os.PathLike, index: str, n: int) -> Path:
    store = Path(store)
    return store.with_name(f"{store.stem}.shard-{index}-of-{n:0{_width(n)}d}{store.suffix or '.h5'}")


def _recorded_shard(path: Path) -> Shard | None:
    from .store import STIMULI_KEY, store_header

    record = store_header(path).config.get(STIMULI_KEY, {}).get("shard")
    return (int(record[0]), int(record[1])) if record else None


def order_shards(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Shard stores in shard order, checked to be one whole set; other stores as given.

    When every store records a shard (``featx_config["stimuli"]["shard"]``), they must
    be shards 0..N-1 of the same N, each once; they are returned sorted by shard, so
    that the merge has the order of a single run. Otherwise the order is kept.

    Raises:
        ValueError: shards of different N, a repeated shard, or missing shards.
    """
    paths = [Path(p) for p in paths]
    shards = [_recorded_shard(p) for p in paths]
    if not paths or any(s is None for s in shards):
        return paths
    counts = sorted({n for _, n in shards})
    if len(counts) > 1:
        raise ValueError(f"these stores are shards of different splits (N = {counts}); merge "
                         "the shards of one run, all made with the same N")
    n = counts[0]
    by_index: dict[int, Path] = {}
    for path, (k, _) in zip(paths, shards):
        if k in by_index:
            raise ValueError(f"shard {k}/{n} is given twice: {by_index[k]} and {path}")
        by_index[k] = path
    missing = [k for k in range(n) if k not in by_index]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise ValueError(f"{len(missing)} of {n} shards are missing (shards {shown}, counted from "
                         "0): finish those tasks first (rerun them to resume), then merge all "
                         f"{n}; featx.store.merge_stores combines an arbitrary subset")
    return [by_index[k] for k in range(n)]


# --------------------------------------------------------------------------- entry point


def run_extraction(
    model_name: str,
    inputs: Any,
    store: str | os.PathLike,
    *,
    shard: ShardRequest = "auto",
    keep_shards: bool = False,
    timeout: float = DEFAULT_TIMEOUT_S,
    environ: Mapping[str, str] | None = None,
    **options: Any,
) -> Path:
    """Extract as the environment says: one process, one shard, or one torchrun rank.

    Args:
        model_name, inputs, store: as for :func:`featx.pipeline.extract`; ``store`` is
            the final store (shard stores are named after it, :func:`shard_path`).
        shard: ``(k, n)`` to extract the k-th (0-based) of n blocks into its shard
            store; ``"auto"`` takes the shard from SLURM array variables when present;
            None extracts every stimulus. Under torchrun each rank further splits this
            block: rank r of W extracts shard ``k*W + r`` of ``n*W``, and rank 0 merges
            only when there is no outer shard (else ``featx merge`` does, later).
        keep_shards: keep the rank shard stores after rank 0 merged them.
        timeout: seconds a silent rank is waited for (torchrun only; module docstring).
        environ: the environment to read (default ``os.environ``).
        **options: the other keyword arguments of :func:`featx.pipeline.extract`.

    Returns:
        The store this process wrote: the requested store, its shard store, or (on
        torchrun ranks other than 0, and with an outer shard) the rank's shard store.
    """
    environ = os.environ if environ is None else environ
    outer = resolve_shard(shard, environ)
    env = torchrun_env(environ)
    if env is not None and env.world_size > 1:
        return _run_rank(model_name, inputs, Path(store), env, outer, environ, keep_shards,
                         timeout, options)
    if env is not None:
        options["device"] = rank_device(options.get("device", "auto"), env.local_rank)
    if outer is None:
        from .pipeline import extract

        return Path(extract(model_name, inputs, store, **options).store)
    path = _extract_shard(model_name, inputs, shard_path(store, *outer), outer, options)
    log.info("when all %d shards are complete, combine them: featx merge %s -o %s", outer[1],
             _shard_glob(store, outer[1]), store)
    return path


def _shard_glob(store: str | os.PathLike, n: int) -> str:
    """The shell pattern of the ``n`` shard stores of ``store``."""
    return str(_shard_name(store, "*", n))


def _extract_shard(model_name: str, inputs: Any, path: Path, shard: Shard, options: dict) -> Path:
    """Extract one shard into ``path``; a complete shard with these settings is kept."""
    from .pipeline import extract
    from .store import StoreCompleteError

    log.info("extracting shard %d of %d (0-based) into %s", *shard, path)
    try:
        extract(model_name, inputs, path, shard=shard, **options)
    except StoreCompleteError:
        log.info("%s is already complete with these settings; nothing to do for shard %d/%d",
                 path, *shard)
    return path


# --------------------------------------------------------------------------- torchrun flow


def _run_rank(model_name: str, inputs: Any, store: Path, env: RankEnv, outer: Shard | None,
              environ: Mapping[str, str], keep_shards: bool, timeout: float, options: dict) -> Path:
    """One rank: join the group, extract the own shard, report; rank 0 then merges."""
    if timeout <= 0:
        raise ValueError(f"timeout {timeout!r} must be a positive number of seconds")
    _place_rank(env, options)
    own, shards = _rank_shards(store, env, outer)
    if outer is None:
        _check_target(store, options.get("overwrite", False))

    board = _join_group(env, environ, timeout)
    try:
        # Every rank: extract its shard while sending heartbeats; report the outcome.
        with _Heartbeat(board, env.rank, interval=min(10.0, timeout / 5)):
            log.info("%s on %s", env, options["device"])
            _extract_reporting(board, env, lambda: _extract_shard(
                model_name, inputs, shards[env.rank], own, options))
            if env.rank != 0:
                return shards[env.rank]
            _wait_for_ranks(board, env.world_size, timeout)

        # Rank 0, once every rank succeeded: merge, unless other array tasks add shards.
        if outer is not None:
            log.info("all %d ranks wrote their shards; when every task is done, combine them: "
                     "featx merge %s -o %s", env.world_size, _shard_glob(store, own[1]), store)
            return shards[0]
        return _merge(shards, store, keep_shards, options.get("overwrite", False))
    finally:
        _leave_group()


def _place_rank(env: RankEnv, options: dict) -> None:
    """Set the rank's device (and make it CUDA's current one); one progress bar only."""
    import torch

    options["device"] = rank_device(options.get("device", "auto"), env.local_rank)
    if options["device"].startswith("cuda"):
        torch.cuda.set_device(torch.device(options["device"]))
    if env.rank != 0:
        options["progress"] = False


def _rank_shards(store: Path, env: RankEnv, outer: Shard | None) -> tuple[Shard, list[Path]]:
    """This rank's shard and every rank's shard store; an outer shard ``(k, n)`` is split
    W ways: rank r takes shard ``k*W + r`` of ``n*W``."""
    k, n = outer or (0, 1)
    total = n * env.world_size
    shards = [shard_path(store, k * env.world_size + r, total) for r in range(env.world_size)]
    return (k * env.world_size + env.rank, total), shards


def _check_target(store: Path, overwrite: bool) -> None:
    """Refuse, before any compute, a store that the final merge could not write."""
    from .store import STIMULI_KEY, StoreCompleteError, StoreError, store_header

    if overwrite or not store.exists():
        return
    header = store_header(store)  # StoreError if not a featx store
    if header.is_complete:
        raise StoreCompleteError(f"{store} is already complete; nothing to do. Use --overwrite "
                                 "(overwrite=True) to extract again, or choose another store path.",
                                 store)
    if "parts" not in header.config.get(STIMULI_KEY, {}):
        raise StoreError(f"{store} is an unfinished extraction by a single process, so the "
                         "ranks' merge cannot resume it: resume it without torchrun, or pass "
                         "--overwrite to replace it, or choose another store path")


def _extract_reporting(board: _Board, env: RankEnv, work) -> None:
    """Run ``work``; tell rank 0 whether it succeeded (then re-raise its error)."""
    try:
        work()
    except BaseException as err:
        try:
            board.set_status(env.rank, f"failed: {type(err).__name__}: {err}")
        except Exception as report_error:  # keep the extraction's error, not this one
            log.warning("%s could not report its failure to rank 0 (%s)", env, report_error)
        raise
    board.set_status(env.rank, STATUS_OK)


def _merge(shards: list[Path], store: Path, keep_shards: bool, overwrite: bool) -> Path:
    from .store import merge_stores

    merge_stores(shards, store, overwrite=overwrite)
    if not keep_shards:
        for path in shards:
            path.unlink()
        log.info("removed the %d shard stores (all their values are in %s)", len(shards), store)
    return store


# --------------------------------------------------------------------------- process group


class _Board:
    """Status and heartbeat keys of one run in the group's key-value store."""

    def __init__(self, store: Any):
        self._store = store
        self._lock = threading.Lock()  # the heartbeat thread shares the client

    def set_status(self, rank: int, status: str) -> None:
        with self._lock:
            self._store.set(f"status/{rank}", status)

    def status(self, rank: int) -> str | None:
        with self._lock:
            if not self._store.check([f"status/{rank}"]):
                return None
            return self._store.get(f"status/{rank}").decode()

    def beat(self, rank: int) -> None:
        with self._lock:
            self._store.add(f"heartbeat/{rank}", 1)

    def beats(self, rank: int) -> int:
        with self._lock:
            return int(self._store.add(f"heartbeat/{rank}", 0))


class _Heartbeat:
    """Bumps this rank's heartbeat counter every ``interval`` seconds, on a thread."""

    def __init__(self, board: _Board, rank: int, interval: float):
        self.board, self.rank, self.interval = board, rank, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="featx-heartbeat", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self.board.beat(self.rank)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.board.beat(self.rank)
            except Exception as err:  # rank 0 or the agent is gone; the main thread will see
                log.warning("rank %d: cannot send heartbeats any more (%s)", self.rank, err)
                return

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def _join_group(env: RankEnv, environ: Mapping[str, str], timeout: float) -> _Board:
    """Rendezvous through ``MASTER_ADDR:MASTER_PORT`` and start a gloo process group."""
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; install a build with it")
    wait = timedelta(seconds=timeout)
    store, _, _ = next(dist.rendezvous("env://", rank=env.rank, world_size=env.world_size,
                                       timeout=wait))
    dist.init_process_group("gloo", store=dist.PrefixStore("featx-pg", store), rank=env.rank,
                            world_size=env.world_size, timeout=wait)
    # torchrun's agent keeps its store across restarts: keys of each attempt apart
    attempt = environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    log.debug("%s joined the process group (attempt %s)", env, attempt)
    return _Board(dist.PrefixStore(f"featx/{attempt}", store))


def _leave_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _wait_for_ranks(board: _Board, world_size: int, timeout: float, poll: float = _POLL_S) -> None:
    """Rank 0: wait until every other rank reported success.

    Raises:
        DistributedError: a rank reported a failure, or sent no heartbeat for
            ``timeout`` seconds.
    """
    pending = set(range(1, world_size))
    last = {r: (board.beats(r), time.monotonic()) for r in pending}
    if pending:
        log.info("waiting for %d other rank(s) to finish their shards", len(pending))
    while pending:
        for rank in sorted(pending):
            status = board.status(rank)
            if status == STATUS_OK:
                pending.discard(rank)
            elif status is not None:
                raise DistributedError(f"rank {rank} failed ({status.removeprefix('failed: ')}); "
                                       "nothing was merged. Fix the cause and rerun the same "
                                       "command: finished shards are kept and unfinished ones resume")
            elif _silent_for(board, rank, last) > timeout:
                raise DistributedError(f"rank {rank} sent no heartbeat for {timeout:g} s (killed, or "
                                       "its node was lost); nothing was merged. Rerun the same "
                                       "command to resume its shard")
        if pending:
            time.sleep(poll)


def _silent_for(board: _Board, rank: int, last: dict[int, tuple[int, float]]) -> float:
    """Seconds since ``rank``'s heartbeat counter last changed (updates ``last``)."""
    beats, since = last[rank]
    now_beats = board.beats(rank)
    if now_beats != beats:
        last[rank] = (now_beats, time.monotonic())
        return 0.0
    return time.monotonic() - since
