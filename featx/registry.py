"""The model registry: one TOML file per model, loaded into validated records.

Each file under ``registry/`` (shipped in the package as ``featx.registry_data``)
names a model's builder, its input contract, its published weights and its stage
table. The records here are the only way the rest of featx reads those files, so a
malformed entry fails once, at load time, with the file and field named.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

__all__ = [
    "InputContract",
    "ModelEntry",
    "RegistryError",
    "Stage",
    "Weights",
    "get_entry",
    "list_models",
    "registry_dir",
]

MODALITIES = ("image", "audio")
LAYOUTS = ("state_dict", "cornet", "feather")
DIM_NAMES = ("channel", "y", "x", "frequency", "time", "feature")


class RegistryError(ValueError):
    """A registry file is malformed; the message names the file and the field."""


@dataclass(frozen=True)
class Stage:
    """A named point in a model: the output of ``module`` (``""``: the model input)."""

    name: str
    module: str
    shape: tuple[int, ...]
    features: int
    dims: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    note: str = ""


@dataclass(frozen=True)
class InputContract:
    """What a model expects as input, and how featx prepares stimuli for it.

    Image contracts use ``size``, ``resize`` and ``crop``; audio contracts use
    ``sample_rate``, ``duration``, ``demean`` and ``rms``. ``mean`` and ``std`` are
    applied inside the module that :func:`featx.load_model` returns, after clamping
    to ``value_range``.
    """

    kind: str
    value_range: tuple[float, float]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: int | None = None
    resize: int | None = None
    crop: str | None = None
    sample_rate: int | None = None
    duration: float | None = None
    demean: bool = False
    rms: float | None = None

    @property
    def n_samples(self) -> int:
        """Samples per audio stimulus (``sample_rate * duration``)."""
        if self.kind != "audio":
            raise AttributeError("n_samples is defined for audio contracts only")
        return int(round(self.sample_rate * self.duration))


@dataclass(frozen=True)
class Weights:
    """Where a model's published weights come from."""

    file: str
    url: str
    layout: str
    sha256: str = ""
    note: str = ""


@dataclass(frozen=True)
class ModelEntry:
    """One registered model, as read from its TOML file."""

    name: str
    title: str
    modality: str
    builder: str
    reference: str
    input: InputContract
    weights: Weights
    stages: tuple[Stage, ...]
    options: dict[str, Any] = field(default_factory=dict)
    path: str = ""
    sha256: str = ""

    @property
    def stage_names(self) -> list[str]:
        return [stage.name for stage in self.stages]

    def stage(self, name: str) -> Stage:
        """Return the stage called ``name`` (or one of its aliases)."""
        for stage in self.stages:
            if name == stage.name or name in stage.aliases:
                return stage
        known = self.stage_names + [a for s in self.stages for a in s.aliases]
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise KeyError(
            f"model {self.name!r} has no stage {name!r}.{hint} Its stages are: "
            f"{', '.join(self.stage_names)} (see `featx stages {self.name}`)."
        )

    def load_builder(self) -> Callable[..., Any]:
        module_name, _, attr = self.builder.partition(":")
        return getattr(importlib.import_module(module_name), attr)


def registry_dir() -> Path:
    """The folder holding the registry files (the checkout's, else the installed copy)."""
    checkout = Path(__file__).resolve().parent.parent / "registry"
    if checkout.is_dir():
        return checkout
    from importlib.resources import files

    return Path(str(files("featx.registry_data")))


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_load_all())


