"""The featx store: one HDF5 file per extraction run, readable without featx.

A store holds, for ``n`` stimuli, every requested stage as one dataset at the root,
shaped ``(n, *stage_shape)``, plus one row of metadata per stimulus. It follows the
netCDF-4 conventions (dimension scales), so both of these work without featx::

    h5py.File("run.h5", "r")["relu0"][17]                        # one stimulus
    xarray.open_dataset("run.h5", engine="h5netcdf")["relu0"]    # labelled, lazy

Layout
------
``<stage>`` (one per stage)
    ``(stimulus, <stage>_<dim>, ...)``, e.g. ``relu0`` with dims ``(stimulus,
    relu0_channel, relu0_y, relu0_x)``; dtype ``float32`` (default) or ``float16``;
    ``_FillValue`` NaN, so rows never written read as NaN. The attribute
    ``featx_stage`` holds the stage name. Stage names are used as they are when
    netCDF and HDF5 allow them (``V4.conv2@t1``, ``relu0.spatial-mean`` are fine);
    otherwise see :func:`variable_name`.
``stimulus``
    The stimulus ids (strings): the coordinate of the ``stimulus`` dimension.
``stimulus_path``, ``stimulus_sha256``, ``stimulus_bytes``, plus any other source columns
    One value per stimulus on the ``stimulus`` dimension. Booleans are stored as
    int8 with the attribute ``dtype="bool"``, which xarray decodes back to bool.
``row_complete``
    uint8, 1 only after that row's values were written and flushed to the file.
``<stage>_<dim>``
    Dimension scales without values (the netCDF way to name a dimension that has no
    coordinate). h5py shows them as empty datasets.

Root attributes: ``store_state`` (``"writing"`` until :meth:`StoreWriter.finish`, then
``"complete"``), ``featx_config`` (JSON: every setting that determines the values; it
is compared on resume), ``featx_provenance`` (JSON: versions, command, device, times,
resumes), ``featx_config_sha256`` / ``featx_settings_sha256`` (hashes of the config
with and without its ``stimuli`` part), ``featx_store_format``, ``featx_version``,
``created``, ``finished``, and each top-level scalar of the config and provenance as a
readable attribute of its own (``model``, ``weights_sha256``, ``command``, ...).

Chunks
------
A chunk holds whole rows of one stage: as many as fit in 1 MiB (one row when the
store is compressed, see below), never more than the store has. A row larger than
4 MiB is split along its first stage axes into equal pieces of at most 4 MiB, e.g.
``(1, 16, 224, 224)`` for a float32 ``(64, 224, 224)`` stage. Reading one stimulus of
one stage touches one chunk (or the few of a split row); reading a whole stage reads
chunks in file order. Compressed stores use one row per chunk so that a write never
rewrites a compressed chunk that holds rows already marked complete (a rewrite of a
compressed chunk is not crash-safe). ``gzip`` (level 4, with shuffle) is readable by
every HDF5/netCDF reader; ``lzf`` is faster but only h5py-based readers (h5py,
xarray with ``engine="h5netcdf"``) have the filter.

Storage dtypes
--------------
``float32`` (default) holds every model output exactly, bfloat16 and float16
included. ``float16`` halves the size; a batch with a finite value that becomes
infinite in float16 (|x| > 65504) is refused with :class:`StoreOverflowError` naming
the stage, before anything of that batch is written. Values below about 6e-8 become
0 in float16. netCDF-C based readers (ncdump, the netCDF4 package) cannot read float16
variables; h5py and xarray (h5netcdf) can. ``bfloat16`` is refused: HDF5 and netCDF
have no bfloat16 type that h5py or xarray read back as such (a two-byte float type
would be read as IEEE float16 and lose bfloat16's range); store bfloat16 outputs as
float32, which holds them exactly, or as float16.

Writing, crashes and resume
---------------------------
:class:`StoreWriter` creates every dataset and attribute first (in a temporary file
that is renamed into place), then switches the file to HDF5 single-writer /
multiple-reader (SWMR) mode and writes rows batch by batch: values, flush (and
fsync), then ``row_complete``, flush (and fsync). SWMR keeps the file consistent on
disk at every moment, so after the writing process is killed the file still opens
and every row marked complete holds its values. Opening the same path again with the
same settings resumes: :meth:`StoreWriter.pending_rows` lists the rows still to
write. Different settings raise :class:`StoreMismatchError` naming each one.

A killed writer leaves HDF5's "file is open for writing" marks in the file. Until
they are cleared, a plain ``h5py.File(path, "r")`` (and plain xarray) refuses the
file with a message that mentions ``h5clear``. :func:`open_store`,
:func:`store_info` and :func:`store_header` read such files anyway (they open them in
SWMR-read mode), resuming clears the marks, and :func:`clear_write_flags` clears them
explicitly (as ``h5clear -s --increment PATH`` does). Without featx, read such a file
with ``h5py.File(path, "r", swmr=True)`` or
``xarray.open_dataset(path, engine="h5netcdf", driver_kwds={"swmr": True})``.
**Warning:** do not clear the marks with a bare ``h5clear -s``: the killed writer may
have written past the end recorded in the file's superblock, and the next close would
cut that off. Use :func:`clear_write_flags` or ``h5clear -s --increment``.

Reading while a store is being written
--------------------------------------
Other processes on the same machine can read the completed rows while the writer
runs: :func:`open_store` does this by itself. With h5py, open with
``h5py.File(path, "r", swmr=True)`` and call ``dataset.refresh()`` before each read
to see new rows; check ``row_complete``. With xarray, pass
``driver_kwds={"swmr": True}`` to ``xarray.open_dataset(..., engine="h5netcdf")``;
a plain open fails while the writer runs, because the file is marked open for
writing.

Network file systems
--------------------
HDF5 locks files while opening them. On file systems without POSIX/flock locking
(some NFS and Lustre mounts) opening fails with "unable to lock file"; set
``HDF5_USE_FILE_LOCKING=FALSE`` in the environment of both writer and readers. featx
also keeps ``<store>.lock`` beside the store while writing, to refuse a second
writer; where that lock cannot be taken featx logs a warning and goes on. SWMR's
guarantees rest on POSIX write ordering, which network file systems do not promise
to other machines: read a store that is being written only on the machine that
writes it, or copy it to local disk, or wait until ``store_state`` is
``"complete"``. Finished stores are ordinary files, fine to read anywhere.

Compatibility
-------------
Files are written with the HDF5 1.10 file format (``libver=("v110", "v110")``, the
oldest that supports SWMR), readable by HDF5 1.10 and later (h5py >= 2.7,
netCDF-C >= 4.4.1 for float32 stores).
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

if TYPE_CHECKING:
    import xarray

__all__ = [
    "IncompleteStoreWarning",
    "StageInfo",
    "StageSpec",
    "StoreBusyError",
    "StoreCompleteError",
    "StoreError",
    "StoreHeader",
    "StoreLayout",
    "StoreMismatchError",
    "StoreOverflowError",
    "StoreSizeError",
    "StoreWriter",
    "check_room",
    "clear_write_flags",
    "merge_stores",
    "open_store",
    "store_header",
    "store_info",
    "variable_name",
]

log = logging.getLogger(__name__)

STORE_FORMAT = 1
LIBVER = ("v110", "v110")
STORAGE_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}
COMPRESSIONS = (None, "gzip", "lzf")
GZIP_LEVEL = 4
CHUNK_TARGET_BYTES = 1 << 20
CHUNK_MAX_BYTES = 4 << 20
REQUIRED_COLUMNS = ("stimulus", "stimulus_path", "stimulus_sha256", "stimulus_bytes")
ROW_COMPLETE = "row_complete"
STATE_WRITING = "writing"
STATE_COMPLETE = "complete"
# Free space that must remain after the estimated size: a fraction plus a constant.
SPACE_MARGIN_FRACTION = 0.05
SPACE_MARGIN_BYTES = 64 << 20
# Config keys the store fills in; "stimuli" may also come from the caller.
LAYOUT_KEY = "store_layout"
STIMULI_KEY = "stimuli"
# Root attributes owned by the store: never taken from config or provenance.
_OWN_ATTRS = frozenset({
    "store_state", "featx_store_format", "featx_version", "created", "finished",
    "featx_config", "featx_provenance", "featx_config_sha256", "featx_settings_sha256",
})
_COLUMN_TITLES = {
    "stimulus": "stimulus id",
    "stimulus_path": "source file path when the store was written",
    "stimulus_sha256": "SHA-256 of the source file",
    "stimulus_bytes": "size of the source file in bytes",
    ROW_COMPLETE: "1 when the row's values are written and flushed; rows with 0 hold NaN",
}
_MAX_SHOWN_DIFFERENCES = 20
_READ_ATTEMPTS = 5
_EOA_MARGIN = 1 << 20


class StoreError(Exception):
    """A store file cannot be created, resumed, read or merged as asked."""


class StoreMismatchError(StoreError):
    """An existing store (or a merge input) was written with different settings.

    ``differences`` lists ``(dotted key, old value, new value)`` for each setting.
    """

    def __init__(self, message: str, differences: Sequence[tuple[str, Any, Any]]):
        super().__init__(message)
        self.differences = list(differences)


class StoreCompleteError(StoreError):
    """The store at ``path`` is already complete, with the same settings."""

    def __init__(self, message: str, path: str | os.PathLike):
        super().__init__(message)
        self.path = Path(path)


class StoreSizeError(StoreError):
    """The store would not fit: on the disk, or under the ``max_bytes`` cap."""


class StoreBusyError(StoreError):
    """Another process is writing the store."""


class StoreOverflowError(StoreError, ValueError):
    """A value does not fit the storage dtype (float16: |x| > 65504)."""


class IncompleteStoreWarning(UserWarning):
    """A store was opened before all its rows were written."""


# --------------------------------------------------------------------------- names


def variable_name(stage: str) -> str:
    """The dataset/variable name that holds ``stage`` in a store.

    Names are kept as they are unless netCDF or HDF5 forbid them. Then, and for
    ``%`` itself, the offending characters are percent-encoded as UTF-8 bytes
    (``a/b`` -> ``a%2Fb``): ``/`` anywhere, control characters, a first character
    that is not a letter, digit or ``_``, and trailing whitespace.
    ``urllib.parse.unquote`` decodes a name; the ``featx_stage`` attribute of each
    stage variable also holds the original.
    """
    if not isinstance(stage, str):
        raise TypeError(f"a stage name must be a str, not {type(stage).__name__}")
    if not stage:
        raise ValueError("a stage name must not be empty")
    n_trailing = len(stage) - len(stage.rstrip())
    out = []
    for i, ch in enumerate(stage):
        bad = (
            ch in "%/"
            or ord(ch) < 32
            or ord(ch) == 127
            or (i == 0 and not (ch.isalnum() or ch == "_"))
            or i >= len(stage) - n_trailing
        )
        out.append("".join(f"%{b:02X}" for b in ch.encode()) if bad else ch)
    return "".join(out)


def _dimension_name(variable: str, dim: str) -> str:
    return f"{variable}_{variable_name(dim)}"


# --------------------------------------------------------------------------- JSON


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    raise TypeError(f"{type(obj).__name__} value {obj!r:.80} cannot be stored as JSON")


def _to_json(value: Any, *, canonical: bool = False) -> str:
    return json.dumps(value, default=_json_default, ensure_ascii=False,
                      sort_keys=canonical, separators=(",", ":") if canonical else None)


def _plain(value: Any, what: str) -> Any:
    """``value`` as plain JSON data (tuples become lists, numpy scalars numbers)."""
    try:
        return json.loads(_to_json(value))
    except (TypeError, ValueError) as err:
        raise TypeError(f"{what} must be JSON-serialisable: {err}") from None


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(_to_json(value, canonical=True).encode()).hexdigest()


_ABSENT = object()


def _diff(old: Any, new: Any, key: str = "") -> list[tuple[str, Any, Any]]:
    """Every differing leaf of two JSON values, as (dotted key, old, new)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in [*old, *(k for k in new if k not in old)]:
            sub = f"{key}.{k}" if key else str(k)
            out += _diff(old.get(k, _ABSENT), new.get(k, _ABSENT), sub)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        out = []
        for i, (a, b) in enumerate(zip(old, new)):
            out += _diff(a, b, f"{key}[{i}]")
        return out
    if old is _ABSENT or new is _ABSENT:
        return [(key or "(all)", old, new)]
    if _to_json(old, canonical=True) == _to_json(new, canonical=True):
        return []
    return [(key or "(all)", old, new)]


