"""Check that a store still matches what its recorded settings produce.

:func:`verify_store` (``featx verify STORE``) rebuilds the extraction job from what a
store records about itself (model and options, weights, stage mapping,
preprocessing, reductions, precision), picks a seeded random sample of completed
rows, and for each one

1. checks that the recorded source file is still there with the recorded SHA-256
   (a missing or changed file is reported as such, not re-extracted);
2. extracts the stimulus again and compares every stored variable with the stored
   values.

Values are compared per row and variable, relative to the largest magnitude in
that row of that variable: ``max|new - stored| <= rtol * max|stored|``. The new
values are first rounded to the store's dtype. The default ``rtol`` depends on how
the store was made (see :func:`default_rtol`): re-running the same computation on
a CPU reproduces float32 values to about 1e-6 of the row maximum (a different
batch composition changes the last bits), CUDA convolutions use TF32 by default,
autocast (bf16/fp16) rounds inside the network, and float16 storage rounds to 11
significant bits.

Known limits: the weights file must be where the store says it was (or be given
with ``weights=``); a random-init store re-creates its seeded random weights. The
same featx, torch and torchvision versions are not required, so a difference can
also come from a changed library; the summary lists every setting whose recorded
value differs from what this installation computes (e.g. a changed registry entry).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["CHANGED", "DIFFERS", "MATCH", "MISSING", "UNREADABLE", "RowCheck", "VerifyReport", "default_rtol",
           "verify_store"]

log = logging.getLogger(__name__)

MATCH = "match"
DIFFERS = "differs"
MISSING = "missing"
CHANGED = "changed"
UNREADABLE = "unreadable"

# Relative tolerances (of each row's largest magnitude); see the module docstring.
_COMPUTE_RTOL = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 1e-2}
_CUDA_FP32_RTOL = 1e-2
_STORAGE_RTOL = {"float32": 0.0, "float16": 2e-3}
_BATCH = 8


@dataclass(frozen=True)
class RowCheck:
    """The verdict on one sampled store row.

    Attributes:
        row: the row index in the store.
        stimulus: the stimulus id.
        path: the recorded source file.
        status: ``"match"``, ``"differs"`` (values), ``"missing"`` / ``"changed"``
            (the source file), or ``"unreadable"`` (the file cannot be decoded now).
        differences: ``{variable: max|new - stored| / max|stored|}`` for the
            re-extracted rows.
        detail: a readable reason when the status is not ``"match"``.
    """

    row: int
    stimulus: str
    path: str
    status: str
    differences: dict[str, float] = field(default_factory=dict)
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == MATCH

    def describe(self, rtol: float) -> str:
        head = f"row {self.row} {self.stimulus!r}: "
        if self.status == MATCH and not any(self.differences.values()):
            return head + "match (identical values)"
        if self.status in (MATCH, DIFFERS) and self.differences:
            worst = max(self.differences, key=lambda k: _nan_last(self.differences[k]))
            how = f"largest difference {self.differences[worst]:.2g} of the row's largest value, in {worst!r}"
            if self.status == MATCH:
                return head + f"match ({how})"
            bad = [k for k, v in self.differences.items() if not v <= rtol]
            return head + f"DIFFERS in {', '.join(map(repr, bad))} ({how}; tolerance {rtol:.2g})"
        return head + self.detail


@dataclass
class VerifyReport:
    """What :func:`verify_store` found. ``ok`` is True when every sampled row matched."""

    path: Path
    n_rows: int
    n_complete: int
    rows: list[RowCheck]
    rtol: float
    device: str
    description: str
    setting_differences: list[tuple[str, Any, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.rows) and not self.problems and all(r.ok for r in self.rows)

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.status] = out.get(r.status, 0) + 1
        return out

    def summary(self) -> str:
        """A readable report: verdict, what was compared, one line per sampled row."""
        n = len(self.rows)
        if self.ok:
            verdict = f"OK: all {n} sampled stimuli match"
        elif not self.rows:
            verdict = "NOT VERIFIED: no completed row to check"
        else:
            parts = [f"{c} {s}" for s, c in self.counts.items() if s != MATCH]
            verdict = f"FAILED: {self.counts.get(MATCH, 0)} of {n} sampled stimuli match" + (
                f" ({', '.join(parts)})" if parts else "")
        lines = [f"verify {self.path}: {verdict}",
                 f"  {self.description}; {self.n_complete} of {self.n_rows} rows complete; "
                 f"re-extracted on {self.device}; tolerance {self.rtol:.2g} of each row's largest value"]
        lines += [f"  {r.describe(self.rtol)}" for r in self.rows]
        lines += [f"  problem: {p}" for p in self.problems]
        if self.setting_differences:
            lines.append("  recorded settings that differ from what this installation computes "
                         "(stored -> now):")
            lines += [f"    {key}: {_short(a)} -> {_short(b)}" for key, a, b in self.setting_differences[:20]]
        return "\n".join(lines)


def default_rtol(precision: str, storage_dtype: str, devices: Sequence[str] = ("cpu",)) -> float:
    """The tolerance :func:`verify_store` uses for a store made with these settings.

    Args:
        precision: the forward-pass precision (``fp32``, ``bf16``, ``fp16``).
        storage_dtype: ``float32`` or ``float16``.
        devices: the devices involved (where the store was made, where it is checked);
            CUDA fp32 convolutions may use TF32, so fp32 gets a looser tolerance then.
    """
    if precision not in _COMPUTE_RTOL:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(_COMPUTE_RTOL)}")
    if storage_dtype not in _STORAGE_RTOL:
        raise ValueError(f"storage dtype {storage_dtype!r} is not one of {', '.join(_STORAGE_RTOL)}")
    compute = _COMPUTE_RTOL[precision]
    if precision == "fp32" and any(str(d).startswith("cuda") for d in devices):
        compute = _CUDA_FP32_RTOL
    return compute + _STORAGE_RTOL[storage_dtype]


def verify_store(
    path: str | os.PathLike,
    sample: int = 4,
    weights: str | os.PathLike | None = None,
    device: str = "cpu",
    trust_checkpoint: bool = False,
    seed: int = 0,
    *,
    rtol: float | None = None,
) -> VerifyReport:
    """Re-extract ``sample`` completed rows of a store and compare them with the stored values.

    Args:
        path: the store.
        sample: how many completed rows to check (all of them if fewer), chosen with
            ``numpy.random.default_rng(seed)``.
        weights: the weights file, when it is no longer where the store says (it
            should be the same file: its sha256 is compared with the recorded one).
            Ignored for random-init stores, which re-create their seeded weights.
        device: where to re-extract (``cpu``, ``cuda``, ``cuda:N``).
        trust_checkpoint: as for :func:`featx.load_model`.
        seed: seed of the row sample.
        rtol: tolerance relative to each row's largest value (default:
            :func:`default_rtol` for the store's precision, storage and devices).

    Returns:
        A :class:`VerifyReport`; ``report.ok`` says whether everything matched and
        ``report.summary()`` says what was checked.

    Raises:
        FileNotFoundError: no store at ``path``, or the recorded weights file is gone
            and ``weights`` was not given.
        featx.store.StoreError: ``path`` is not a featx store, or lacks the settings
            needed to extract again.
        ValueError: ``sample`` is not positive, or ``device`` is not available.
    """
    from .pipeline import select_device
    from .store import StoreError, store_header

    if isinstance(sample, bool) or not isinstance(sample, (int, np.integer)) or sample < 1:
        raise ValueError(f"sample={sample!r}: give the number of stimuli to re-extract (1 or more)")
    device = str(select_device(device))
    header = store_header(path)
    config = header.config
    absent = [key for key in ("model", "weights", "stages", "preprocessing") if key not in config]
    if absent:
        raise StoreError(f"{header.path} does not record its {', '.join(absent)} settings (made by an "
                         "older featx, or by hand?), so it cannot be extracted again")
    columns, complete = _read_columns(header.path)
    chosen = _choose_rows(complete, int(sample), seed)
    precision = config.get("precision", "fp32")
    storage_dtype = config.get("store_layout", {}).get("storage_dtype", "float32")
    recorded_device = str(_recorded(header.provenance, "device") or "cpu")
    if rtol is None:
        rtol = default_rtol(precision, storage_dtype, (recorded_device, device))
    report = VerifyReport(path=header.path, n_rows=header.n_rows, n_complete=int(complete.sum()),
                          rows=[], rtol=float(rtol), device=device, description=_describe(header))
    if not len(chosen):
        return report

    # Source files first: only files with the recorded content are re-extracted.
    checks: dict[int, RowCheck] = {}
    for row in chosen:
        problem = _file_problem(columns, row)
        if problem is not None:
            checks[row] = problem
    todo = [r for r in chosen if r not in checks]
    if todo:
        weights_arg = _weights_argument(header, weights)
        checks.update(_reextract(header, columns, todo, weights_arg, device, trust_checkpoint,
                                 storage_dtype, report))
    report.rows = [checks[r] for r in chosen]
    log.debug("verified %d rows of %s: ok=%s", len(report.rows), header.path, report.ok)
    return report


# --------------------------------------------------------------------------- the store side


def _read_columns(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The per-row columns (paths, hashes, onsets) and the completed-row mask."""
    import h5py

    with h5py.File(path, "r", swmr=True, locking="best-effort") as h5:
        columns = {}
        for name in ("stimulus", "stimulus_path", "stimulus_sha256", "stimulus_bytes", "onset_s"):
            if name in h5:
                values = h5[name][()]
                if values.dtype == object:
                    values = np.array([v.decode() if isinstance(v, bytes) else v for v in values], dtype=object)
                columns[name] = values
        complete = h5["row_complete"][()].astype(bool)
    return columns, complete


