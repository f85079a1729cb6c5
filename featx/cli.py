"""The ``featx`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import logging
import math
import shlex
import signal
import sys
import tomllib
from typing import Sequence

__all__ = ["main"]

log = logging.getLogger("featx")

COLOURS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128), "grey": (128, 128, 128)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded as the command line
    _configure_logging(args.verbose - args.quiet)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    signal.signal(signal.SIGTERM, _terminate)  # schedulers stop jobs with SIGTERM
    try:
        return args.run(args) or 0
    except _Terminated:
        print("featx: terminated (SIGTERM); rerun the same command to resume", file=sys.stderr)
        return 143
    except BrokenPipeError:  # e.g. `featx info STORE | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("featx: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except _user_errors() as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"featx: error: {message}", file=sys.stderr)
        return 2


class _Terminated(Exception):
    """SIGTERM arrived: unwind (closing the store cleanly) and exit."""


def _terminate(signum, frame) -> None:
    raise _Terminated


def _user_errors() -> tuple[type[BaseException], ...]:
    from .checkpoints import CheckpointError
    from .distributed import DistributedError
    from .registry import RegistryError
    from .store import StoreError

    return (ValueError, KeyError, TypeError, FileNotFoundError, FileExistsError, IsADirectoryError,
            NotADirectoryError, PermissionError, FloatingPointError,
            CheckpointError, RegistryError, StoreError, DistributedError)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featx", description="Extract named stages of neural "
                                     "networks over folders of images or sounds into HDF5 stores.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="less log output")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    p = sub.add_parser("models", help="list the registered models")
    p.set_defaults(run=_cmd_models)

    p = sub.add_parser("stages", help="print a model's stage table")
    p.add_argument("model")
    p.set_defaults(run=_cmd_stages)

    p = sub.add_parser("extract", help="extract stages over a folder of stimuli into a store")
    _extract_arguments(p)
    p.set_defaults(run=_cmd_extract)

    p = sub.add_parser("info", help="summarise a store")
    p.add_argument("store")
    p.set_defaults(run=_cmd_info)

    p = sub.add_parser("verify", help="re-extract a sample of a store's stimuli and compare")
    p.add_argument("store")
    p.add_argument("--sample", type=int, default=4, metavar="N", help="stimuli to re-extract (default 4)")
    p.add_argument("--weights", help="weights file, if it moved since the store was made")
    p.add_argument("--device", default="cpu")
    p.add_argument("--trust-checkpoint", action="store_true")
    p.set_defaults(run=_cmd_verify)

    p = sub.add_parser("merge", help="combine stores made with the same settings over disjoint stimuli")
    p.add_argument("stores", nargs="+")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=_cmd_merge)
    return parser


def _extract_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="registry name (see `featx models`)")
    p.add_argument("inputs", help="folder of images or sounds (searched recursively)")
    p.add_argument("-o", "--output", required=True, help="store to write (.h5)")
    p.add_argument("--stages", help="comma-separated stage names (default: all; see `featx stages "
                   "MODEL`); NAME=MODULE.PATH adds any module by its path")
    p.add_argument("--weights", help="checkpoint file, or 'random' / 'random:SEED' (default: the "
                   "published file from the weights cache, $FEATX_WEIGHTS)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow full unpickling of a checkpoint that is not weights-only (runs code from "
                   "the file: only for files you trust)")
    p.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE",
                   help="model option, e.g. noise=off (repeatable)")
    p.add_argument("--stimuli", metavar="LIST", help="file listing the stimuli (order and ids)")
    p.add_argument("--skip-bad", action="store_true", help="go on without undecodable files (recorded)")
    p.add_argument("--background", default="white",
                   help="colour behind transparent pixels: white (default), black, gray or R,G,B")
    p.add_argument("--clip", choices=("start", "center", "windows"), default="start",
                   help="audio: which 2 s to take (default: start, as the original models)")
    p.add_argument("--hop", type=float, help="audio: seconds between windows with --clip windows")
    p.add_argument("--reduce", action="append", default=[], metavar="R",
                   help="also store a reduction: spatial-mean, time-mean, srp:DIM[:SEED] (repeatable)")
    p.add_argument("--reduce-only", action="store_true", help="store only the reductions")
    p.add_argument("--batch-size", type=int, help="stimuli per forward pass (default: automatic)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, help="decoding processes (default: automatic)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="forward-pass precision (autocast); default fp32")
    p.add_argument("--dtype", "--storage-dtype", dest="storage_dtype", choices=("float32", "float16"),
                   default="float32", help="storage dtype (default float32)")
    p.add_argument("--compression", choices=("gzip", "lzf"), help="HDF5 compression filter")
    p.add_argument("--max-store-size", metavar="BYTES", help="refuse to start if the store would be "
                   "larger, e.g. 50G")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--shard", default="auto", metavar="K/N",
                   help="extract only the K-th (0-based) of N blocks of stimuli into its shard store "
                   "beside -o, for job arrays; auto (default): from SLURM array variables when "
                   "present; none: every stimulus. Combine shards with `featx merge`")
    p.add_argument("--keep-shards", action="store_true",
                   help="torchrun: keep the ranks' shard stores after rank 0 merged them")
    p.add_argument("--dist-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="torchrun: give up on a rank silent this long (default 600)")


def _cmd_models(args) -> None:
    from .registry import get_entry, list_models

    rows = [(name, get_entry(name)) for name in list_models()]
    width = max(len(name) for name, _ in rows)
    for name, entry in rows:
        print(f"{name:<{width}}  {entry.modality:<5}  {len(entry.stages):>2} stages  {entry.title}")


def _cmd_stages(args) -> None:
    from .registry import get_entry

    entry = get_entry(args.model)
    print(f"{entry.title} ({entry.name}), input: {_describe_input(entry.input)}")
    header = ("stage", "module path", "shape", "features")
    rows = [(s.name + (f" (alias {', '.join(s.aliases)})" if s.aliases else ""), s.module or "(input)",
             "(" + ", ".join(map(str, s.shape)) + ")", str(s.features)) for s in entry.stages]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    for s in entry.stages:
        if s.note:
            print(f"note on {s.name}: {s.note}")
    source = f" from {entry.weights.url}" if entry.weights.url else ""
    print(f"weights: {entry.weights.file}{source} ({entry.weights.layout} layout)")


def _describe_input(contract) -> str:
    if contract.kind == "image":
        return (f"RGB, shorter side {contract.resize}, centre crop {contract.size}, values in "
                f"[{contract.value_range[0]:g}, {contract.value_range[1]:g}], normalised inside the model")
    return (f"mono waveform at {contract.sample_rate} Hz, {contract.duration:g} s"
            + (f", demeaned, RMS {contract.rms:g}" if contract.rms else ""))


def _cmd_extract(args) -> None:
    from .distributed import parse_shard, run_extraction

    run_extraction(  # one process, one shard, or one torchrun rank; logs its summary
        args.model,
        args.inputs,
        args.output,
        shard=parse_shard(args.shard),
        keep_shards=args.keep_shards,
        timeout=args.dist_timeout,
        stages=_parse_stages(args.stages),
        weights=args.weights,
        model_options=_parse_options(args.model_option),
        trust_checkpoint=args.trust_checkpoint,
        stimuli=args.stimuli,
        background=_parse_colour(args.background),
        clip=args.clip,
        hop=_positive_seconds("--hop", args.hop),
        skip_bad=args.skip_bad,
        reduce=args.reduce,
        keep_full=not args.reduce_only,
        batch_size=_positive("--batch-size", args.batch_size),
        device=args.device,
        workers=args.workers,
        precision=args.precision,
        storage_dtype=args.storage_dtype,
        compression=args.compression,
        max_store_bytes=_parse_size(args.max_store_size),
        overwrite=args.overwrite,
        progress=not args.no_progress,
        command=shlex.join(["featx", *args.argv]),
    )


def _cmd_info(args) -> None:
    from .store import store_info

    print(store_info(args.store))


def _cmd_verify(args) -> int:
    from .verify import verify_store

    report = verify_store(args.store, sample=args.sample, weights=args.weights, device=args.device,
                          trust_checkpoint=args.trust_checkpoint)
    print(report.summary())
    return 0 if report.ok else 1


def _cmd_merge(args) -> None:
    from .distributed import order_shards
    from .store import merge_stores

    merge_stores(order_shards(args.stores), args.output, overwrite=args.overwrite)
    print(f"merged {len(args.stores)} stores into {args.output}")


def _parse_stages(text: str | None):
    if not text:
        return None
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError(f"--stages {text!r} names no stage")
    if any("=" in item for item in items):
        # NAME=PATH entries; plain names stay registry stages (path None)
        return {name: (path if sep else None) for name, sep, path in (i.partition("=") for i in items)}
    return items


def _parse_options(items: list[str]) -> dict:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--model-option {item!r} must be KEY=VALUE, e.g. noise=off")
        try:
            options[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            options[key] = value
    return options


def _parse_colour(text: str) -> tuple[int, int, int]:
    if text.lower() in COLOURS:
        return COLOURS[text.lower()]
    parts = text.split(",")
    try:
        rgb = tuple(int(p) for p in parts)
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise ValueError(f"--background {text!r}: use white, black, gray or R,G,B with values 0-255")
    return rgb


def _parse_size(text: str | None) -> int | None:
    if text is None:
        return None
    units = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    stripped = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = (stripped[:-1], stripped[-1]) if stripped[-1:].isalpha() else (stripped, "")
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise ValueError(f"--max-store-size {text!r}: use a number of bytes or e.g. 500M, 20G") from None
    if value <= 0:
        raise ValueError(f"--max-store-size {text!r} must be positive")
    return int(value)


def _positive_seconds(flag: str, value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(f"{flag} {value} must be a positive number of seconds")
    return value


def _positive(flag: str, value: int | None) -> int | None:
    if value is not None and value < 1:
        raise ValueError(f"{flag} {value} must be at least 1")
    return value


def _configure_logging(level: int) -> None:
    levels = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}
    logging.basicConfig(level=levels[max(-1, min(1, level))], format="featx: %(message)s")
    logging.captureWarnings(True)


if __name__ == "__main__":
    sys.exit(main())