def _show(value: Any, limit: int = 100) -> str:
    if value is _ABSENT:
        return "(absent)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _difference_lines(differences: Sequence[tuple[str, Any, Any]]) -> str:
    lines = [f"  {key}: {_show(a)} -> {_show(b)}"
             for key, a, b in differences[:_MAX_SHOWN_DIFFERENCES]]
    if len(differences) > _MAX_SHOWN_DIFFERENCES:
        lines.append(f"  ... and {len(differences) - _MAX_SHOWN_DIFFERENCES} more")
    return "\n".join(lines)


# --------------------------------------------------------------------------- small helpers


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _human_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _featx_version() -> str:
    featx = sys.modules.get("featx")
    version = getattr(featx, "__version__", None)
    if version:
        return str(version)
    try:
        from importlib.metadata import version as dist_version

        return dist_version("featx")
    except Exception:  # not installed: a source checkout without featx imported
        return "unknown"


def _libraries() -> dict[str, str]:
    libs = {"h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version,
            "numpy": np.__version__}
    with contextlib.suppress(ImportError):
        import h5netcdf

        libs["h5netcdf"] = h5netcdf.__version__
    return libs


def _attr_value(value: Any) -> Any:
    """A root attribute value readable by netCDF tools, or None to leave it out."""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return int(value) if -(2**63) <= int(value) < 2**63 else str(value)
    if isinstance(value, (float, np.floating, str)):
        return value
    return None


def _flat_attrs(*sources: Mapping[str, Any]) -> dict[str, Any]:
    """Top-level scalars of ``sources`` as root attributes (the first source wins)."""
    out: dict[str, Any] = {}
    for source in sources:
        for key, value in source.items():
            name = str(key).replace("/", "_")
            if name in out or name in _OWN_ATTRS or name.startswith("_"):
                continue
            value = _attr_value(value)
            if value is not None:
                out[name] = value
    return out


def _decode_attr(value: Any) -> Any:
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform or file system allows it
        _fsync_path(folder)


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class StageSpec:
    """The per-stimulus shape of one stage and the names of its axes.

    Args:
        shape: sizes of the stage axes (without the stimulus axis), e.g.
            ``(64, 55, 55)``.
        dims: one name per axis, from the vocabulary ``channel, y, x`` (images),
            ``channel, frequency, time`` (audio maps), ``feature`` (vectors),
            ``time`` (waveforms). The store names each dimension
            ``<stage>_<dim>``.
    """

    shape: tuple[int, ...]
    dims: tuple[str, ...]

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        dims = tuple(str(d) for d in self.dims)
        if len(shape) != len(dims):
            raise ValueError(f"StageSpec shape {shape} has {len(shape)} axes but dims "
                             f"{dims} names {len(dims)}; give one name per axis")
        if any(s < 1 for s in shape):
            raise ValueError(f"StageSpec shape {shape} has an axis of size < 1")
        if len(set(dims)) != len(dims) or not all(dims):
            raise ValueError(f"StageSpec dims {dims} must be distinct, non-empty names")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "dims", dims)

    @property
    def size(self) -> int:
        """Values per stimulus."""
        return math.prod(self.shape)


def _chunk_shape(n_rows: int, shape: tuple[int, ...], itemsize: int,
                 compressed: bool) -> tuple[int, ...]:
    """The chunk rule of the module docstring."""
    row_bytes = itemsize * math.prod(shape)
    if row_bytes <= CHUNK_MAX_BYTES:
        rows = 1 if compressed else CHUNK_TARGET_BYTES // max(row_bytes, 1)
        return (max(1, min(n_rows, rows)), *shape)
    chunk = list(shape)
    for axis, size in enumerate(shape):
        slab = itemsize * math.prod(shape[axis + 1:])
        if slab <= CHUNK_MAX_BYTES:
            pieces = math.ceil(size * slab / CHUNK_MAX_BYTES)
            chunk[axis] = math.ceil(size / pieces)
            break
        chunk[axis] = 1
    return (1, *chunk)


