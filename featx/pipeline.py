"""The extraction job: stimuli in, one store out. ``featx extract`` calls :func:`extract`."""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from . import __version__
from .extractor import Extractor
from .models import _merge_options, load_model
from .reduce import Reduction, parse_reductions
from .registry import ModelEntry, get_entry

__all__ = ["BadInputError", "ExtractionResult", "Job", "build_source", "extract", "prepare", "select_device",
           "shard_rows"]

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Batches each DataLoader worker decodes ahead of the forward pass.
PREFETCH_BATCHES = 2
#: Batches of values waiting for the store writer; the forward pass blocks beyond.
WRITE_QUEUE_BATCHES = 1


class BadInputError(ValueError):
    """Stimuli that cannot be used; ``bad`` lists every (path, reason)."""

    def __init__(self, message: str, bad: Sequence = ()):
        super().__init__(message)
        self.bad = list(bad)


@dataclass
class ExtractionResult:
    """What :func:`extract` did."""

    store: str
    rows: int
    rows_written: int
    seconds: float
    resumed: bool
    skipped: list = field(default_factory=list)
    outputs: dict = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.rows_written / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        how = "resumed, " if self.resumed else ""
        skipped = f", {len(self.skipped)} bad file(s) skipped" if self.skipped else ""
        return (f"{self.store}: {self.rows} stimuli x {len(self.outputs)} variables ({how}"
                f"{self.rows_written} extracted in {self.seconds:.1f} s, {self.rate:.1f} stimuli/s{skipped})")


@dataclass
class Job:
    """Everything needed to turn stimulus rows into stored values (see :func:`prepare`).

    ``rows[r]`` is the source index of store row ``r`` (all stimuli, or one shard's
    contiguous block of them).
    """

    entry: ModelEntry
    source: Any
    rows: np.ndarray
    model: torch.nn.Module
    extractor: Extractor
    device: torch.device
    variables: dict
    reductions: list[Reduction]
    keep_full: bool
    precision: str
    channels_last: bool
    skipped: list

    def loader(self, store_rows: np.ndarray, batch_size: int, workers: int):
        """Batches of ``(store rows, stimuli)`` decoded by ``workers`` processes."""
        return torch.utils.data.DataLoader(
            _Rows(self.source, np.asarray(store_rows), self.rows, trim_every=batch_size),
            batch_size=batch_size, shuffle=False,
            num_workers=workers, pin_memory=self.device.type == "cuda",
            prefetch_factor=PREFETCH_BATCHES if workers else None,
        )

    def run_batch(self, batch: torch.Tensor) -> dict[str, np.ndarray]:
        """The stored values (after reductions) of one batch of stimuli."""
        batch = batch.to(self.device, non_blocking=True)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        autocast = PRECISIONS[self.precision]
        if autocast is not None:
            with torch.autocast(self.device.type, dtype=autocast):
                outputs = self.extractor(batch)
            _check_finite(outputs, self.precision)
        else:
            outputs = self.extractor(batch)
        values = {}
        for name, (_, _, how) in self.variables.items():
            if how is None:
                values[name] = outputs[name].float()
            else:
                reduction, source_name, dims = how
                values[name] = reduction.apply(outputs[source_name].float(), dims)
        return _to_host(values)


class _HeapTrimmer:
    """Gives freed heap memory back to the system when the process keeps growing.

    glibc's malloc keeps freed memory for reuse, and with several threads
    allocating batches of different sizes its heaps fragment: the process grew
    batch after batch (+500 MB over 2048 AlexNet stimuli on a 2-core CPU). After
    the first ``warmup`` batches have shown the steady peak, each call that finds
    the resident set more than ``margin`` bytes above it asks glibc to release its
    free pages (``malloc_trim``). Reuse between trims keeps page faults rare:
    releasing every large block at once instead (a fixed mmap threshold) cost
    20-25% of the throughput. Nothing happens where glibc or ``/proc`` is missing.
    """

    def __init__(self, warmup: int = 4, margin: int = 32 << 20):
        self.warmup, self.margin = warmup, margin
        self.limit, self.calls, self.trims = 0, 0, 0
        self._trim = _malloc_trim()

    def __call__(self) -> None:
        if self._trim is None:
            return
        rss = _resident_bytes()
        self.calls += 1
        if self.calls <= self.warmup:
            self.limit = max(self.limit, rss + self.margin)
        elif rss > self.limit:
            self._trim(0)
            self.trims += 1