def _read_values(path: Path, header, rows: Sequence[int]) -> dict[str, np.ndarray]:
    import h5py

    index = np.asarray(rows)
    with h5py.File(path, "r", swmr=True, locking="best-effort") as h5:
        return {name: h5[info.variable][index] for name, info in header.stages.items()}


def _choose_rows(complete: np.ndarray, sample: int, seed: int) -> list[int]:
    done = np.flatnonzero(complete)
    if len(done) <= sample:
        return done.tolist()
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(done, size=sample, replace=False).tolist())


def _recorded(provenance: dict, key: str) -> Any:
    """A provenance entry, also from the first input of a merged store."""
    if key in provenance:
        return provenance[key]
    merged = provenance.get("merged_from") or []
    return merged[0].get("provenance", {}).get(key) if merged else None


def _describe(header) -> str:
    config = header.config
    weights = config.get("weights", {})
    if weights.get("source") == "random":
        how = f"random weights (seed {weights.get('seed')})"
    else:
        how = f"weights sha256 {str(weights.get('sha256', '?'))[:12]}..."
    layout = config.get("store_layout", {})
    return (f"{config.get('model', {}).get('name', '?')}, {how}, {config.get('precision', '?')}, "
            f"{layout.get('storage_dtype', '?')} storage")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _nan_last(value: float) -> float:
    return math.inf if math.isnan(value) else value