def _string_column(name: str, values: np.ndarray) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        if isinstance(v, bytes):
            v = v.decode("utf-8")
        if not isinstance(v, str):
            raise TypeError(f"row column {name!r} mixes strings with {type(v).__name__} "
                            f"(row {i}: {v!r:.60}); give one type per column")
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"row column {name!r}, row {i}: {v!r:.80} is not valid "
                             "text (undecodable file name?)") from None
        out[i] = v
    return out


def _column(name: str, values: Any, n_rows: int) -> tuple[np.ndarray, str]:
    """A row column as written, with the dtype name recorded in the config."""
    arr = np.asarray(values)
    if arr.ndim != 1 or len(arr) != n_rows:
        raise ValueError(f"row column {name!r} has shape {arr.shape}; expected "
                         f"({n_rows},), one value per row")
    kind = arr.dtype.kind
    if kind in "USO":
        return _string_column(name, arr), "str"
    if kind == "b":
        return arr.astype(np.int8), "bool"
    if kind == "f" and arr.dtype.itemsize < 4:
        arr = arr.astype(np.float32)  # netCDF has no float16
    if kind in "iuf":
        return np.ascontiguousarray(arr), arr.dtype.name
    raise TypeError(f"row column {name!r} has dtype {arr.dtype}; use numbers, bools or "
                    "strings")


def _stimuli_identity(ids: np.ndarray, sha256s: np.ndarray) -> dict[str, Any]:
    digest = hashlib.sha256()
    for stimulus_id, sha in zip(ids, sha256s):
        digest.update(f"{stimulus_id}\0{sha}\n".encode())
    return {"count": len(ids), "sha256": digest.hexdigest()}


class StoreLayout:
    """Everything a new store needs to know before its first row is written.

    Args:
        stages: ``{stage name: StageSpec}``, in the order the store lists them.
        n_rows: number of stimuli (rows).
        row_columns: one array of ``n_rows`` values per column. Required:
            ``stimulus`` (unique ids, str), ``stimulus_path``, ``stimulus_sha256``
            (str) and ``stimulus_bytes`` (int); any other source columns (numbers,
            bools or strings) are stored too.
        config: JSON-able dict of every setting that determines the values (model,
            registry entry hash, weights sha256, stages, preprocessing, reduction,
            precision, storage dtype, ...). Resume compares it key by key. Its
            ``stimuli`` entry identifies the stimulus set (e.g.
            ``{"count": n, "sha256": ...}``); when absent, the store computes one from
            the ids and file hashes. Merging ignores ``stimuli`` and requires
            everything else to be equal. The key ``store_layout`` is the store's own:
            it adds the storage dtype, compression, stage shapes/dims and row
            column dtypes there.
        attrs: JSON-able provenance (versions, command line, device, start time,
            ...), stored in ``featx_provenance``; its top-level scalars also become
            root attributes. Not compared on resume.
        storage_dtype: ``"float32"`` (default) or ``"float16"``; ``"bfloat16"`` is
            refused (see the module docstring).
        compression: ``None`` (default), ``"gzip"`` or ``"lzf"``.

    Raises:
        ValueError, TypeError: naming the stage, column or setting at fault.
    """

    def __init__(
        self,
        stages: Mapping[str, StageSpec],
        n_rows: int,
        row_columns: Mapping[str, Any],
        config: Mapping[str, Any],
        attrs: Mapping[str, Any] | None = None,
        storage_dtype: str = "float32",
        compression: str | None = None,
    ):
        self.n_rows = int(n_rows)
        if self.n_rows < 1:
            raise ValueError(f"n_rows must be at least 1, not {n_rows}")
        self.storage_dtype = _check_storage_dtype(storage_dtype)
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression {compression!r} is not one of "
                             f"{', '.join(map(repr, COMPRESSIONS))}")
        self.compression = compression
        if not stages:
            raise ValueError("a store needs at least one stage")
        self.stages = {}
        for name, spec in stages.items():
            if not isinstance(spec, StageSpec):
                raise TypeError(f"stage {name!r}: expected a StageSpec, not "
                                f"{type(spec).__name__}")
            variable_name(name)  # checks the type
            self.stages[name] = spec
        self.variables = {stage: variable_name(stage) for stage in self.stages}
        self.dimensions = {
            stage: tuple(_dimension_name(self.variables[stage], d) for d in spec.dims)
            for stage, spec in self.stages.items()
        }
        self.row_columns, self._column_dtypes = self._check_columns(row_columns)
        self._check_names()
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a dict, not {type(config).__name__}")
        if LAYOUT_KEY in config:
            raise ValueError(f"config key {LAYOUT_KEY!r} is filled in by the store; "
                             "remove it from config")
        self.config = _plain(dict(config), "config")
        self.attrs = _plain(dict(attrs or {}), "attrs")

    def __repr__(self) -> str:
        return (f"StoreLayout({len(self.stages)} stages, n_rows={self.n_rows}, "
                f"storage_dtype={self.storage_dtype!r}, compression={self.compression!r})")

    def _check_columns(self, row_columns: Mapping[str, Any]):
        missing = [c for c in REQUIRED_COLUMNS if c not in row_columns]
        if missing:
            raise ValueError(f"row_columns lacks {', '.join(map(repr, missing))}; every "
                             f"store has {', '.join(REQUIRED_COLUMNS)}")
        columns, dtypes = {}, {}
        for name, values in row_columns.items():
            if variable_name(name) != name:
                raise ValueError(f"row column name {name!r} is not a valid netCDF name")
            columns[name], dtypes[name] = _column(name, values, self.n_rows)
        for name in REQUIRED_COLUMNS[:3]:
            if dtypes[name] != "str":
                raise TypeError(f"row column {name!r} must hold strings")
        if dtypes["stimulus_bytes"][:3] not in ("int", "uin"):
            raise TypeError("row column 'stimulus_bytes' must hold integers")
        ids = columns["stimulus"]
        if len(set(ids)) != len(ids):
            repeated = [i for i, c in Counter(ids).items() if c > 1]
            raise ValueError(f"stimulus ids must be unique; {len(repeated)} repeat, e.g. "
                             f"{', '.join(map(repr, repeated[:5]))}")
        return columns, dtypes

    def _check_names(self) -> None:
        variables = [*self.row_columns, ROW_COMPLETE, *self.variables.values()]
        seen = Counter(variables)
        clash = [v for v, c in seen.items() if c > 1]
        if clash:
            raise ValueError(f"name(s) {', '.join(map(repr, clash))} are used twice "
                             "(stages and row columns share one namespace; "
                             f"{ROW_COMPLETE!r} is reserved)")
        dims: dict[str, str] = {"stimulus": "the stimulus dimension"}
        for stage, names in self.dimensions.items():
            for dim in names:
                if dim in dims:
                    raise ValueError(f"stage {stage!r}: dimension name {dim!r} is also "
                                     f"{dims[dim]}; rename one of the stages")
                dims[dim] = f"a dimension of stage {stage!r}"
        for name in variables:
            if name in dims and name != "stimulus":
                raise ValueError(f"variable {name!r} has the name of {dims[name]}; "
                                 "rename the stage or column")

    @property
    def storage_itemsize(self) -> int:
        return STORAGE_DTYPES[self.storage_dtype].itemsize

    def chunks(self, stage: str) -> tuple[int, ...]:
        """The HDF5 chunk shape of ``stage`` (rule in the module docstring)."""
        return _chunk_shape(self.n_rows, self.stages[stage].shape, self.storage_itemsize,
                            self.compression is not None)

    def stimuli(self) -> dict[str, Any]:
        """The stimulus-identity part of the config."""
        if STIMULI_KEY in self.config:
            return self.config[STIMULI_KEY]
        return _stimuli_identity(self.row_columns["stimulus"],
                                 self.row_columns["stimulus_sha256"])

    def featx_config(self) -> dict[str, Any]:
        """The config as stored in ``featx_config`` and compared on resume."""
        layout = {
            "storage_dtype": self.storage_dtype,
            "compression": self.compression,
            "stages": {s: {"shape": list(spec.shape), "dims": list(spec.dims)}
                       for s, spec in self.stages.items()},
            "row_columns": dict(self._column_dtypes),
        }
        return {**self.config, STIMULI_KEY: self.stimuli(), LAYOUT_KEY: layout}

    def data_bytes(self) -> int:
        """Bytes of stage values, uncompressed."""
        return self.n_rows * self.storage_itemsize * sum(s.size for s in self.stages.values())

    def estimated_bytes(self) -> int:
        """Planned file size: uncompressed values plus row columns and metadata."""
        columns = 0
        for name, values in self.row_columns.items():
            if values.dtype == object:  # variable-length strings: heap objects + refs
                columns += sum(len(v.encode()) for v in values) + 32 * len(values)
            else:
                columns += values.nbytes
        n_chunks = 0
        for stage, spec in self.stages.items():
            chunk = self.chunks(stage)
            full = (self.n_rows, *spec.shape)
            n_chunks += math.prod(math.ceil(a / b) for a, b in zip(full, chunk))
        text = len(_to_json(self.featx_config())) + len(_to_json(self.attrs))
        metadata = 64 * n_chunks + 16384 * (len(self.stages) * 2 + len(self.row_columns))
        return self.data_bytes() + columns + self.n_rows + metadata + 2 * text + (1 << 20)


