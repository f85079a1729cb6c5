"""Read published checkpoint files and load them strictly into featx models.

Three layouts occur among the published files:

``"state_dict"``
    A plain state dict (``{key: tensor}``), as torchvision writes them.
``"cornet"``
    A dict whose ``state_dict`` entry holds the network with every key prefixed by
    ``module.`` (the original training wrapped the network in ``DataParallel``). The keys
    are returned unchanged: featx's CORnet-S names its top-level child ``module``.
``"feather"``
    A dict written by the ``robustness`` fork used for Feather et al. (2023): its
    ``model`` entry holds the network under ``module.model.``, a duplicate of it under
    ``module.attacker.model.`` and the input normaliser's buffers under
    ``module.preproc.normalize.`` (and again under ``module.attacker.preproc.normalize.``).
    The network keys are returned with ``module.model.`` removed, the duplicates are
    checked against them, and the normaliser's mean and std are returned as
    ``Checkpoint.normalization``.

Files are read with ``torch.load(weights_only=True)``, which cannot run code. A file that
needs full unpickling is refused unless the caller passes ``trust=True`` (CLI:
``--trust-checkpoint``), because full unpickling can run arbitrary code.
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import pickle
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ._files import sha256_file

__all__ = [
    "LAYOUTS",
    "Checkpoint",
    "CheckpointError",
    "CheckpointWarning",
    "load_state",
    "read_checkpoint",
    "sha256_file",
]

logger = logging.getLogger(__name__)

LAYOUTS = ("state_dict", "cornet", "feather")

_FEATHER_NET = "model."
_FEATHER_ATTACKER_NET = "attacker.model."
_FEATHER_NORM = "preproc.normalize."
_FEATHER_ATTACKER_NORM = "attacker.preproc.normalize."
_LIST_LIMIT = 10


class CheckpointError(ValueError):
    """A checkpoint file cannot be read, or does not fit the model it is loaded into."""


class CheckpointWarning(UserWarning):
    """A checkpoint was loaded, but something in it is inconsistent."""


@dataclass
class Checkpoint:
    """The network tensors of one checkpoint file, and what is known about the file.

    Attributes:
        state_dict: network tensors, with the layout's prefixes removed.
        sha256: hex digest of the file.
        path: the file that was read.
        layout: ``"state_dict"``, ``"cornet"`` or ``"feather"``.
        normalization: ``{"mean": [...], "std": [...]}`` read from the file's normaliser
            buffers (Feather layout), else ``None``.
        extras: scalar entries stored beside the weights (e.g. ``epoch``).
    """

    state_dict: dict[str, torch.Tensor]
    sha256: str
    path: str
    layout: str
    normalization: dict | None = None
    extras: dict = field(default_factory=dict)


def read_checkpoint(
    path: str | os.PathLike, layout: str = "auto", trust: bool = False
) -> Checkpoint:
    """Read a checkpoint file and return its network tensors.

    Args:
        path: the checkpoint file.
        layout: ``"auto"`` (detect and log which), or one of :data:`LAYOUTS`.
        trust: allow full unpickling (``weights_only=False``). Full unpickling can run
            arbitrary code; pass ``True`` only for a file from a trusted source.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file cannot be read, needs full unpickling while
            ``trust`` is false, holds no weights, or does not have the requested layout.
    """
    path = os.fspath(path)
    if layout != "auto" and layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; expected 'auto' or one of {LAYOUTS}")
    if not os.path.isfile(path):
        raise FileNotFoundError(errno.ENOENT, "checkpoint file not found", path)

    sha256 = sha256_file(path)
    obj = _unpickle(path, trust)
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"checkpoint {path!r} holds a {type(obj).__name__}, not weights "
            "(expected a dict of tensors, or a dict with a 'state_dict' or 'model' entry)"
        )

    detected = layout if layout != "auto" else _detect_layout(obj, path)
    state, normalization, weights_key, problems = _EXTRACT[detected](obj, path)
    _check_tensors(state, path, detected)
    for problem in problems:
        logger.warning(problem)
        warnings.warn(problem, CheckpointWarning, stacklevel=2)
    extras = {
        key: value
        for key, value in obj.items()
        if key != weights_key and isinstance(value, (bool, int, float, str))
    }

    how = "detected" if layout == "auto" else "as requested"
    logger.info(
        "read checkpoint %s: layout %r (%s), %d tensors, sha256 %s",
        path, detected, how, len(state), sha256,
    )
    return Checkpoint(
        state_dict=state,
        sha256=sha256,
        path=path,
        layout=detected,
        normalization=normalization,
        extras=extras,
    )


def load_state(model: nn.Module, ckpt: Checkpoint) -> None:
    """Load ``ckpt`` into ``model`` strictly, or not at all.

    Every key of ``model.state_dict()`` must be in the checkpoint with the same shape,
    and the checkpoint may hold no other key. A model may list keys it tolerates being
    absent in an attribute ``featx_optional_keys`` (``fnmatch`` patterns such as
    ``"*.num_batches_tracked"``); those keep the model's own values, and a log line
    says so.

    Raises:
        CheckpointError: naming the missing, unexpected and wrong-shape keys; the model
            is left unchanged.
    """
    own = model.state_dict()
    given = ckpt.state_dict
    optional = tuple(getattr(model, "featx_optional_keys", ()))

    absent = [key for key in own if key not in given]
    filled = [key for key in absent if any(fnmatch.fnmatchcase(key, p) for p in optional)]
    missing = [key for key in absent if key not in filled]
    unexpected = [key for key in given if key not in own]
    wrong_shape = [
        f"{key} (file {list(given[key].shape)}, model {list(own[key].shape)})"
        for key in own
        if key in given and given[key].shape != own[key].shape
    ]
    if missing or unexpected or wrong_shape:
        parts = [
            _describe(missing, "missing key"),
            _describe(unexpected, "unexpected key"),
            _describe(wrong_shape, "wrong-shape key"),
        ]
        raise CheckpointError(
            f"checkpoint {ckpt.path!r} (layout {ckpt.layout!r}) does not fit "
            f"{type(model).__name__}; nothing was loaded. "
            + "; ".join(part for part in parts if part)
        )

    state = dict(given)
    for key in filled:
        state[key] = own[key]
    model.load_state_dict(state, strict=True)
    if filled:
        logger.info(
            "checkpoint %s lacks %d tolerated key(s); kept the model's own values: %s",
            ckpt.path, len(filled), _head(filled),
        )


# ---------------------------------------------------------------------------------------
# reading


def _unpickle(path: str, trust: bool):
    """torch.load the file, weights-only unless trusted."""
    with open(path, "rb") as f:
        start = f.read(2)
    # torch.save writes a zip archive ("PK"); legacy files and plain pickles of
    # protocol >= 2 start with the PROTO opcode 0x80
    if not (start == b"PK" or start[:1] == b"\x80"):
        raise CheckpointError(
            f"checkpoint {path!r} is not a PyTorch file (neither a zip archive nor a pickle)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust:
            raise CheckpointError(
                f"checkpoint {path!r} cannot be read with weights-only unpickling: it "
                "needs full unpickling, which can run arbitrary code. Do that only for a "
                "file from a trusted source, by passing trust=True (CLI: "
                "--trust-checkpoint). The published Feather files were written with "
                "'dill', so they may need this and may need 'dill' installed. "
                f"(weights-only loader: {_weights_only_reason(exc)})"
            ) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, ... for non-checkpoints
        raise CheckpointError(
            f"checkpoint {path!r} is not a readable PyTorch file: {_first_line(exc)}"
        ) from None

    logger.warning(
        "fully unpickling trusted checkpoint %s (weights_only=False; this can run code)", path
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as exc:
        hint = " (install it with 'pip install dill')" if exc.name and exc.name.startswith("dill") else ""
        raise CheckpointError(
            f"checkpoint {path!r} needs the module {exc.name!r} to unpickle{hint}"
        ) from None
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path!r} could not be unpickled: {_first_line(exc)}"
        ) from None


def _detect_layout(obj: Mapping, path: str) -> str:
    model = obj.get("model")
    if isinstance(model, Mapping) and any(
        _strip_module(str(key)).startswith((_FEATHER_NET, _FEATHER_ATTACKER_NET)) for key in model
    ):
        return "feather"
    if isinstance(obj.get("state_dict"), Mapping):
        return "cornet"
    if obj and all(isinstance(value, torch.Tensor) for value in obj.values()):
        return "state_dict"
    raise CheckpointError(
        f"checkpoint {path!r} holds no weights in a known layout: expected a dict of "
        "tensors, a dict with a 'state_dict' entry, or a dict with a 'model' entry holding "
        f"'module.model.*' keys; its top-level keys are {_head(map(str, obj))}"
    )


def _extract_state_dict(obj: Mapping, path: str):
    return dict(obj), None, None, []


def _extract_cornet(obj: Mapping, path: str):
    state = obj.get("state_dict")
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"checkpoint {path!r} has no 'state_dict' entry holding a dict, so it is not in "
            f"the 'cornet' layout; its top-level keys are {_head(map(str, obj))}"
        )
    if not all(str(key).startswith("module.") for key in state):
        logger.warning("checkpoint %s: 'cornet' layout keys without the 'module.' prefix", path)
    return dict(state), None, "state_dict", []


def _extract_feather(obj: Mapping, path: str):
    weights_key = next((k for k in ("model", "state_dict") if isinstance(obj.get(k), Mapping)), None)
    raw = obj[weights_key] if weights_key else obj
    groups: dict[str, dict] = {
        _FEATHER_NET: {}, _FEATHER_ATTACKER_NET: {}, _FEATHER_NORM: {}, _FEATHER_ATTACKER_NORM: {}
    }
    # longest prefixes first: "attacker.model." before "model."
    prefixes = sorted(groups, key=len, reverse=True)
    other = []
    for key, value in raw.items():
        name = _strip_module(str(key))
        for prefix in prefixes:
            if name.startswith(prefix):
                groups[prefix][name[len(prefix):]] = value
                break
        else:
            other.append(str(key))

    net = groups[_FEATHER_NET]
    if not net:
        raise CheckpointError(
            f"checkpoint {path!r} holds no 'module.model.*' keys, so it is not in the "
            f"'feather' layout; its keys start {_head(map(str, raw))}"
        )
    problems = []
    if other:
        problems.append(f"checkpoint {path!r}: ignored {len(other)} key(s) outside the "
                        f"network and normaliser: {_head(other)}")
    problems += _compare_copies(net, groups[_FEATHER_ATTACKER_NET], path, "module.attacker.model.")
    problems += _compare_copies(groups[_FEATHER_NORM], groups[_FEATHER_ATTACKER_NORM], path,
                                "module.attacker.preproc.normalize.")

    norm = groups[_FEATHER_NORM]
    normalization = None
    if "new_mean" in norm and "new_std" in norm:
        normalization = {"mean": _as_floats(norm["new_mean"]), "std": _as_floats(norm["new_std"])}
    return net, normalization, weights_key, problems


_EXTRACT = {
    "state_dict": _extract_state_dict,
    "cornet": _extract_cornet,
    "feather": _extract_feather,
}


def _compare_copies(main: dict, copy: dict, path: str, copy_prefix: str) -> list[str]:
    """Describe where the attacker's duplicate differs from the network's own tensors."""
    if not copy:
        return []
    differ = [
        key for key, value in copy.items()
        if key not in main
        or not isinstance(value, torch.Tensor)
        or value.shape != main[key].shape
        or not torch.equal(value, main[key])
    ]
    differ += [key for key in main if key not in copy]
    if not differ:
        return []
    return [f"checkpoint {path!r}: the copy under {copy_prefix!r} differs from the "
            f"network's own tensors at {len(differ)} key(s): {_head(differ)}; "
            "using the network's own"]


def _check_tensors(state: Mapping, path: str, layout: str) -> None:
    if not state:
        raise CheckpointError(f"checkpoint {path!r} (layout {layout!r}) holds no tensors")
    bad = [str(key) for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"checkpoint {path!r} (layout {layout!r}) is not all weights: {len(bad)} "
            f"entr{'y is' if len(bad) == 1 else 'ies are'} not tensors: {_head(bad)}"
        )


# ---------------------------------------------------------------------------------------
# small helpers


def _as_floats(value) -> list[float]:
    """A normaliser buffer as Python floats, float32 values at their shortest repr."""
    array = torch.as_tensor(value).detach().flatten().cpu().numpy()
    if array.dtype == np.float32:
        return [float(str(v)) for v in array]
    return [float(v) for v in array]


def _strip_module(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key


def _head(items: Iterable[str], limit: int = _LIST_LIMIT) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _describe(keys: list[str], noun: str) -> str:
    if not keys:
        return ""
    return f"{len(keys)} {noun}{'' if len(keys) == 1 else 's'}: {_head(keys)}"


def _weights_only_reason(exc: BaseException) -> str:
    """The informative part of torch's long weights-only error message."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        reason = text.split(marker, 1)[1].strip().split("\n")[0].strip()
        return reason.split(". Please use")[0]
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