# --------------------------------------------------------------------------- the source side


def _file_problem(columns: dict[str, np.ndarray], row: int) -> RowCheck | None:
    """A RowCheck when the row's source file is missing or changed, else None."""
    from .sources.common import file_sha256

    stimulus = str(columns["stimulus"][row])
    path = str(columns["stimulus_path"][row])
    recorded = str(columns["stimulus_sha256"][row])
    if not os.path.isfile(path):
        return RowCheck(row, stimulus, path, MISSING, detail=f"source file is missing: {path}")
    size = os.path.getsize(path)
    if "stimulus_bytes" in columns and size != int(columns["stimulus_bytes"][row]):
        return RowCheck(row, stimulus, path, CHANGED,
                        detail=f"source file changed: {path} has {size} bytes, the store recorded "
                        f"{int(columns['stimulus_bytes'][row])}")
    now = file_sha256(path)
    if now != recorded:
        return RowCheck(row, stimulus, path, CHANGED,
                        detail=f"source file changed: {path} has sha256 {now[:16]}..., the store "
                        f"recorded {recorded[:16]}...")
    return None


def _weights_argument(header, weights) -> str:
    """``random:SEED`` for random-init stores, else the weights file to load."""
    recorded = header.config.get("weights", {})
    if recorded.get("source") == "random":
        return f"random:{int(recorded.get('seed', 0))}"
    if weights is not None:
        return os.fspath(weights)
    path = (_recorded(header.provenance, "weights") or {}).get("path")
    if not path:
        raise FileNotFoundError(f"{header.path} records no weights file; pass weights=PATH "
                                "(--weights PATH) with the file it was made with")
    if not os.path.isfile(path):
        sha = str(recorded.get("sha256", ""))[:16]
        raise FileNotFoundError(f"the weights file recorded in {header.path} ({path!r}) does not exist; "
                                f"pass weights=PATH (--weights PATH) with the same file (sha256 {sha}...)")
    return path


def _prepare_kwargs(config: dict) -> dict[str, Any]:
    """The :func:`featx.pipeline.prepare` arguments that reproduce ``config``."""
    preprocessing = config.get("preprocessing", {})
    reduce = config.get("reduce", {})
    kwargs: dict[str, Any] = {
        "stages": dict(config["stages"]),
        "model_options": dict(config.get("model", {}).get("options") or {}),
        "reduce": [_reduction_spec(r) for r in reduce.get("reductions", [])],
        "keep_full": bool(reduce.get("keep_full", True)),
        "precision": config.get("precision", "fp32"),
    }
    if preprocessing.get("source") == "audio":
        kwargs["clip"] = preprocessing.get("clip", "start")
        kwargs["hop"] = preprocessing.get("hop") if kwargs["clip"] == "windows" else None
    elif "background" in preprocessing:
        kwargs["background"] = tuple(int(v) for v in preprocessing["background"])
    return kwargs