def _check_storage_dtype(storage_dtype: Any) -> str:
    name = storage_dtype
    if not isinstance(name, str):
        try:
            name = np.dtype(storage_dtype).name
        except TypeError:
            name = str(storage_dtype)
    if name in ("bfloat16", "bf16"):
        raise ValueError(
            "storage_dtype 'bfloat16' is not supported: HDF5 and netCDF have no bfloat16 "
            "type that h5py or xarray read back (a two-byte float is read as IEEE "
            "float16, which loses bfloat16's range). Use 'float32', which holds "
            "bfloat16 values exactly, or 'float16' to halve the size.")
    if name not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype {storage_dtype!r} is not one of "
                         f"{', '.join(map(repr, STORAGE_DTYPES))}")
    return name


def check_room(path: str | os.PathLike, layout: StoreLayout, *,
               max_bytes: int | None = None, disk: bool = True,
               reclaimable: int = 0) -> None:
    """Refuse a store that does not fit, before anything is written.

    :meth:`StoreWriter.open` calls this for new stores; call it yourself to check
    before expensive work.

    Args:
        path: where the store will be.
        layout: the planned store.
        max_bytes: a cap on the estimated size, or None.
        disk: check the free space of the folder (``shutil.disk_usage``), keeping a
            margin of 5% of the estimate plus 64 MiB.
        reclaimable: bytes freed when the store replaces an old file.

    Raises:
        StoreSizeError: saying how much is needed and how much there is.
    """
    needed = layout.estimated_bytes()
    if max_bytes is not None and needed > max_bytes:
        raise StoreSizeError(
            f"{path}: the store needs about {_human_bytes(needed)} "
            f"({layout.n_rows} stimuli x {len(layout.stages)} stages, "
            f"{layout.storage_dtype}, uncompressed), more than the limit of "
            f"{_human_bytes(max_bytes)}; raise the limit, or store fewer stages, reduced "
            "stages, or float16 values")
    if not disk:
        return
    folder = Path(path).resolve().parent
    free = shutil.disk_usage(folder).free + reclaimable
    margin = SPACE_MARGIN_BYTES + int(SPACE_MARGIN_FRACTION * needed)
    if needed + margin > free:
        hint = (" With compression the file may be smaller than this estimate; skip "
                "this check with check_space=False to try anyway."
                if layout.compression else "")
        raise StoreSizeError(
            f"{path}: the store needs about {_human_bytes(needed)} plus a margin of "
            f"{_human_bytes(margin)}, but {folder} has only {_human_bytes(free)} free. "
            "Free some space, write elsewhere, or store fewer stages, reduced stages, "
            f"or float16 values.{hint}")


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class StageInfo:
    """One stage as found in a store file."""

    name: str
    variable: str
    shape: tuple[int, ...]
    dims: tuple[str, ...]
    dtype: np.dtype
    chunks: tuple[int, ...] | None
    compression: str | None


@dataclass(frozen=True)
class StoreHeader:
    """What a store says about itself, read without loading values.

    ``config`` is the stored ``featx_config``, ``provenance`` the stored
    ``featx_provenance``, ``attrs`` every root attribute.
    """

    path: Path
    state: str
    format: int
    config: dict[str, Any]
    provenance: dict[str, Any]
    attrs: dict[str, Any]
    n_rows: int
    n_complete: int
    stages: dict[str, StageInfo]
    row_columns: tuple[str, ...]

    @property
    def is_complete(self) -> bool:
        return self.state == STATE_COMPLETE and self.n_complete == self.n_rows

    @property
    def settings(self) -> dict[str, Any]:
        """The config without its stimulus-identity part (what merging compares)."""
        return {k: v for k, v in self.config.items() if k != STIMULI_KEY}


def _open_read(path: str | os.PathLike) -> h5py.File:
    """Open for reading, also while a writer runs or after it was killed."""
    for attempt in range(_READ_ATTEMPTS):
        try:
            return h5py.File(path, "r", swmr=True, locking="best-effort")
        except OSError as err:
            if _SWMR_MISMATCH in str(err):
                # this process already holds the file open without SWMR (a plain h5py
                # or xarray handle): HDF5 then only allows the same kind of open
                return h5py.File(path, "r", locking="best-effort")
            # StoreWriter.finish and resume hold the file in normal (non-SWMR) write
            # mode for a moment; SWMR readers are refused meanwhile.
            if attempt == _READ_ATTEMPTS - 1 or not _write_flags_set(Path(path)):
                raise
            time.sleep(0.2)
    raise AssertionError("unreachable")


_SWMR_MISMATCH = "SWMR read access flag not the same"


def _not_featx(path: Path, why: str, replace_hint: bool = False) -> StoreError:
    hint = ("; to replace it pass overwrite=True (--overwrite), or choose another path"
            if replace_hint else "")
    return StoreError(f"{path} {why}, so it is not a featx store{hint}")