def get_entry(name: str) -> ModelEntry:
    """Return the registry entry of model ``name``."""
    entries = _load_all()
    if name not in entries:
        close = difflib.get_close_matches(name, list(entries), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise KeyError(
            f"unknown model {name!r}.{hint} Registered models: "
            f"{', '.join(sorted(entries))} (see `featx models`)."
        )
    return entries[name]


@lru_cache(maxsize=1)
def _load_all() -> dict[str, ModelEntry]:
    entries = {}
    for path in sorted(registry_dir().glob("*.toml")):
        entry = load_entry_file(path)
        if entry.name in entries:
            raise RegistryError(f"{path}: model name {entry.name!r} is registered twice")
        entries[entry.name] = entry
    return entries


def load_entry_file(path: str | Path) -> ModelEntry:
    """Read and validate one registry file."""
    path = Path(path)
    raw_bytes = path.read_bytes()
    try:
        raw = tomllib.loads(raw_bytes.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise RegistryError(f"{path}: not valid TOML: {err}") from None
    fields = _Fields(path, raw)
    name = fields.text("name")
    if name != path.stem:
        raise RegistryError(f"{path}: field 'name' is {name!r} but must equal the file stem {path.stem!r}")
    modality = fields.choice("modality", MODALITIES)
    contract = _parse_input(fields.sub("input"), modality)
    weights = _parse_weights(fields.sub("weights"))
    stage_tables = fields.table_list("stages")
    stages = tuple(_parse_stage(fields.item("stages", i, t)) for i, t in enumerate(stage_tables))
    _check_unique_stages(path, stages)
    builder = fields.text("builder")
    if ":" not in builder:
        raise RegistryError(f"{path}: field 'builder' must be 'module:function', got {builder!r}")
    return ModelEntry(
        name=name,
        title=fields.text("title"),
        modality=modality,
        builder=builder,
        reference=fields.text("reference", default=""),
        input=contract,
        weights=weights,
        stages=stages,
        options=dict(raw.get("options", {})),
        path=str(path),
        sha256=hashlib.sha256(raw_bytes).hexdigest(),
    )


def _parse_input(f: "_Fields", modality: str) -> InputContract:
    kind = f.choice("kind", MODALITIES)
    if kind != modality:
        raise RegistryError(f"{f.where('kind')}: input kind {kind!r} differs from modality {modality!r}")
    common = dict(
        kind=kind,
        value_range=tuple(f.numbers("value_range", length=2)),
        mean=tuple(f.numbers("mean")),
        std=tuple(f.numbers("std")),
    )
    if len(common["mean"]) != len(common["std"]):
        raise RegistryError(f"{f.where('std')}: mean and std must have the same length")
    if kind == "image":
        crop = f.choice("crop", ("center",))
        return InputContract(**common, size=f.integer("size"), resize=f.integer("resize"), crop=crop)
    return InputContract(
        **common,
        sample_rate=f.integer("sample_rate"),
        duration=f.number("duration"),
        demean=f.boolean("demean"),
        rms=f.number("rms"),
    )


def _parse_weights(f: "_Fields") -> Weights:
    return Weights(
        file=f.text("file"),
        url=f.text("url", default=""),
        layout=f.choice("layout", LAYOUTS),
        sha256=f.text("sha256", default=""),
        note=f.text("note", default=""),
    )


def _parse_stage(f: "_Fields") -> Stage:
    shape = tuple(f.integers("shape"))
    dims = tuple(f.texts("dims"))
    features = f.integer("features")
    product = 1
    for d in shape:
        product *= d
    if product != features:
        raise RegistryError(f"{f.where('features')}: {features} != product of shape {list(shape)} = {product}")
    if len(dims) != len(shape):
        raise RegistryError(f"{f.where('dims')}: {len(dims)} dims for a {len(shape)}-d shape {list(shape)}")
    for dim in dims:
        if dim not in DIM_NAMES:
            raise RegistryError(f"{f.where('dims')}: unknown dim {dim!r}; use one of {', '.join(DIM_NAMES)}")
    return Stage(
        name=f.text("name"),
        module=f.text("module", allow_empty=True),
        shape=shape,
        features=features,
        dims=dims,
        aliases=tuple(f.texts("aliases", default=[])),
        note=f.text("note", default=""),
    )


def _check_unique_stages(path: Path, stages: tuple[Stage, ...]) -> None:
    seen: set[str] = set()
    for stage in stages:
        for label in (stage.name, *stage.aliases):
            if label in seen:
                raise RegistryError(f"{path}: stage name or alias {label!r} appears twice")
            seen.add(label)


class _Fields:
    """Typed access to one TOML table, with errors naming file and field."""

    def __init__(self, path: Path, table: dict, prefix: str = ""):
        self.path, self.table, self.prefix = path, table, prefix

    def where(self, key: str) -> str:
        return f"{self.path}: field '{self.prefix}{key}'"

    def _get(self, key: str, default: Any = ...) -> Any:
        if key not in self.table:
            if default is ...:
                raise RegistryError(f"{self.where(key)} is missing")
            return default
        return self.table[key]

    def _typed(self, key: str, kinds: tuple[type, ...], label: str, default: Any = ...) -> Any:
        value = self._get(key, default)
        if value is default and default is not ...:
            return value
        if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
            raise RegistryError(f"{self.where(key)} must be {label}, got {value!r}")
        return value

    def text(self, key: str, default: Any = ..., allow_empty: bool = False) -> str:
        value = self._typed(key, (str,), "a string", default)
        if value == "" and default is ... and not allow_empty:
            raise RegistryError(f"{self.where(key)} must not be empty")
        return value

    def integer(self, key: str) -> int:
        value = self._typed(key, (int,), "an integer")
        if value <= 0:
            raise RegistryError(f"{self.where(key)} must be positive, got {value!r}")
        return value

    def number(self, key: str) -> float:
        return float(self._typed(key, (int, float), "a number"))

    def boolean(self, key: str) -> bool:
        return self._typed(key, (bool,), "true or false")

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        value = self.text(key)
        if value not in choices:
            raise RegistryError(f"{self.where(key)} must be one of {', '.join(choices)}; got {value!r}")
        return value

    def _list(self, key: str, kinds: tuple[type, ...], label: str, default: Any = ...) -> list:
        value = self._get(key, default)
        if not isinstance(value, list) or not all(
            isinstance(v, kinds) and not isinstance(v, bool) for v in value
        ):
            raise RegistryError(f"{self.where(key)} must be a list of {label}, got {value!r}")
        return value

    def numbers(self, key: str, length: int | None = None) -> list[float]:
        value = [float(v) for v in self._list(key, (int, float), "numbers")]
        if length is not None and len(value) != length:
            raise RegistryError(f"{self.where(key)} must have {length} entries, got {value!r}")
        return value

    def integers(self, key: str) -> list[int]:
        return self._list(key, (int,), "integers")

    def texts(self, key: str, default: Any = ...) -> list[str]:
        return self._list(key, (str,), "strings", default)

    def sub(self, key: str) -> "_Fields":
        value = self._get(key)
        if not isinstance(value, dict):
            raise RegistryError(f"{self.where(key)} must be a table [{key}]")
        return _Fields(self.path, value, f"{self.prefix}{key}.")

    def table_list(self, key: str) -> list[dict]:
        value = self._get(key)
        if not isinstance(value, list) or not value or not all(isinstance(v, dict) for v in value):
            raise RegistryError(f"{self.where(key)} must be a non-empty array of tables [[{key}]]")
        return value

    def item(self, key: str, index: int, table: dict) -> "_Fields":
        return _Fields(self.path, table, f"{self.prefix}{key}[{index}].")