def _malloc_trim():
    """glibc's ``malloc_trim``, or None elsewhere."""
    if not sys.platform.startswith("linux") or not os.path.exists("/proc/self/statm"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _to_host(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The values as NumPy arrays in host memory.

    CPU tensors are shared, not copied (the extractor's captures are already
    copies). CUDA tensors are copied into pinned host memory with every copy queued
    first and one wait at the end, instead of one blocking copy per variable.
    """
    if all(t.device.type == "cpu" for t in tensors.values()):
        return {name: t.numpy() for name, t in tensors.items()}
    host = {}
    for name, tensor in tensors.items():
        host[name] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host[name].copy_(tensor, non_blocking=True)
    for device in {t.device for t in tensors.values() if t.device.type == "cuda"}:
        torch.cuda.current_stream(device).synchronize()
    return {name: t.numpy() for name, t in host.items()}


def prepare(
    model_name: str,
    inputs,
    *,
    stages=None,
    weights=None,
    model_options=None,
    trust_checkpoint: bool = False,
    stimuli=None,
    background=(255, 255, 255),
    clip: str = "start",
    hop: float | None = None,
    skip_bad: bool = False,
    reduce=None,
    keep_full: bool = True,
    device: str = "auto",
    precision: str = "fp32",
    shard: tuple[int, int] | None = None,
) -> Job:
    """Check the stimuli, load the model and learn the shape of every stored variable."""
    entry = get_entry(model_name)
    stage_request = _stage_request(entry, stages)  # unknown stage names fail before any decoding
    _merge_options(entry, dict(model_options or {}))  # so do unknown model options
    reductions = parse_reductions(reduce)
    if not keep_full and not reductions:
        raise ValueError("keep_full=False (--reduce-only) needs at least one --reduce")
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    torch_device = select_device(device)

    # Find and check every stimulus before any compute.
    source = build_source(entry, inputs, stimuli=stimuli, background=background, clip=clip, hop=hop)
    skipped = _check_source(source, inputs, skip_bad)
    rows = shard_rows(len(source), shard)

    # Model and stages; one probe stimulus gives the shape of every variable.
    model = load_model(model_name, weights, trust_checkpoint=trust_checkpoint, **dict(model_options or {}))
    model.to(torch_device)
    channels_last = _use_channels_last(entry, torch_device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    extractor = Extractor(model, stage_request)
    variables = _probe_variables(extractor, entry, source, torch_device, reductions, keep_full)
    return Job(entry, source, rows, model, extractor, torch_device, variables, reductions, keep_full,
               precision, channels_last, skipped)


def _check_finite(outputs: dict[str, torch.Tensor], precision: str) -> None:
    """Under autocast, an overflow inside the network shows up as inf/NaN: refuse it."""
    for name, tensor in outputs.items():
        if not torch.isfinite(tensor).all():
            raise FloatingPointError(
                f"stage {name!r} has non-finite values under --precision {precision} (the "
                "reduced-precision forward pass overflowed); nothing of this batch was written. "
                "Rerun with --precision bf16 (wider range) or fp32."
            )


def shard_rows(n: int, shard: tuple[int, int] | None) -> np.ndarray:
    """Source indices of shard ``k`` of ``n_shards`` (0-based): a contiguous block."""
    if shard is None:
        return np.arange(n)
    k, n_shards = shard
    if not (n_shards >= 1 and 0 <= k < n_shards):
        raise ValueError(f"shard {k}/{n_shards} is invalid: need 0 <= K < N (K is 0-based)")
    if n_shards > n:
        raise ValueError(f"{n_shards} shards for {n} stimuli: use at most {n} shards")
    return np.arange(k * n // n_shards, (k + 1) * n // n_shards)


def extract(
    model_name: str,
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    store: str | os.PathLike,
    *,
    stages: Sequence[str] | Mapping[str, str] | None = None,
    weights: str | os.PathLike | None = None,
    model_options: Mapping[str, Any] | None = None,
    trust_checkpoint: bool = False,
    stimuli: str | os.PathLike | None = None,
    background: tuple[int, int, int] = (255, 255, 255),
    clip: str = "start",
    hop: float | None = None,
    skip_bad: bool = False,
    reduce: Sequence[str] | None = None,
    keep_full: bool = True,
    batch_size: int | None = None,
    device: str = "auto",
    workers: int | None = None,
    precision: str = "fp32",
    storage_dtype: str = "float32",
    compression: str | None = None,
    max_store_bytes: int | None = None,
    shard: tuple[int, int] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> ExtractionResult:
    """Run ``model_name`` over the stimuli in ``inputs`` and write the stages to ``store``.

    Rerunning the same call after an interruption continues from the last completed
    batch; a call whose settings differ from the unfinished store's is refused, naming
    the setting, unless ``overwrite=True``.

    Args:
        model_name: registry name (``featx.list_models()``).
        inputs: a folder of images or sounds (searched recursively), or a list of files.
        store: the HDF5 file to write.
        stages: registry stage names (default: all), or ``{name: module path}``.
        weights, model_options, trust_checkpoint: as for :func:`featx.load_model`.
        stimuli: a list file giving the order and ids of the stimuli.
        background: RGB that transparent image pixels are composited onto.
        clip, hop: audio length policy (``start``, ``center``, ``windows``).
        skip_bad: go on without undecodable files (recorded in the store) instead of
            stopping before any compute.
        reduce: reductions (``spatial-mean``, ``time-mean``, ``srp:DIM[:SEED]``), each
            stored as ``<stage>.<reduction>``; ``keep_full=False`` stores only those.
        batch_size: stimuli per forward pass (default: chosen from the stage sizes).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        workers: DataLoader processes that decode stimuli (default: chosen from the CPUs).
        precision: ``fp32``, or ``bf16``/``fp16`` autocast for the forward pass.
        storage_dtype, compression, max_store_bytes: how the store holds the values.
        shard: ``(k, n)``: extract only the k-th (0-based) of n contiguous blocks of
            stimuli, for job arrays; ``featx merge`` combines the shard stores.
        overwrite: replace an existing store.
        progress: show a progress bar.
        command: the command line to record (the CLI passes its own).
    """
    from .store import StoreCompleteError, StoreWriter

    started = time.perf_counter()
    start_time = _now()
    job = prepare(model_name, inputs, stages=stages, weights=weights, model_options=model_options,
                  trust_checkpoint=trust_checkpoint, stimuli=stimuli, background=background, clip=clip,
                  hop=hop, skip_bad=skip_bad, reduce=reduce, keep_full=keep_full, device=device,
                  precision=precision, shard=shard)
    batch_size = batch_size or _auto_batch_size(job.variables, job.device)
    if workers is not None and workers < 0:
        raise ValueError(f"--workers {workers} must be 0 or more")
    if any(os.path.abspath(s.path) == os.path.abspath(store) for s in job.source.stimuli):
        raise ValueError(f"the output {str(store)!r} is one of the stimulus files; choose another path")

    # Open the store: create it, or resume an unfinished one with the same settings.
    config = _config(job, storage_dtype, shard)
    provenance = _provenance(job, batch_size, workers, command, start_time)
    layout = _layout(job, config, provenance, storage_dtype, compression)
    try:
        writer = StoreWriter.open(store, layout, overwrite=overwrite, max_bytes=max_store_bytes)
    except StoreCompleteError:
        log.info("%s is already complete with these settings; nothing to do (--overwrite "
                 "extracts again)", store)
        return ExtractionResult(store=str(store), rows=len(job.rows), rows_written=0,
                                seconds=time.perf_counter() - started, resumed=True,
                                skipped=job.skipped, outputs={k: v[0] for k, v in job.variables.items()})
    try:
        todo = writer.pending_rows()
        n_rows = len(job.rows)
        resumed = len(todo) < n_rows

        # Extract batch by batch; a background thread writes while the next batch runs.
        workers = _auto_workers(workers, len(todo), batch_size, job.device)
        with _BackgroundWriter(writer) as background_writer, \
                _progress(n_rows, n_rows - len(todo), progress, job.entry.name) as bar:
            for store_rows, batch in job.loader(todo, batch_size, workers):
                background_writer.put(store_rows.numpy(), job.run_batch(batch))
                bar.update(len(store_rows))
        writer.finish({"end_time": _now(), "seconds": round(time.perf_counter() - started, 3)})
    finally:
        writer.close()

    result = ExtractionResult(store=str(store), rows=n_rows, rows_written=len(todo),
                              seconds=time.perf_counter() - started, resumed=resumed,
                              skipped=job.skipped, outputs={k: v[0] for k, v in job.variables.items()})
    log.info("%s", result.summary())
    return result


def select_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available; an unavailable CUDA device is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device!r}: CUDA is not available on this machine; use --device cpu")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif chosen.type != "cpu":
        raise ValueError(f"--device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    return chosen


def build_source(entry: ModelEntry, inputs, *, stimuli=None, background=(255, 255, 255),
                 clip="start", hop=None):
    """The image or audio source for ``entry``'s input contract."""
    if entry.modality == "image":
        from .sources.images import ImageSource

        return ImageSource(inputs, entry.input, background=background, stimuli_list=stimuli)
    from .sources.audio import AudioSource

    return AudioSource(inputs, entry.input, clip=clip, hop=hop, stimuli_list=stimuli)


def _check_source(source, inputs, skip_bad: bool) -> list:
    if len(source) == 0:
        kind = "image" if "Image" in type(source).__name__ else "sound"
        raise BadInputError(f"no {kind} files found in {str(inputs)!r}; point featx at a folder of "
                            f"{kind}s (hidden files and other extensions are skipped)")
    bad = source.check()
    if bad and not skip_bad:
        lines = "\n".join(f"  {b.path}: {b.reason}" for b in bad)
        raise BadInputError(f"{len(bad)} of {len(source)} stimulus files cannot be used:\n{lines}\n"
                            "Fix or remove them, or pass --skip-bad to go on without them "
                            "(they are recorded in the store).", bad)
    if bad:
        log.warning("skipping %d bad file(s): %s", len(bad), ", ".join(b.path for b in bad))
        source.drop([b.path for b in bad])
        if len(source) == 0:
            raise BadInputError(f"every stimulus file in {str(inputs)!r} is bad; nothing to extract", bad)
    return [{"path": b.path, "reason": b.reason} for b in bad]


def _stage_request(entry: ModelEntry, stages) -> list[str] | dict[str, str]:
    """Registry names stay names; a mapping may mix names (path None) and module paths."""
    if stages is None:
        return entry.stage_names
    if isinstance(stages, Mapping):
        return {name: entry.stage(name).module if path is None else path for name, path in stages.items()}
    if isinstance(stages, str):
        raise TypeError(f"stages must be a list of stage names or a mapping, not the string {stages!r}")
    for name in stages:
        entry.stage(name)  # KeyError naming close matches
    return list(stages)


def _probe_variables(extractor, entry, source, device, reductions, keep_full) -> dict:
    """Run one stimulus to learn every output's shape; check registry shapes."""
    item = source.load(0).unsqueeze(0).to(device)
    outputs = extractor(item)
    variables = {}
    for name, tensor in outputs.items():
        stage_name, _, call = name.partition("@")
        shape = tuple(tensor.shape[1:])
        dims = _dims_for(entry, extractor, stage_name, shape)
        if not call and stage_name in entry.stage_names and entry.stage(stage_name).module == extractor.stage_paths[stage_name]:
            expected = entry.stage(stage_name).shape
            if shape != expected:
                raise RuntimeError(f"stage {stage_name!r} of {entry.name!r} has shape {shape}, but the "
                                   f"registry ({entry.path}) says {expected}")
        reduced = [r for r in reductions if r.applies_to(dims)]
        if not keep_full and not reduced:
            raise ValueError(
                f"--reduce-only: none of the reductions ({', '.join(r.kind for r in reductions)}) "
                f"applies to stage {name!r} with axes {dims}, so it would be dropped; leave it out "
                "of --stages, add a reduction that applies (srp:DIM applies to every stage), or "
                "store full activations")
        candidates = ([(name, (shape, dims, None))] if keep_full else []) + [
            (f"{name}.{r.suffix}", (*r.output(shape, dims), (r, name, dims))) for r in reduced]
        for r in reduced:
            r.check_size(name, int(np.prod(shape)))
        for variable, spec in candidates:
            if variable in variables:
                raise ValueError(f"two outputs would both be stored as {variable!r}; rename the "
                                 "stage in --stages")
            variables[variable] = spec
    for r in reductions:
        if not any(how is not None and how[0] == r for _, _, how in variables.values()):
            log.warning("--reduce %s applies to none of the requested stages", r.kind)
    return variables


def _dims_for(entry: ModelEntry, extractor, stage_name: str, shape: tuple) -> tuple[str, ...]:
    if stage_name in entry.stage_names:
        stage = entry.stage(stage_name)
        if stage.module == extractor.stage_paths.get(stage_name) and len(stage.dims) == len(shape):
            return stage.dims
    maps = ("channel", "y", "x") if entry.modality == "image" else ("channel", "frequency", "time")
    if len(shape) == 3:
        return maps
    if len(shape) == 1:
        return ("feature",)
    return tuple(f"axis{i}" for i in range(len(shape)))


def _use_channels_last(entry: ModelEntry, device: torch.device) -> bool:
    """Whether image batches (and the model) run in channels-last memory format.

    On CUDA, for every image model. On the CPU only for torchvision's own networks
    (AlexNet, VGG19, ResNet50/101), whose oneDNN convolutions measured 1.1-1.5x faster
    in channels-last on a 2-core CPU; CORnet-S, LowpassAlexNet and VOneAlexNet
    measured 0.7-0.9x, so they keep the default format there.
    """
    if entry.modality != "image":
        return False
    return device.type == "cuda" or entry.builder.startswith("featx.models.torchvision_nets:")


def _auto_batch_size(variables: dict, device: torch.device) -> int:
    """The largest power of two whose batch of stored values fits the budget.

    The budget is 128 MB of float32 values per batch on the CPU (at most 32
    stimuli) and 2 GB on a GPU (at most 64). Several batches are alive at once
    (one computed, one queued, one written), so this bounds the memory; on a
    2-core CPU, batches of 16 ResNet50 stimuli ran as fast as batches of 32.
    """
    per_item = sum(4 * int(np.prod(shape)) for shape, _, _ in variables.values())
    cuda = device.type == "cuda"
    budget, most = ((2 << 30), 64) if cuda else ((128 << 20), 32)
    fits = max(1, min(most, budget // max(per_item, 1)))
    return 1 << (int(fits).bit_length() - 1)


def _auto_workers(workers: int | None, n_todo: int, batch_size: int,
                  device: torch.device | None = None) -> int:
    """Decoding processes: none for a single batch; else enough to keep up with the model.

    One worker decodes a few hundred images per second, more than a CPU forward pass
    of these models consumes per core, so CPU runs take one worker per four cores (at
    most 4; each costs memory). A GPU consumes far more, so CUDA runs use every core
    but one, up to 8.
    """
    if workers is not None:
        if workers < 0:
            raise ValueError(f"--workers {workers} must be 0 or more")
        return workers
    if n_todo <= batch_size:
        return 0
    cpus = os.cpu_count() or 1
    if device is not None and device.type == "cuda":
        return max(1, min(8, cpus - 1))
    return max(1, min(4, cpus // 4))


class _Rows(torch.utils.data.Dataset):
    """Store rows -> ``(store row, decoded stimulus)``; ``rows`` maps to source indices.

    In a DataLoader worker, every ``trim_every`` stimuli the worker's freed heap
    memory is given back when it has grown (see :class:`_HeapTrimmer`).
    """

    def __init__(self, source, store_rows: np.ndarray, rows: np.ndarray, trim_every: int = 32):
        self.source, self.store_rows, self.rows = source, store_rows, rows
        self.trim_every = trim_every
        self._trimmer: tuple[int, _HeapTrimmer] | None = None  # (pid, trimmer) of this process

    def __len__(self) -> int:
        return len(self.store_rows)

    def __getitem__(self, i):
        row = int(self.store_rows[i])
        item = row, self.source.load(int(self.rows[row]))
        if i % self.trim_every == self.trim_every - 1 and torch.utils.data.get_worker_info() is not None:
            self._worker_trimmer()()
        return item

    def _worker_trimmer(self) -> _HeapTrimmer:
        if self._trimmer is None or self._trimmer[0] != os.getpid():  # a forked copy: start afresh
            self._trimmer = (os.getpid(), _HeapTrimmer())
        return self._trimmer[1]


#: Channels-last maps larger than this per stimulus are reordered in blocks of pixels.
_BLOCKED_REORDER_BYTES = 2 << 20
_REORDER_BLOCK_VALUES = 1 << 16


def _row_major(array: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``array`` in C order (the store's layout), copied only if it is not already.

    The copy goes into ``out`` when it has the same shape and dtype (reusing a
    buffer spares the page faults of fresh memory), else into a new array.
    Channels-last activations (batch, channel, y, x with channels innermost in
    memory) are reordered a block of pixels at a time when each stimulus's map is
    large: a plain copy of ResNet50's ``layer1`` (256 x 56 x 56) strides through
    memory and took 3x longer on a 2-core CPU.
    """
    if array.flags.c_contiguous:
        return array
    if out is None or out.shape != array.shape or out.dtype != array.dtype:
        out = np.empty(array.shape, array.dtype)
    channels_last = array.ndim == 4 and array.strides[1] == array.itemsize
    if not channels_last or array[0].nbytes < _BLOCKED_REORDER_BYTES:
        np.copyto(out, array)
        return out
    n, c, h, w = array.shape
    pixels = array.transpose(0, 2, 3, 1).reshape(n, h * w, c)  # a view of the same memory
    flat = out.reshape(n, c, h * w)
    step = max(1, _REORDER_BLOCK_VALUES // c)
    for start in range(0, h * w, step):
        flat[:, :, start:start + step] = pixels[:, start:start + step].transpose(0, 2, 1)
    return out


class _BackgroundWriter:
    """Hands batches to the store writer on a thread, so writing overlaps compute.

    The writer thread also puts channels-last activations into the store's C order
    (:func:`_row_major`), so that this copy, too, runs beside the forward pass, and
    keeps the process from growing batch after batch (:class:`_HeapTrimmer`).
    """

    def __init__(self, writer, depth: int = WRITE_QUEUE_BATCHES):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="featx-writer", daemon=True)
        self._buffers: dict[str, np.ndarray] = {}  # C-order copies, reused batch after batch
        self._trim_heap = _HeapTrimmer()

    def __enter__(self):
        self.thread.start()
        return self

    def put(self, rows: np.ndarray, values: dict) -> None:
        self._raise()
        self.queue.put((rows, values))

    def _run(self) -> None:
        for rows, values in iter(self.queue.get, None):
            if self.error is None:
                try:
                    self.writer.write_rows(rows, self._in_c_order(values))
                except BaseException as err:  # re-raised in the main thread
                    self.error = err
            del rows, values  # free the written batch before waiting for the next one
            self._trim_heap()

    def _in_c_order(self, values: dict) -> dict:
        """``values`` with every array in C order, replaced one by one (each original
        is freed at once); copies go into buffers kept for the next batch."""
        for name in values:
            ordered = _row_major(values[name], self._buffers.get(name))
            if ordered is not values[name]:
                self._buffers[name] = ordered
            values[name] = ordered
        return values

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def __exit__(self, exc_type, exc, tb) -> None:
        self.queue.put(None)
        self.thread.join()
        self._buffers.clear()
        if exc is None:
            self._raise()


class _progress:
    def __init__(self, total: int, done: int, enabled: bool, label: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=done, unit="stim", desc=label, disable=not enabled,
                        dynamic_ncols=True, smoothing=0.1)

    def __enter__(self):
        return self.bar

    def __exit__(self, *exc) -> None:
        self.bar.close()


def _stimulus_hash(stimuli) -> str:
    digest = hashlib.sha256()
    for s in stimuli:
        digest.update(f"{s.id}\0{s.sha256}\0{s.onset!r}\n".encode())
    return digest.hexdigest()


def _config(job: Job, storage_dtype: str, shard) -> dict:
    """Every setting that determines the stored values; compared on resume."""
    stimuli = [job.source.stimuli[i] for i in job.rows]
    weights = {k: v for k, v in job.model.featx_weights.items() if k != "path"}
    return {
        "model": {"name": job.entry.name, "registry_sha256": job.entry.sha256,
                  "options": job.model.featx_options},
        "weights": weights,
        "stages": dict(job.extractor.stage_paths),
        "preprocessing": job.source.settings(),
        "reduce": {"reductions": [r.settings() for r in job.reductions], "keep_full": job.keep_full},
        "precision": job.precision,
        "storage_dtype": storage_dtype,
        "stimuli": {"count": len(stimuli), "sha256": _stimulus_hash(stimuli),
                    "shard": list(shard) if shard else None},
    }


def _provenance(job: Job, batch_size, workers, command, start_time) -> dict:
    import h5py

    entry, model, device = job.entry, job.model, job.device
    return {
        "featx_version": __version__,
        "featx_git_revision": _git_revision(),
        "model": entry.name,
        "model_title": entry.title,
        "model_reference": entry.reference,
        "registry_file": Path(entry.path).name,
        "registry_sha256": entry.sha256,
        "weights": model.featx_weights,
        "weights_sha256": model.featx_weights.get("sha256", f"random init, seed {model.featx_weights.get('seed')}"),
        "model_options": model.featx_options,
        "input_contract": {k: v for k, v in vars(entry.input).items() if v is not None},
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "h5py_version": h5py.__version__,
        "python_version": platform.python_version(),
        "hostname": platform.node(),
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "precision": job.precision,
        "channels_last": job.channels_last,
        "batch_size": batch_size,
        "workers": workers if workers is not None else "auto",
        "command": command or " ".join(sys.argv),
        "start_time": start_time,
        "skipped_files": job.skipped,
    }


def _layout(job: Job, config, provenance, storage_dtype, compression):
    from .store import StageSpec, StoreLayout

    columns = {"stimulus": np.array([job.source.stimuli[i].id for i in job.rows], dtype=object)}
    columns.update({k: np.asarray(v)[job.rows] for k, v in job.source.columns().items()})
    return StoreLayout(
        stages={name: StageSpec(shape=shape, dims=dims) for name, (shape, dims, _) in job.variables.items()},
        n_rows=len(job.rows),
        row_columns=columns,
        config=config,
        attrs=provenance,
        storage_dtype=storage_dtype,
        compression=compression,
    )


def _git_revision() -> str:
    here = Path(__file__).resolve().parent.parent
    if not (here / ".git").exists():
        return ""
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