def store_header(path: str | os.PathLike) -> StoreHeader:
    """Read a store's state, settings, provenance and stage list.

    Raises:
        FileNotFoundError: no file at ``path``.
        StoreError: the file is not an HDF5 file or not a featx store.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no store at {path}")
    try:
        h5 = _open_read(path)
    except OSError as err:
        if _write_flags_set(path):
            raise StoreError(
                f"{path} is marked open for writing and cannot be read now ({err}). If "
                "no process is writing it (its writer was killed while finishing), "
                "clear the mark with featx.store.clear_write_flags(path) or "
                f"`h5clear -s --increment {path}`, or resume the store") from None
        raise _not_featx(path, f"cannot be opened as HDF5 ({err})") from None
    with h5:
        attrs = {k: _decode_attr(v) for k, v in h5.attrs.items()}
        if "featx_config" not in attrs or ROW_COMPLETE not in h5:
            raise _not_featx(path, "has no featx_config attribute or row_complete "
                             "dataset")
        fmt = int(attrs.get("featx_store_format", 0))
        if fmt > STORE_FORMAT:
            raise StoreError(f"{path} has store format {fmt}; this featx reads format "
                             f"{STORE_FORMAT} and older: update featx")
        config = json.loads(attrs["featx_config"])
        provenance = json.loads(attrs.get("featx_provenance", "{}"))
        complete = h5[ROW_COMPLETE][()]
        layout = config.get(LAYOUT_KEY, {})
        stages = {}
        for name, spec in layout.get("stages", {}).items():
            var = variable_name(name)
            ds = h5[var]
            stages[name] = StageInfo(
                name=name, variable=var, shape=tuple(ds.shape[1:]),
                dims=tuple(spec["dims"]), dtype=ds.dtype, chunks=ds.chunks,
                compression=ds.compression)
        return StoreHeader(
            path=path, state=str(attrs.get("store_state", "")), format=fmt,
            config=config, provenance=provenance, attrs=attrs, n_rows=len(complete),
            n_complete=int(np.count_nonzero(complete)), stages=stages,
            row_columns=tuple(layout.get("row_columns", {})))


def open_store(path: str | os.PathLike, *, complete_only: bool = True,
               **kwargs: Any) -> xarray.Dataset:
    """Open a store as a lazy ``xarray.Dataset``.

    Works while a writer is running (in another process or this one) and after a
    writer was killed: the file is opened in HDF5 SWMR-read mode, as
    ``xarray.open_dataset(path, engine="h5netcdf", driver_kwds={"swmr": True})``
    does. Values are read when used; pass ``chunks={}`` for dask arrays with the
    file's chunks.

    Args:
        path: the store.
        complete_only: keep only rows marked complete (default). An unfinished
            store (still being written, or its writer was stopped) warns with
            :class:`IncompleteStoreWarning` either way; with ``complete_only=False``
            all rows are returned, and rows never written hold NaN
            (``row_complete`` tells which).
        **kwargs: passed to ``xarray.open_dataset`` (e.g. ``chunks``,
            ``drop_variables``).

    Raises:
        FileNotFoundError, StoreError: as :func:`store_header`.
    """
    import xarray as xr

    header = store_header(path)
    driver_kwds = {"swmr": True, "locking": "best-effort", **kwargs.pop("driver_kwds", {})}
    try:
        ds = xr.open_dataset(path, engine="h5netcdf", driver_kwds=driver_kwds, **kwargs)
    except OSError as err:
        if _SWMR_MISMATCH not in str(err):
            raise
        # already open in this process without SWMR (see _open_read)
        driver_kwds.pop("swmr")
        ds = xr.open_dataset(path, engine="h5netcdf", driver_kwds=driver_kwds, **kwargs)
    complete = ds[ROW_COMPLETE].values.astype(bool)
    n_done = int(complete.sum())
    if header.state != STATE_COMPLETE or n_done < len(complete):
        shown = ("returning only those; pass complete_only=False for every row "
                 "(rows not written are NaN)" if complete_only else
                 "rows not written are NaN (see row_complete)")
        warnings.warn(
            f"{path} is unfinished (store_state={header.state!r}): {n_done} of "
            f"{len(complete)} rows are complete; {shown}",
            IncompleteStoreWarning, stacklevel=2)
        if complete_only and n_done < len(complete):
            ds = ds.isel(stimulus=np.flatnonzero(complete))
    return ds


def store_info(path: str | os.PathLike) -> str:
    """A readable summary: state, rows, stages, storage and provenance."""
    header = store_header(path)
    attrs = header.attrs
    size = Path(path).stat().st_size
    lines = [f"featx store {header.path}"]
    lines.append(f"  state: {header.state or '?'} ({header.n_complete} of "
                 f"{header.n_rows} rows complete)")
    layout = header.config.get(LAYOUT_KEY, {})
    compression = layout.get("compression") or "none"
    data = sum(header.n_rows * math.prod(s.shape) * s.dtype.itemsize
               for s in header.stages.values())
    lines.append(f"  storage: {layout.get('storage_dtype', '?')}, compression "
                 f"{compression}; {_human_bytes(size)} on disk, "
                 f"{_human_bytes(data)} of values uncompressed")
    lines.append(f"  stages ({len(header.stages)}):")
    width = max(len(s) for s in header.stages) if header.stages else 0
    for stage in header.stages.values():
        dims = ", ".join(f"{d}={n}" for d, n in zip(stage.dims, stage.shape))
        lines.append(f"    {stage.name:<{width}}  ({dims})  {stage.dtype}  "
                     f"chunks {stage.chunks}")
    lines.append(f"  row columns: {', '.join(header.row_columns)}")
    merged = header.provenance.get("merged_from")
    if merged:
        names = ", ".join(Path(m.get("path", "?")).name for m in merged)
        lines.append(f"  merged from {len(merged)} stores: {names}")
    resumes = header.provenance.get("resumed") or []
    if resumes:
        lines.append(f"  resumed {len(resumes)} time(s), last at "
                     f"{resumes[-1].get('time', '?')}")
    lines.append("  attributes:")
    skip = {"featx_config", "featx_provenance", "store_state"}
    for key, value in attrs.items():
        if key in skip or key.startswith("_") or isinstance(value, np.ndarray):
            continue
        text = str(value)
        text = text if len(text) <= 100 else text[:97] + "..."
        lines.append(f"    {key}: {text}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- writer lock


class _WriterLock:
    """``<store>.lock`` held with flock while a StoreWriter has the store open."""

    def __init__(self, store: Path):
        self.path = store.with_name(store.name + ".lock")
        self.store = store
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX
            log.warning("cannot lock %s on this platform; not checking for another "
                        "writer", self.store)
            return
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise StoreBusyError(
                    f"{self.store} is being written by another process ({holder}); "
                    f"wait for it to finish or stop it (if no such process runs, "
                    f"delete {self.path})") from None
            except OSError as err:  # the file system has no flock
                os.close(fd)
                log.warning("cannot lock %s (%s); not checking for another writer",
                            self.path, err)
                return
            try:  # a writer that just finished may have removed the file we locked
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
                self._fd = fd
                return
            os.close(fd)
        raise StoreBusyError(f"could not lock {self.path}; is another process "
                             "opening the store?")

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


# --------------------------------------------------------------------------- write flags


def _write_flags_set(path: Path) -> bool:
    """Whether the superblock still says "open for writing" (HDF5 1.10+ format)."""
    with open(path, "rb") as fh:
        head = fh.read(12)
    return (head[:8] == b"\x89HDF\r\n\x1a\n" and head[8] >= 3
            and (head[11] & 0b101) != 0)


def _hdf5_function(name: str, argtypes: list) -> Any:
    """A function of the HDF5 library that h5py uses, for the two repairs h5py lacks."""
    try:
        function = getattr(ctypes.CDLL(h5py.h5p.__file__), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function


def _clear_status_flags(path: Path) -> None:
    """Repair a store whose writer was killed, as ``h5clear -s --increment`` does.

    Clears the superblock's write marks and moves the end-of-allocation mark past
    everything the killed writer may have written after its last superblock update
    (the file's end, and the end of every allocated chunk, plus a margin), so that
    closing the file cannot truncate it and new allocations cannot overlap old data.
    """
    set_property = _hdf5_function(
        "H5Pset", [ctypes.c_int64, ctypes.c_char_p, ctypes.c_void_p])
    get_eoa = _hdf5_function("H5Fget_eoa", [ctypes.c_int64, ctypes.c_void_p])
    increment = _hdf5_function("H5Fincrement_filesize", [ctypes.c_int64, ctypes.c_uint64])
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_file_locking(False, True)  # SWMR readers may hold the file open
    clear = ctypes.c_bool(True)
    if (set_property is None or get_eoa is None or increment is None
            or set_property(fapl.id, b"clear_status_flags", ctypes.byref(clear)) < 0):
        raise StoreError(f"{path} is marked open for writing by a process that no "
                         "longer runs, and featx cannot repair it with this HDF5 build; "
                         f"run `h5clear -s --increment {path}` (HDF5 tools), then retry")
    fid = h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDWR, fapl=fapl)
    try:
        # First past the file's end, so that every metadata object can be read ...
        if increment(fid.id, _EOA_MARGIN) < 0:
            raise StoreError(f"cannot repair {path}; run `h5clear -s --increment {path}`")
        # ... then past the end of every chunk the index points to.
        end = _allocated_end(h5py.File(fid))
        eoa = ctypes.c_uint64()
        get_eoa(fid.id, ctypes.byref(eoa))
        if end + _EOA_MARGIN > eoa.value:
            increment(fid.id, end + _EOA_MARGIN - max(eoa.value, path.stat().st_size))
    finally:
        fid.close()


def _allocated_end(h5: h5py.File) -> int:
    """The largest end address of any chunk of any chunked dataset at the root."""
    end = 0
    for name in h5:
        dataset = h5[name]
        if not isinstance(dataset, h5py.Dataset) or dataset.chunks is None:
            continue
        dsid = dataset.id
        if hasattr(dsid, "chunk_iter"):
            ends = []
            dsid.chunk_iter(lambda info: ends.append(info.byte_offset + info.size))
            end = max([end, *ends])
        else:
            for i in range(dsid.get_num_chunks()):
                info = dsid.get_chunk_info(i)
                end = max(end, info.byte_offset + info.size)
    return end


def clear_write_flags(path: str | os.PathLike) -> bool:
    """Clear the "open for writing" marks that a killed writer leaves in a store.

    Afterwards plain ``h5py.File(path, "r")`` and ``xarray.open_dataset`` open the
    file again. Like ``h5clear -s --increment PATH``, this also moves the file's
    end-of-allocation mark past everything the killed writer wrote (see
    ``_clear_status_flags``). Resuming the store does this by itself.

    Returns:
        True if there were marks to clear.

    Raises:
        StoreBusyError: a featx writer is still writing the store.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no store at {path}")
    lock = _WriterLock(path)
    lock.acquire()
    try:
        if not _write_flags_set(path):
            return False
        _clear_status_flags(path)
        log.info("cleared the write marks of %s", path)
        return True
    finally:
        lock.release()


# --------------------------------------------------------------------------- creation


def _write_structure(path: Path, layout: StoreLayout, provenance: dict[str, Any],
                     created: str) -> None:
    """Create every dimension, variable and attribute of a new store."""
    import h5netcdf

    n = layout.n_rows
    config = layout.featx_config()
    settings = {k: v for k, v in config.items() if k != STIMULI_KEY}
    with h5netcdf.File(path, "w", libver=LIBVER, locking="best-effort") as nc:
        nc.dimensions = {"stimulus": n}
        for stage, spec in layout.stages.items():
            nc.dimensions.update(dict(zip(layout.dimensions[stage], spec.shape)))

        # Per-row variables, written now, before SWMR (which cannot write strings).
        for name, values in layout.row_columns.items():
            dtype = h5py.string_dtype() if values.dtype == object else values.dtype
            var = nc.create_variable(name, ("stimulus",), dtype=dtype, data=values)
            if layout._column_dtypes[name] == "bool":
                var.attrs["dtype"] = "bool"
            if name in _COLUMN_TITLES:
                var.attrs["long_name"] = _COLUMN_TITLES[name]
        done = nc.create_variable(ROW_COMPLETE, ("stimulus",), dtype="u1",
                                  data=np.zeros(n, np.uint8))
        done.attrs["long_name"] = _COLUMN_TITLES[ROW_COMPLETE]

        # Stage variables: chunked, NaN-filled, allocated as rows arrive.
        dtype = STORAGE_DTYPES[layout.storage_dtype]
        filters = {}
        if layout.compression:
            filters = {"compression": layout.compression, "shuffle": True}
            if layout.compression == "gzip":
                filters["compression_opts"] = GZIP_LEVEL
        for stage, var_name in layout.variables.items():
            var = nc.create_variable(
                var_name, ("stimulus", *layout.dimensions[stage]), dtype=dtype,
                fillvalue=dtype.type(np.nan), chunks=layout.chunks(stage), **filters)
            var.attrs["featx_stage"] = stage

        # Root attributes: state first, readable entries, then the JSON records.
        nc.attrs["store_state"] = STATE_WRITING
        nc.attrs["featx_store_format"] = STORE_FORMAT
        nc.attrs["featx_version"] = _featx_version()
        nc.attrs["created"] = created
        for key, value in _flat_attrs(config, provenance).items():
            nc.attrs[key] = value
        nc.attrs["featx_config_sha256"] = _sha256_json(config)
        nc.attrs["featx_settings_sha256"] = _sha256_json(settings)
        nc.attrs["featx_config"] = _to_json(config)
        nc.attrs["featx_provenance"] = _to_json(provenance)


def _create(path: Path, layout: StoreLayout, *, replace: bool) -> None:
    """Build the store under a temporary name, then move it to ``path``."""
    created = _now()
    provenance = {**layout.attrs, "featx_store": {
        "format": STORE_FORMAT, "featx_version": _featx_version(), "created": created,
        "libraries": _libraries()}}
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        # left by a process killed while creating this store (we hold its lock)
        with contextlib.suppress(OSError):
            stale.unlink()
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        _write_structure(tmp, layout, provenance, created)
        _fsync_path(tmp)
        if replace:
            os.replace(tmp, path)
        else:
            _move_no_clobber(tmp, path)
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _move_no_clobber(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)  # fails if path appeared meanwhile
    except FileExistsError:
        raise StoreError(f"{path} was created by another process meanwhile") from None
    except OSError:  # no hard links on this file system
        if path.exists():
            raise StoreError(f"{path} was created by another process meanwhile") from None
        os.replace(tmp, path)


def _existing_header(path: Path) -> StoreHeader:
    """The header of a file that is about to be resumed or replaced."""
    try:
        return store_header(path)
    except StoreError as err:
        if "so it is not a featx store" in str(err):
            raise StoreError(f"{err}; to replace it pass overwrite=True (--overwrite), or "
                             "choose another path") from None
        raise
    except (OSError, KeyError, ValueError) as err:
        raise _not_featx(path, f"cannot be read as a featx store ({err})", replace_hint=True) from None


def _check_resumable(header: StoreHeader, layout: StoreLayout) -> None:
    differences = _diff(header.config, _plain(layout.featx_config(), "config"))
    path = header.path
    if differences:
        raise StoreMismatchError(
            f"{path} was written with different settings, so it cannot be "
            f"{'reused' if header.state == STATE_COMPLETE else 'resumed'} "
            f"(stored -> requested):\n{_difference_lines(differences)}\n"
            "Use --overwrite (overwrite=True) to start again, replacing it, or "
            "choose another store path.", differences)
    if header.state == STATE_COMPLETE:
        raise StoreCompleteError(
            f"{path} is already complete with these settings ({header.n_rows} rows); "
            "nothing to do. Use --overwrite (overwrite=True) to extract again.", path)
    if header.state != STATE_WRITING:
        raise StoreError(f"{path} has store_state {header.state!r}; expected "
                         f"{STATE_WRITING!r} or {STATE_COMPLETE!r}")


# --------------------------------------------------------------------------- writer


class StoreWriter:
    """Writes a store row batch by batch; crash-safe, resumable, readable meanwhile.

    Use :meth:`open`, not the constructor::

        with StoreWriter.open(path, layout) as writer:
            for rows in batches(writer.pending_rows()):
                writer.write_rows(rows, {stage: values, ...})
            writer.finish({"end_time": ...})

    Leaving the ``with`` block (or :meth:`close`) without :meth:`finish` leaves an
    unfinished store that the next :meth:`open` with the same layout resumes.
    :meth:`write_rows` may be called from one thread other than the opening one,
    one call at a time.
    """

    def __init__(self, path: Path, layout: StoreLayout, h5: h5py.File,
                 lock: _WriterLock, *, resumed: bool, durable: bool):
        self.path = path
        self.layout = layout
        self.resumed = resumed
        self.durable = durable
        self._h5: h5py.File | None = h5
        self._lock = lock
        self._complete = h5[ROW_COMPLETE][()].astype(bool)
        self._datasets = {s: h5[v] for s, v in layout.variables.items()}
        self._ids = layout.row_columns["stimulus"]
        self.is_complete = False

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        layout: StoreLayout,
        *,
        overwrite: bool = False,
        max_bytes: int | None = None,
        check_space: bool = True,
        durable: bool = True,
    ) -> StoreWriter:
        """Create a store, or resume an unfinished one with the same config.

        Args:
            path: the store file; missing parent folders are created.
            layout: what the store holds.
            overwrite: replace whatever is at ``path``. The new store is built under
                a temporary name in the same folder and then renamed over the old
                file, so the old file stays until the new one exists.
            max_bytes: refuse a new store whose estimated size exceeds this.
            check_space: refuse a new store that would not fit on the disk, with a
                margin (5% + 64 MiB).
            durable: fsync after the values and after the completion marks of each
                batch, so completed rows also survive a power loss, not only a
                killed process.

        Raises:
            StoreMismatchError: ``path`` is a featx store written with another
                config; names each differing setting.
            StoreCompleteError: ``path`` is complete with the same config.
            StoreSizeError: not enough room (new stores only).
            StoreBusyError: another process is writing ``path``.
            StoreError: ``path`` exists and is not a featx store.
        """
        path = Path(path)
        if not isinstance(layout, StoreLayout):
            raise TypeError(f"layout must be a StoreLayout, not {type(layout).__name__}")
        if path.is_dir():
            raise StoreError(f"{path} is a folder; give the store's file name")
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = _WriterLock(path)
        lock.acquire()
        h5 = None
        try:
            exists = path.exists()
            resumed = exists and not overwrite
            if resumed:
                try:
                    header = _existing_header(path)
                except StoreError:
                    if not _write_flags_set(path):
                        raise
                    # killed while finishing or resuming, outside SWMR mode
                    _clear_stale_flags(path)
                    header = _existing_header(path)
                _check_resumable(header, layout)
                _clear_stale_flags(path)
            else:
                check_room(path, layout, max_bytes=max_bytes, disk=check_space,
                           reclaimable=path.stat().st_size if exists else 0)
                if exists:
                    log.info("replacing %s", path)
                _create(path, layout, replace=exists)
            h5 = _open_write(path)
            if resumed:
                n_done = int(np.count_nonzero(h5[ROW_COMPLETE][()]))
                _record_resume(h5, layout, n_done)
                log.info("resuming %s: %d of %d rows complete", path, n_done,
                         layout.n_rows)
            else:
                log.info("created %s: %d rows, %d stages, about %s", path, layout.n_rows,
                         len(layout.stages), _human_bytes(layout.estimated_bytes()))
            h5.swmr_mode = True
            return cls(path, layout, h5, lock, resumed=resumed, durable=durable)
        except BaseException:
            if h5 is not None:
                h5.close()
            lock.release()
            raise

    def __repr__(self) -> str:
        state = "closed" if self._h5 is None else f"{self.n_complete}/{self.n_rows} rows"
        return f"<StoreWriter {self.path} ({state})>"

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def n_rows(self) -> int:
        return self.layout.n_rows

    @property
    def n_complete(self) -> int:
        """Rows written and marked complete."""
        return int(np.count_nonzero(self._complete))

    def pending_rows(self) -> np.ndarray:
        """Indices of the rows not yet complete, ascending (all rows of a new store)."""
        return np.flatnonzero(~self._complete)

    def write_rows(self, rows: Any, values: Mapping[str, Any]) -> None:
        """Write the values of ``rows`` for every stage, then mark the rows complete.

        Every stage is checked and converted first; nothing is written when any
        check fails. Then the values are written and flushed, then ``row_complete``
        is set for the rows and flushed. Rows already complete are unmarked first,
        then rewritten.

        Args:
            rows: 1-D integer array of distinct row indices, in any order.
            values: ``{stage: array of shape (len(rows), *stage shape)}`` for every
                stage of the layout (numpy arrays, or anything ``np.asarray``
                accepts, such as CPU torch tensors in float32/float16).

        Raises:
            ValueError, TypeError: wrong rows, missing/unknown stages, wrong shapes.
            StoreOverflowError: a finite value does not fit the storage dtype.
        """
        h5 = self._require_open()
        rows = self._check_rows(rows)
        order = None if np.all(rows[1:] > rows[:-1]) else np.argsort(rows)
        if order is not None:
            rows = rows[order]
        arrays = {stage: self._convert(stage, values, rows, order)
                  for stage in self._check_stages(values)}

        rewrite = rows[self._complete[rows]]
        if len(rewrite):
            self._mark(h5, rewrite, 0)
            self._complete[rewrite] = False
        for stage, array in arrays.items():
            dataset = self._datasets[stage]
            for start, stop, lo, hi in _runs(rows):
                dataset[start:stop] = array[lo:hi]
        self._sync(h5)
        self._mark(h5, rows, 1)
        self._complete[rows] = True

    def _mark(self, h5: h5py.File, rows: np.ndarray, value: int) -> None:
        dataset = h5[ROW_COMPLETE]
        for start, stop, _, _ in _runs(rows):
            dataset[start:stop] = value
        self._sync(h5)

    def _sync(self, h5: h5py.File) -> None:
        h5.flush()
        if self.durable:
            with contextlib.suppress(OSError, ValueError, TypeError):
                os.fsync(h5.id.get_vfd_handle())

    def _check_rows(self, rows: Any) -> np.ndarray:
        arr = np.asarray(rows)
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise TypeError(f"rows must be a 1-D integer array, not {arr.dtype} with "
                            f"shape {arr.shape}")
        if len(arr) == 0:
            raise ValueError("rows is empty")
        if arr.min() < 0 or arr.max() >= self.n_rows:
            raise ValueError(f"rows must lie in [0, {self.n_rows}); got {arr.min()} to "
                             f"{arr.max()}")
        if len(np.unique(arr)) != len(arr):
            raise ValueError("rows must be distinct")
        return arr.astype(np.int64)

    def _check_stages(self, values: Mapping[str, Any]) -> list[str]:
        missing = [s for s in self.layout.stages if s not in values]
        unknown = [s for s in values if s not in self.layout.stages]
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing {', '.join(map(repr, missing))}")
            if unknown:
                parts.append(f"unknown {', '.join(map(repr, unknown))}")
            raise ValueError(f"write_rows needs every stage of the store and no other "
                             f"({'; '.join(parts)}); the store's stages: "
                             f"{', '.join(map(repr, self.layout.stages))}")
        return list(self.layout.stages)

    def _convert(self, stage: str, values: Mapping[str, Any], rows: np.ndarray,
                 order: np.ndarray | None) -> np.ndarray:
        """``values[stage]`` checked, in ascending row order, in the storage dtype."""
        array = np.asarray(values[stage])
        expected = (len(rows), *self.layout.stages[stage].shape)
        if array.shape != expected:
            raise ValueError(f"stage {stage!r}: values have shape {array.shape}, "
                             f"expected {expected} (rows, *stage shape)")
        if array.dtype.kind not in "fiub":
            raise TypeError(f"stage {stage!r}: values have dtype {array.dtype}; give "
                            "real numbers")
        if order is not None:
            array = array[order]
        dtype = STORAGE_DTYPES[self.layout.storage_dtype]
        with np.errstate(over="ignore", invalid="ignore"):  # checked below
            out = np.ascontiguousarray(array, dtype=dtype)
        if array.dtype.kind == "f" and array.dtype.itemsize > dtype.itemsize:
            self._check_range(stage, array, out, rows)
        return out

    def _check_range(self, stage: str, array: np.ndarray, out: np.ndarray,
                     rows: np.ndarray) -> None:
        lost = ~np.isfinite(out) & np.isfinite(array)
        if not lost.any():
            return
        bad_rows = np.flatnonzero(lost.reshape(len(rows), -1).any(axis=1))
        ids = ", ".join(repr(str(self._ids[rows[i]])) for i in bad_rows[:3])
        largest = float(np.max(np.abs(array[np.isfinite(array)])))
        limit = float(np.finfo(out.dtype).max)
        raise StoreOverflowError(
            f"stage {stage!r}: {int(lost.sum())} value(s) in {len(bad_rows)} row(s) "
            f"(e.g. stimulus {ids}) exceed the {self.layout.storage_dtype} range "
            f"(|x| <= {limit:g}; largest here {largest:.6g}). Store {stage!r} as "
            "float32 (--storage-dtype float32). Nothing of this batch was written.")

    def finish(self, attrs: Mapping[str, Any] | None = None) -> None:
        """Mark the store complete; only now is ``store_state`` ``"complete"``.

        Closes the SWMR file, reopens it normally, adds ``attrs`` (JSON-able, e.g.
        ``{"end_time": ...}``) to ``featx_provenance`` and as root attributes, sets
        ``finished``, and writes ``store_state = "complete"`` last. The writer is
        closed afterwards.

        Raises:
            StoreError: some rows were never written (names how many and which).
        """
        h5 = self._require_open()
        pending = self.pending_rows()
        if len(pending):
            first = ", ".join(map(str, pending[:5]))
            raise StoreError(f"cannot finish {self.path}: {len(pending)} of "
                             f"{self.n_rows} rows are not written (rows {first}"
                             f"{', ...' if len(pending) > 5 else ''}); write them first")
        extra = _plain(dict(attrs or {}), "attrs")
        self._datasets.clear()
        h5.close()
        self._h5 = None
        finished = _now()
        with _open_write(self.path) as h5:
            provenance = json.loads(_decode_attr(h5.attrs["featx_provenance"]))
            provenance.update(extra)
            provenance.setdefault("featx_store", {})["finished"] = finished
            h5.attrs["featx_provenance"] = _to_json(provenance)
            h5.attrs["finished"] = finished
            for key, value in _flat_attrs(extra).items():
                h5.attrs[key] = value
            h5.flush()
            h5.attrs["store_state"] = STATE_COMPLETE
            h5.flush()
        if self.durable:
            _fsync_path(self.path)
        self.is_complete = True
        self._lock.release()
        log.info("finished %s", self.path)

    def close(self) -> None:
        """Flush and close; an unfinished store stays resumable. Idempotent."""
        if self._h5 is not None:
            self._datasets.clear()
            try:
                self._h5.flush()
            finally:
                self._h5.close()
                self._h5 = None
        self._lock.release()

    def _require_open(self) -> h5py.File:
        if self._h5 is None:
            raise StoreError(f"the writer of {self.path} is closed")
        return self._h5