def _reduction_spec(settings: dict) -> str:
    kind = settings["kind"]
    if kind == "srp":
        return f"srp:{int(settings['dim'])}:{int(settings.get('seed', 0))}"
    return kind


def _reextract(header, columns, rows, weights, device, trust_checkpoint, storage_dtype,
               report: VerifyReport) -> dict[int, RowCheck]:
    """Extract ``rows`` again with the recorded settings and compare with the store."""
    from .pipeline import BadInputError, _config, prepare
    from .store import _diff

    config = header.config
    files = sorted({str(columns["stimulus_path"][r]) for r in rows})
    try:
        job = prepare(config["model"]["name"], files, weights=weights, trust_checkpoint=trust_checkpoint,
                      skip_bad=True, device=device, **_prepare_kwargs(config))
    except BadInputError as err:  # every file is undecodable now
        return {r: _row_check(columns, r, UNREADABLE, detail=f"cannot be decoded now: {_reason(err, columns, r)}")
                for r in rows}
    now = _config(job, storage_dtype, None)
    ignored = ("stimuli", "store_layout", "storage_dtype")
    report.setting_differences = _diff({k: v for k, v in config.items() if k not in ignored},
                                       {k: v for k, v in now.items() if k not in ignored})
    missing = [name for name in header.stages if name not in job.variables]
    if missing:
        report.problems.append(f"the recorded settings no longer produce {', '.join(map(repr, missing))}")

    checks: dict[int, RowCheck] = {}
    skipped = {os.path.normpath(b["path"]): b["reason"] for b in job.skipped}
    index = _source_index(job.source, columns)
    usable = []
    for r in rows:
        path = os.path.normpath(str(columns["stimulus_path"][r]))
        if path in skipped:
            checks[r] = _row_check(columns, r, UNREADABLE, detail=f"cannot be decoded now: {skipped[path]}")
        elif _key(columns, r) not in index:
            checks[r] = _row_check(columns, r, UNREADABLE,
                                   detail="the source no longer yields this stimulus (audio window moved?)")
        else:
            usable.append(r)

    dtype = np.dtype(storage_dtype)
    compared = [name for name in header.stages if name in job.variables]
    for start in range(0, len(usable), _BATCH):
        block = usable[start:start + _BATCH]
        batch = torch.stack([job.source.load(index[_key(columns, r)]) for r in block])
        new = job.run_batch(batch)
        stored = _read_values(header.path, header, block)
        for i, r in enumerate(block):
            differences = {name: _relative_difference(_as_stored(new[name][i], dtype), stored[name][i])
                           for name in compared}
            good = all(v <= report.rtol for v in differences.values())
            checks[r] = _row_check(columns, r, MATCH if good else DIFFERS, differences=differences)
    return checks


def _source_index(source, columns) -> dict[tuple[str, float], int]:
    """(file path, onset) -> index of that stimulus in the rebuilt source."""
    return {(os.path.normpath(s.path), round(float(s.onset), 6)): i for i, s in enumerate(source.stimuli)}


def _key(columns, row: int) -> tuple[str, float]:
    onset = float(columns["onset_s"][row]) if "onset_s" in columns else 0.0
    return os.path.normpath(str(columns["stimulus_path"][row])), round(onset, 6)


def _row_check(columns, row: int, status: str, **kwargs: Any) -> RowCheck:
    return RowCheck(int(row), str(columns["stimulus"][row]), str(columns["stimulus_path"][row]), status,
                    **kwargs)


def _reason(err, columns, row: int) -> str:
    path = os.path.normpath(str(columns["stimulus_path"][row]))
    for bad in getattr(err, "bad", []):
        if os.path.normpath(bad.path) == path:
            return bad.reason
    return str(err)


def _as_stored(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``values`` rounded as the store rounds them."""
    with warnings.catch_warnings(), np.errstate(over="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.asarray(values).astype(dtype)


def _relative_difference(new: np.ndarray, stored: np.ndarray) -> float:
    """``max|new - stored| / max|stored|``; NaN where exactly one side is NaN or inf."""
    a = np.asarray(new, dtype=np.float64)
    b = np.asarray(stored, dtype=np.float64)
    finite_a, finite_b = np.isfinite(a), np.isfinite(b)
    if not np.array_equal(finite_a, finite_b) or not np.array_equal(a[~finite_a], b[~finite_b],
                                                                        equal_nan=True):
        return math.nan
    if not finite_a.any():
        return 0.0
    diff = float(np.max(np.abs(a[finite_a] - b[finite_b])))
    scale = float(np.max(np.abs(b[finite_b])))
    if diff == 0.0:
        return 0.0
    return diff / scale if scale > 0 else math.inf
