"""How fast is ``featx extract``, and how much memory does it take?

One invocation measures, on the same images, model and random weights:

a. ``forward``: the model's forward pass alone, on preprocessed tensors already in
   memory (decoded before the clock starts), at featx's batch size.
b. ``floor``: everything ``featx extract`` does except storing: ``prepare()`` (file
   discovery and hashing, the check that decodes every file, model loading, the
   shape probe), then featx's own DataLoader (same batch size, workers and
   prefetching) and ``Job.run_batch`` (forward with hooks and early stop, activations
   copied to NumPy); the values are dropped instead of written.
c. ``featx``: ``featx extract`` end to end into a store (the CLI entry point, called in
   the child process), with featx's automatic batch size and workers.
d. ``plain``: the common lab script: one image at a time through PIL and torchvision
   transforms, forward hooks appending ``.clone()``d outputs to lists, one h5py
   dataset per stage written at the end.

Each variant runs in its own child process, so that they do not share memory or
warm caches. Times are measured inside the child, from after the imports to the
end of the work (model loading included for b, c and d). Memory is measured two
ways: the child's peak resident set (``ru_maxrss``, exact, main process only) and
the peak of its resident set plus the private memory of its DataLoader workers
(``RSS+workers``), sampled every 50 ms from ``/proc`` (see :class:`TreeMemory`).

Then featx (c) runs on 256 and on 2048 images with the same model, stages and
batch size, to show that its memory does not grow with the number of stimuli.

Run from the repository root::

    .venv/bin/python benchmarks/bench_extract.py            # full run, a few minutes
    .venv/bin/python benchmarks/bench_extract.py --quick    # smoke run (64 images), about 2 minutes
    .venv/bin/python benchmarks/bench_extract.py --device cuda --precision bf16

Images (random smooth textures, 500x375 JPEG, fixed seed) and the random weights are
cached under ``--cache`` (default ``/tmp/featx-bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

#: Models and the stages benchmarked for each (None: every stage of the registry).
MODELS: dict[str, tuple[str, ...] | None] = {
    "resnet50": ("layer1", "layer2", "layer3", "layer4", "avgpool"),
    "alexnet": None,
}
VARIANTS = {
    "a": "forward only (tensors in memory)",
    "b": "decode + forward, no store (floor)",
    "c": "featx extract into a store",
    "d": "plain hook script (lists, write at end)",
}
#: Images per variant unless --images is given: enough for each model to run for
#: several seconds, so that fixed costs (opening the store, the last batch's write)
#: do not decide its rate. At least 256, as the targets ask.
DEFAULT_IMAGES = {"resnet50": 256, "alexnet": 1024}
#: Targets of the issue on a 2-core CPU: minimum c/b per model, c/d, memory ratio.
TARGET_C_OVER_B = {"resnet50": 0.90, "alexnet": 0.85}
TARGET_C_OVER_D = 1.05
TARGET_MEMORY_RATIO = 0.5
TARGET_FLAT_MB = 100.0
IMAGE_SIZE = (500, 375)
SAMPLE_SECONDS = 0.05
RESULT_TAG = "BENCH-RESULT "
_MEMORY = {"rss_mb": "RSS", "all_mb": "RSS+workers"}


# --------------------------------------------------------------------------- images


def _texture(index: int, seed: int) -> np.ndarray:
    """A random smooth RGB texture (uint8, height x width x 3) for image ``index``."""
    from PIL import Image

    rng = np.random.default_rng([seed, index])
    width, height = IMAGE_SIZE
    total = np.zeros((height, width, 3), np.float32)
    for cells, weight in ((4, 1.0), (12, 0.5), (40, 0.25), (120, 0.12)):
        coarse = rng.random((max(2, cells * height // width), cells, 3)).astype(np.float32)
        layer = [np.asarray(Image.fromarray(coarse[..., c], "F").resize((width, height), Image.BICUBIC))
                 for c in range(3)]
        total += weight * np.stack(layer, axis=-1)
    total += 0.03 * rng.standard_normal(total.shape, dtype=np.float32)
    lo, hi = total.min(), total.max()
    return np.clip((total - lo) / (hi - lo) * 255, 0, 255).astype(np.uint8)


def make_images(folder: Path, n: int, seed: int) -> Path:
    """Write ``n`` JPEG textures into ``folder`` once; later calls reuse them."""
    from PIL import Image

    done = folder / ".complete"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(_texture(i, seed)).save(folder / f"img{i:05d}.jpg", quality=90)
    done.write_text(f"{n} images, seed {seed}\n")
    return folder


def image_files(folder: Path) -> list[Path]:
    """The benchmark images of ``folder`` in name order (= featx's natural order)."""
    return sorted(folder.glob("img*.jpg"))


# --------------------------------------------------------------------------- spec


@dataclass
class Spec:
    """What a child process needs to run one variant."""

    variant: str
    model: str
    images: str
    stages: dict[str, str]  # stage name -> module path ("" = model input)
    weights: str  # state dict file of the random weights (for the plain script)
    mean: list[float]
    std: list[float]
    resize: int
    size: int
    device: str
    precision: str
    batch_size: int | None
    workers: int | None
    workdir: str


def model_spec(model: str, cache: Path) -> dict[str, Any]:
    """Stages, input contract and a cached file of featx's random weights for ``model``."""
    import torch

    from featx.models import load_model
    from featx.registry import get_entry

    entry = get_entry(model)
    names = MODELS[model] or tuple(entry.stage_names)
    weights = cache / "weights" / f"{model}-random.pt"
    if not weights.exists():
        weights.parent.mkdir(parents=True, exist_ok=True)
        net = load_model(model, "random")
        torch.save(net.state_dict(), weights)
    return {
        "stages": {name: entry.stage(name).module for name in names},
        "weights": str(weights),
        "mean": list(entry.input.mean),
        "std": list(entry.input.std),
        "resize": entry.input.resize or entry.input.size,
        "size": entry.input.size,
    }


# --------------------------------------------------------------------------- children


class Clock:
    """Wall time and CPU time (this process and its reaped workers) since creation."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), self._cpu()

    @staticmethod
    def _cpu() -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        workers = resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime

    def read(self) -> dict[str, float]:
        """``seconds`` (wall) and ``cpu_seconds`` so far."""
        return {"seconds": time.perf_counter() - self.wall, "cpu_seconds": self._cpu() - self.cpu}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _autocast(device: str, precision: str):
    import contextlib

    import torch

    from featx.pipeline import PRECISIONS

    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def _featx_job(spec: Spec):
    from featx.pipeline import prepare

    return prepare(spec.model, spec.images, stages=list(spec.stages), weights="random",
                   device=spec.device, precision=spec.precision)


def _batch_and_workers(spec: Spec, job, n: int) -> tuple[int, int]:
    """The batch size and workers ``featx extract`` would use (same helpers)."""
    from featx.pipeline import _auto_batch_size, _auto_workers

    batch_size = spec.batch_size or _auto_batch_size(job.variables, job.device)
    return batch_size, _auto_workers(spec.workers, n, batch_size, job.device)


def run_forward(spec: Spec) -> dict[str, Any]:
    """(a) The model's forward pass on preprocessed tensors already in memory."""
    import torch

    job = _featx_job(spec)
    n = len(job.source)
    batch_size, _ = _batch_and_workers(spec, job, n)
    images = torch.stack([job.source.load(i) for i in range(n)])
    model = job.model
    _sync(spec.device)
    clock = Clock()
    with torch.inference_mode(), _autocast(spec.device, spec.precision):
        for lo in range(0, n, batch_size):
            batch = images[lo:lo + batch_size].to(job.device, non_blocking=True)
            if job.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            model(batch)
    _sync(spec.device)
    return {**clock.read(), "n": n, "batch_size": batch_size}


def run_floor(spec: Spec) -> dict[str, Any]:
    """(b) prepare(), featx's loader and run_batch, with the values dropped."""
    clock = Clock()
    job = _featx_job(spec)
    n = len(job.rows)
    batch_size, workers = _batch_and_workers(spec, job, n)
    for _, batch in job.loader(np.arange(n), batch_size, workers):
        values = job.run_batch(batch)
        del values
    _sync(spec.device)
    return {**clock.read(), "n": n, "batch_size": batch_size,
            "workers": workers}


def run_featx(spec: Spec) -> dict[str, Any]:
    """(c) ``featx extract`` end to end, through the CLI entry point."""
    import h5py

    from featx.cli import main as featx_main

    store = Path(spec.workdir) / f"featx-{spec.model}.h5"
    argv = ["-q", "extract", spec.model, spec.images, "-o", str(store), "--stages",
            ",".join(spec.stages), "--weights", "random", "--device", spec.device,
            "--precision", spec.precision, "--no-progress", "--overwrite"]
    if spec.batch_size:
        argv += ["--batch-size", str(spec.batch_size)]
    if spec.workers is not None:
        argv += ["--workers", str(spec.workers)]
    clock = Clock()
    code = featx_main(argv)
    timing = clock.read()
    if code:
        raise RuntimeError(f"featx extract exited with status {code}: featx {' '.join(argv)}")
    with h5py.File(store, "r") as h5:
        provenance = json.loads(h5.attrs["featx_provenance"])
        n = int(h5["row_complete"][()].sum())
    store.unlink()
    return {**timing, "n": n, "batch_size": provenance.get("batch_size"),
            "workers": provenance.get("workers")}


def run_plain(spec: Spec) -> dict[str, Any]:
    """(d) The common lab script: one image at a time, lists of clones, write at the end."""
    import h5py
    import torch
    import torchvision
    from PIL import Image
    from torchvision import transforms

    clock = Clock()
    model = getattr(torchvision.models, spec.model)(weights=None)
    model.load_state_dict(torch.load(spec.weights, map_location="cpu"))
    model.eval().to(spec.device)
    to_tensor = transforms.Compose([transforms.Resize(spec.resize), transforms.CenterCrop(spec.size),
                                    transforms.ToTensor()])
    normalize = transforms.Normalize(spec.mean, spec.std)

    activations: dict[str, list] = {name: [] for name in spec.stages}

    def keep(name: str):
        def hook(module, args, output):
            activations[name].append(output.clone().cpu())
        return hook

    for name, path in spec.stages.items():
        if path:
            model.get_submodule(path).register_forward_hook(keep(name))
    inputs = [name for name, path in spec.stages.items() if not path]

    files = image_files(Path(spec.images))
    with torch.no_grad(), _autocast(spec.device, spec.precision):
        for file in files:
            x = to_tensor(Image.open(file).convert("RGB")).unsqueeze(0)
            for name in inputs:
                activations[name].append(x.clone())
            model(normalize(x).to(spec.device))

    store = Path(spec.workdir) / f"plain-{spec.model}.h5"
    with h5py.File(store, "w") as h5:
        for name, outs in activations.items():
            h5.create_dataset(name, data=torch.cat(outs).float().numpy())
    timing = clock.read()
    store.unlink()
    return {**timing, "n": len(files), "batch_size": 1, "workers": 0}


CHILDREN = {"a": run_forward, "b": run_floor, "c": run_featx, "d": run_plain}


def _import_everything() -> None:
    """Import what any variant uses, before any clock starts.

    Importing torch and torchvision takes seconds (more on a loaded machine) and is
    the same for every variant, so no variant's time includes it.
    """
    import h5py  # noqa: F401
    import torchvision.transforms  # noqa: F401
    from PIL import Image  # noqa: F401

    import featx.cli  # noqa: F401
    import featx.pipeline  # noqa: F401
    import featx.sources.images  # noqa: F401
    import featx.store  # noqa: F401


def child_main(spec_file: str) -> None:
    """Run one variant and print its result as one tagged JSON line."""
    import logging

    logging.basicConfig(level=logging.ERROR)
    _import_everything()
    spec = Spec(**json.loads(Path(spec_file).read_text()))
    result = CHILDREN[spec.variant](spec)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["rss_mb"] = own
    print(RESULT_TAG + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- memory


def _children_of() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(parent, []).append(int(entry))
    return tree


def _descendants(pid: int) -> list[int]:
    tree, out, todo = _children_of(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(tree.get(p, ()))
    return out


def _rollup_kb(pid: int, fields: tuple[str, ...]) -> int:
    """The sum of ``fields`` (e.g. ``Rss``) of ``/proc/PID/smaps_rollup``, in kB."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in fields:
                    total += int(rest.split()[0])
    except (OSError, ValueError):
        pass
    return total


def _vm_rss_kb(pid: int) -> int:
    """The current resident set of ``pid`` in kB (cheap: no page-table walk)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class TreeMemory:
    """Samples a process's memory, with that of its workers, on a thread.

    The figure is the resident set of the process plus the private (not shared)
    memory of its descendants: forked DataLoader workers share the parent's pages
    and the batches they hand over (shared memory), which the parent's resident
    set already holds, so only what each worker owns alone is added. The process
    is sampled every 50 ms from ``/proc/PID/status``; the workers' private memory
    needs ``smaps_rollup``, which walks page tables and briefly blocks memory
    mapping in the process read, so it is read less often (and never for the
    measured process itself, whose forward pass it would slow down).
    """

    def __init__(self, pid: int):
        self.pid, self.peak_kb = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def _run(self) -> None:
        workers_kb, tick = 0, 0
        descendants: list[int] = []
        while not self._stop.wait(SAMPLE_SECONDS):
            if tick % 20 == 0:  # about once a second: look for new worker processes
                descendants = [p for p in _descendants(self.pid) if p != self.pid]
            if tick % 5 == 0:
                workers_kb = sum(_rollup_kb(p, ("Private_Clean", "Private_Dirty")) for p in descendants)
            self.peak_kb = max(self.peak_kb, _vm_rss_kb(self.pid) + workers_kb)
            tick += 1

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return self.peak_kb / 1024


# --------------------------------------------------------------------------- parent


@dataclass
class Result:
    """One variant's run: rate, time and memory."""

    model: str
    variant: str
    n: int
    seconds: float
    rss_mb: float
    all_mb: float
    batch_size: Any = None
    workers: Any = None
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average before, after
    cpu_seconds: float = 0.0  # of the whole child process, workers included

    @property
    def rate(self) -> float:
        return self.n / self.seconds


def run_child(spec: Spec) -> Result:
    """Run one variant in a fresh Python process and collect its figures."""
    spec_file = Path(spec.workdir) / f"spec-{spec.model}-{spec.variant}.json"
    spec_file.write_text(json.dumps(spec.__dict__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    load_before = os.getloadavg()[0]
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(spec_file)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with TreeMemory(proc.pid) as memory:
        out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"variant {spec.variant} of {spec.model} failed "
                           f"(exit {proc.returncode}):\n{err[-4000:]}")
    line = next(text for text in out.splitlines() if text.startswith(RESULT_TAG))
    got = json.loads(line[len(RESULT_TAG):])
    return Result(spec.model, spec.variant, got["n"], got["seconds"], got["rss_mb"],
                  memory.peak_mb, got.get("batch_size"), got.get("workers"),
                  (load_before, os.getloadavg()[0]), got["cpu_seconds"])


def _median(results: Sequence[Result]) -> Result:
    """The result with the median time (the middle one of an odd count)."""
    ordered = sorted(results, key=lambda r: r.seconds)
    return ordered[(len(ordered) - 1) // 2]


def _fmt_row(label: str, r: Result, reps: int) -> str:
    return (f"  {label:<44} {r.rate:8.2f} {r.seconds:9.1f} {r.cpu_seconds:9.1f} {r.rss_mb:10.0f} "
            f"{r.all_mb:10.0f}"
            f"   bs={r.batch_size} workers={r.workers} load {r.load[0]:.1f}->{r.load[1]:.1f}"
            f"{f' (median of {reps})' if reps > 1 else ''}")


def _check(ok: bool, text: str) -> str:
    return f"  [{'PASS' if ok else 'FAIL'}] {text}"


def bench_model(model: str, args, cache: Path, workdir: Path, folder: Path) -> dict[str, Result]:
    """Run every variant for ``model`` (interleaved over repeats); print the table."""
    info = model_spec(model, cache)
    runs: dict[str, list[Result]] = {v: [] for v in args.variants}
    for _ in range(args.repeats):
        for variant in args.variants:
            spec = Spec(variant=variant, model=model, images=str(folder), workdir=str(workdir),
                        device=args.device, precision=args.precision, batch_size=args.batch_size,
                        workers=args.workers, **info)
            runs[variant].append(run_child(spec))
            print(f"    ({model} {variant}: {runs[variant][-1].seconds:.1f} s)", flush=True)
    best = {v: _median(rs) for v, rs in runs.items()}
    stages = ", ".join(info["stages"])
    print(f"\n{model} ({stages}), {best[args.variants[0]].n} images, device {args.device}, "
          f"precision {args.precision}")
    print(f"  {'variant':<44} {'stim/s':>8} {'seconds':>9} {'CPU s':>9} {'RSS MB':>10} "
          f"{'+workers':>10}")
    for v in args.variants:
        print(_fmt_row(f"{v}  {VARIANTS[v]}", best[v], args.repeats))
    return best


def bench_flat(model: str, args, cache: Path, workdir: Path, small: Path, large: Path,
               batch_size: int | None) -> tuple[Result, Result]:
    """featx (c) on the small and the large image set, same model, stages and batch."""
    info = model_spec(model, cache)
    out = []
    for folder in (small, large):
        spec = Spec(variant="c", model=model, images=str(folder), workdir=str(workdir),
                    device=args.device, precision=args.precision,
                    batch_size=args.batch_size or batch_size, workers=args.workers, **info)
        out.append(run_child(spec))
        print(f"    ({model} c on {out[-1].n} images: {out[-1].seconds:.1f} s)", flush=True)
    return out[0], out[1]


def report(results: dict[str, dict[str, Result]], flats: dict[str, tuple[Result, Result]],
           args) -> bool:
    """Print ratios and the issue's targets; True when every target is met."""
    ok_all = True
    print("\nRatios (rates; c/b: featx over its floor, c/d: featx over the plain script)")
    for model, best in results.items():
        parts = []
        if {"b", "c"} <= best.keys():
            parts.append(f"c/b = {best['c'].rate / best['b'].rate:.3f}")
        if {"b", "c"} <= best.keys():
            parts.append(f"CPU seconds c/b = {best['c'].cpu_seconds / best['b'].cpu_seconds:.3f}")
        if {"a", "c"} <= best.keys():
            parts.append(f"c/a = {best['c'].rate / best['a'].rate:.3f}")
        if {"c", "d"} <= best.keys():
            parts.append(f"c/d = {best['c'].rate / best['d'].rate:.3f}")
            parts.append(f"memory c/d: RSS {best['c'].rss_mb / best['d'].rss_mb:.2f}, "
                         f"with workers {best['c'].all_mb / best['d'].all_mb:.2f}")
        print(f"  {model}: " + ", ".join(parts))
    for model, (small, large) in flats.items():
        print(f"  {model} memory vs stimuli (featx, batch {small.batch_size}): "
              f"{small.n} -> {large.n} images: RSS {small.rss_mb:.0f} -> {large.rss_mb:.0f} MB "
              f"({large.rss_mb - small.rss_mb:+.0f}), with workers {small.all_mb:.0f} -> "
              f"{large.all_mb:.0f} MB ({large.all_mb - small.all_mb:+.0f})")

    print("\nTargets (issue 6; meant for a 2-core CPU and >= 256 images)")
    for model, best in results.items():
        if {"b", "c"} <= best.keys():
            ratio, target = best["c"].rate / best["b"].rate, TARGET_C_OVER_B.get(model, 0.9)
            print(_check(ratio >= target, f"{model}: c/b {ratio:.3f} >= {target}"))
            ok_all &= ratio >= target
        if {"c", "d"} <= best.keys():
            ratio = best["c"].rate / best["d"].rate
            print(_check(ratio >= TARGET_C_OVER_D, f"{model}: c/d {ratio:.3f} >= {TARGET_C_OVER_D}"))
            for kind in ("rss_mb", "all_mb"):
                mem = getattr(best["c"], kind) / getattr(best["d"], kind)
                print(_check(mem <= TARGET_MEMORY_RATIO, f"{model}: peak {_MEMORY[kind]} featx/plain "
                             f"{mem:.2f} <= {TARGET_MEMORY_RATIO}"))
                ok_all &= mem <= TARGET_MEMORY_RATIO
            ok_all &= ratio >= TARGET_C_OVER_D
    for model, (small, large) in flats.items():
        for kind in ("rss_mb", "all_mb"):
            grow = getattr(large, kind) - getattr(small, kind)
            print(_check(grow <= TARGET_FLAT_MB, f"{model}: peak {_MEMORY[kind]} grows "
                         f"{grow:+.0f} MB from {small.n} to {large.n} images (<= {TARGET_FLAT_MB:.0f})"))
            ok_all &= grow <= TARGET_FLAT_MB
    if any(best[v].n < 256 for best in results.values() for v in best):
        print("  (fewer than 256 images: a smoke run, not a measurement of the targets)")
    return ok_all


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 64 images per model, 64 and 256 for the memory check")
    p.add_argument("--images", type=int,
                   help="images per variant, for every model (default: resnet50 256, alexnet 1024)")
    p.add_argument("--flat-images", default=None,
                   help="SMALL,LARGE image counts of the memory-vs-stimuli run (default 256,2048; "
                        "--quick 64,256; 0 skips it)")
    p.add_argument("--models", default="resnet50,alexnet", help="comma-separated (default: %(default)s)")
    p.add_argument("--flat-models", default="resnet50,alexnet",
                   help="models of the memory-vs-stimuli run (default: %(default)s)")
    p.add_argument("--variants", default="abcd", help="subset of abcd (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=1, help="interleaved repeats; the median is shown")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--batch-size", type=int, help="featx batch size (default: featx's automatic choice)")
    p.add_argument("--workers", type=int, help="featx decoding workers (default: automatic)")
    p.add_argument("--seed", type=int, default=0, help="image seed (default 0)")
    p.add_argument("--cache", default="/tmp/featx-bench", help="images and weights cache")
    p.add_argument("--json", help="also write every figure to this JSON file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p


def _header(args) -> None:
    import torch

    print(f"featx extraction benchmark, {datetime.now(timezone.utc).isoformat(timespec='seconds')}")
    print(f"  host {platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), python {platform.python_version()}")
    print(f"  load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"  command: {' '.join([Path(sys.executable).name, *sys.argv])}")


def _flat_counts(args) -> tuple[int, int] | tuple[()]:
    """The (small, large) image counts of the memory-vs-stimuli run, or () to skip it."""
    text = args.flat_images or ("64,256" if args.quick else "256,2048")
    if text == "0":
        return ()
    try:
        small, large = (int(x) for x in text.split(","))
    except ValueError:
        raise SystemExit(f"--flat-images {text!r}: give two counts, SMALL,LARGE (e.g. 256,2048), "
                         "or 0 to skip the memory run") from None
    return small, large


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.child:
        child_main(args.child)
        return 0
    args.variants = [v for v in "abcd" if v in args.variants]
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here; run with --device cpu")
    cache = Path(args.cache)
    _header(args)
    models = args.models.split(",") if args.models else []
    counts = {m: args.images or (64 if args.quick else DEFAULT_IMAGES.get(m, 256)) for m in models}
    flat = _flat_counts(args)
    folders = {n: make_images(cache / f"images-{n}-seed{args.seed}", n, args.seed)
               for n in {*counts.values(), *flat}}

    workdir = Path(tempfile.mkdtemp(prefix="featx-bench-", dir=args.cache))
    try:
        results = {m: bench_model(m, args, cache, workdir, folders[counts[m]]) for m in models}
        flats = {}
        for m in (args.flat_models.split(",") if flat else []):
            bs = results.get(m, {}).get("c")
            flats[m] = bench_flat(m, args, cache, workdir, folders[flat[0]], folders[flat[1]],
                                  bs.batch_size if bs else None)
        ok = report(results, flats, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"  load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        dump = {m: {v: {**r.__dict__, "rate": r.rate} for v, r in best.items()}
                for m, best in results.items()}
        dump["flat"] = {m: [small.__dict__, large.__dict__] for m, (small, large) in flats.items()}
        Path(args.json).write_text(json.dumps(dump, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