def _open_write(path: Path) -> h5py.File:
    """Open for writing. HDF5's own file lock is not taken: the featx lock file keeps
    other writers out, and readers that hold the file open must not block resume or
    finish."""
    return h5py.File(path, "r+", libver=LIBVER, locking=False)


def _clear_stale_flags(path: Path) -> None:
    """Clear the write marks of a killed writer (call with the writer lock held)."""
    if _write_flags_set(path):
        log.warning("%s was not closed by its last writer (the process was killed?); "
                    "clearing its write marks", path)
        _clear_status_flags(path)


def _record_resume(h5: h5py.File, layout: StoreLayout, n_done: int) -> None:
    """Add this run's provenance to the store's list of resumes (before SWMR)."""
    provenance = json.loads(_decode_attr(h5.attrs["featx_provenance"]))
    provenance.setdefault("resumed", []).append(
        {"time": _now(), "rows_complete": n_done, "featx_version": _featx_version(),
         "attrs": layout.attrs})
    h5.attrs["featx_provenance"] = _to_json(provenance)
    h5.flush()


def _runs(rows: np.ndarray) -> Iterator[tuple[int, int, int, int]]:
    """Contiguous runs of sorted ``rows``: (first row, stop row, first index, stop)."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate(([0], breaks))
    stops = np.concatenate((breaks, [len(rows)]))
    for lo, hi in zip(starts.tolist(), stops.tolist()):
        yield int(rows[lo]), int(rows[hi - 1]) + 1, lo, hi


# --------------------------------------------------------------------------- merge


def merge_stores(paths: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                 overwrite: bool = False, max_bytes: int | None = None,
                 check_space: bool = True, block_bytes: int = 64 << 20) -> Path:
    """Concatenate complete stores of disjoint stimuli into one store.

    The inputs must have identical configs except their ``stimuli`` part (same
    model, weights, stages, preprocessing, storage, row columns). Rows keep the
    order given: all rows of the first input, then the second, ... The merged
    store's provenance lists each input with its own provenance
    (``featx_provenance["merged_from"]``). The merge is written like an extraction,
    so a killed merge resumes when called again with the same inputs.

    Args:
        paths: the input stores, in output order.
        out: the merged store; must not be one of the inputs.
        overwrite, max_bytes, check_space: as for :meth:`StoreWriter.open`.
        block_bytes: at most this many bytes of values are copied at a time.

    Returns:
        The path of the merged store.

    Raises:
        StoreError: an input is unfinished, or stimulus ids repeat across inputs.
        StoreMismatchError: an input's settings differ from the first input's.
    """
    paths = [Path(p) for p in paths]
    out = Path(out)
    if not paths:
        raise ValueError("merge_stores needs at least one input store")
    resolved = [p.resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        raise ValueError("merge_stores got the same input store twice")
    if out.resolve() in resolved:
        raise ValueError(f"the merged store {out} must not be one of the inputs")

    headers = [store_header(p) for p in paths]
    for h in headers:
        if not h.is_complete:
            raise StoreError(f"cannot merge {h.path}: it is unfinished ({h.n_complete} "
                             f"of {h.n_rows} rows, store_state {h.state!r}); resume it "
                             "to completion first")
    base = headers[0]
    for h in headers[1:]:
        differences = _diff(base.settings, h.settings)
        if differences:
            raise StoreMismatchError(
                f"cannot merge {h.path} with {base.path}: they were written with "
                f"different settings ({base.path.name} -> {h.path.name}):\n"
                f"{_difference_lines(differences)}\nOnly stores that differ in their "
                "stimuli can be merged.", differences)

    columns = _merged_columns(headers)
    stage_layout = base.config[LAYOUT_KEY]
    config = {k: v for k, v in base.settings.items() if k != LAYOUT_KEY}
    identity = _stimuli_identity(columns["stimulus"], columns["stimulus_sha256"])
    config[STIMULI_KEY] = {**identity, "parts": [h.config.get(STIMULI_KEY) for h in headers]}
    provenance = {
        "merged_from": [
            {"path": str(h.path.resolve()), "rows": h.n_rows,
             "featx_config_sha256": h.attrs.get("featx_config_sha256"),
             "stimuli": h.config.get(STIMULI_KEY), "provenance": h.provenance}
            for h in headers],
        "merge_inputs": ", ".join(str(p) for p in paths),
        "merge_time": _now(),
    }
    layout = StoreLayout(
        stages={name: StageSpec(tuple(s["shape"]), tuple(s["dims"]))
                for name, s in stage_layout["stages"].items()},
        n_rows=len(columns["stimulus"]), row_columns=columns, config=config,
        attrs=provenance, storage_dtype=stage_layout["storage_dtype"],
        compression=stage_layout["compression"])

    with StoreWriter.open(out, layout, overwrite=overwrite, max_bytes=max_bytes,
                          check_space=check_space) as writer:
        todo = np.zeros(layout.n_rows, bool)
        todo[writer.pending_rows()] = True
        row_bytes = max(1, layout.data_bytes() // layout.n_rows)
        block = max(1, block_bytes // row_bytes)
        offset = 0
        for h in headers:
            with _open_read(h.path) as src:
                for start in range(0, h.n_rows, block):
                    stop = min(start + block, h.n_rows)
                    need = todo[offset + start:offset + stop]
                    if not need.any():
                        continue
                    values = {name: src[info.variable][start:stop][need]
                              for name, info in h.stages.items()}
                    rows = np.arange(offset + start, offset + stop)[need]
                    writer.write_rows(rows, values)
            offset += h.n_rows
        writer.finish({"merge_end_time": _now()})
    log.info("merged %d stores into %s (%d rows)", len(paths), out, layout.n_rows)
    return out


def _merged_columns(headers: Sequence[StoreHeader]) -> dict[str, np.ndarray]:
    """The row columns of all inputs, concatenated; repeated stimulus ids refused."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in headers[0].row_columns}
    owner: dict[str, int] = {}
    repeated: list[tuple[str, int, int]] = []
    for i, h in enumerate(headers):
        with _open_read(h.path) as h5:
            for name in parts:
                values = h5[name][()]
                if values.dtype == object:
                    values = np.array([v.decode() if isinstance(v, bytes) else v
                                       for v in values], dtype=object)
                elif h5[name].attrs.get("dtype") == "bool":
                    values = values.astype(bool)
                parts[name].append(values)
        for stimulus_id in parts["stimulus"][-1]:
            if stimulus_id in owner:
                repeated.append((stimulus_id, owner[stimulus_id], i))
            else:
                owner[stimulus_id] = i
    if repeated:
        examples = "; ".join(f"{sid!r} in {headers[a].path.name} and "
                             f"{headers[b].path.name}" for sid, a, b in repeated[:3])
        raise StoreError(f"cannot merge: {len(repeated)} stimulus id(s) appear in more "
                         f"than one input ({examples}); merged stores need disjoint "
                         "stimulus sets")
    return {name: np.concatenate(p) for name, p in parts.items()}
