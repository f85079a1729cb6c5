"""Model construction: registry entry + weights + input contract -> ready module."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from ..registry import ModelEntry, get_entry
from ..weights import resolve_weights
from ._input import attach_input_normalization

__all__ = ["load_model"]

log = logging.getLogger(__name__)


def load_model(
    name: str,
    weights: str | os.PathLike | None = None,
    *,
    trust_checkpoint: bool = False,
    **options: Any,
) -> nn.Module:
    """Build registry model ``name`` with its weights and its input contract.

    Args:
        name: a registry name (``featx.list_models()``).
        weights: a checkpoint path; ``"random"`` (or ``"random:SEED"``) for seeded
            random initialisation; ``None`` to look for the published file in the
            weights cache (``$FEATX_WEIGHTS``).
        trust_checkpoint: allow full unpickling for checkpoints that cannot be read
            with ``torch.load(weights_only=True)``. Only for files you trust.
        **options: model options declared in the registry entry (``[options]``).

    Returns:
        The network in eval mode. It takes a batch in the model's natural input range
        (RGB in [0, 1] for images, the waveform for sounds) and clamps and normalises
        it itself. ``model.featx_entry``, ``model.featx_weights`` and
        ``model.featx_options`` record what was loaded.
    """
    entry = get_entry(name)
    options = _merge_options(entry, options)
    choice = resolve_weights(entry, weights)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(choice.seed if choice.is_random else 0)
        model = entry.load_builder()(**options)

    if choice.is_random:
        log.warning("model %r runs with RANDOM weights (seed %d), not trained ones", name, choice.seed)
        record = {"source": "random", "seed": choice.seed}
        normalization = None
    else:
        record, normalization = _load_checkpoint(entry, model, choice.path, trust_checkpoint)

    mean, std = list(entry.input.mean), list(entry.input.std)
    if normalization is not None:
        if _differs(normalization["mean"], mean) or _differs(normalization["std"], std):
            log.warning("checkpoint normalisation mean=%s std=%s differs from the registry's "
                        "mean=%s std=%s; using the checkpoint's", normalization["mean"],
                        normalization["std"], mean, std)
        mean, std = normalization["mean"], normalization["std"]
    attach_input_normalization(model, entry.input.value_range, mean, std)
    record["input_mean"], record["input_std"] = list(map(float, mean)), list(map(float, std))

    model.eval()
    model.featx_entry = entry
    model.featx_weights = record
    model.featx_options = options
    return model


def _merge_options(entry: ModelEntry, options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        allowed = ", ".join(f"{k}={v!r}" for k, v in entry.options.items()) or "none"
        raise ValueError(f"model {entry.name!r} has no option {', '.join(map(repr, unknown))}; "
                         f"its options (with defaults) are: {allowed}")
    merged = dict(entry.options)
    for key, value in options.items():
        default = entry.options[key]
        if type(value) is not type(default) and not (isinstance(default, float) and isinstance(value, int)):
            raise TypeError(f"model option {key}={value!r}: expected a {type(default).__name__} "
                            f"like the default {default!r}")
        merged[key] = value
    return merged


def _load_checkpoint(entry: ModelEntry, model: nn.Module, path, trust: bool):
    from ..checkpoints import load_state, read_checkpoint

    log.info("loading weights for %r from %s", entry.name, path)
    ckpt = read_checkpoint(path, layout=entry.weights.layout, trust=trust)
    published = entry.weights.sha256
    if published and not ckpt.sha256.startswith(published):
        log.warning("%s has sha256 %s, not the published %s...: it is not the published %s",
                    path, ckpt.sha256[:16], published, entry.weights.file)
    load_state(model, ckpt)
    record = {"source": "file", "path": str(os.path.abspath(path)), "sha256": ckpt.sha256,
              "layout": ckpt.layout, "published_file": entry.weights.file,
              "matches_published_sha256": bool(published) and ckpt.sha256.startswith(published)}
    return record, ckpt.normalization


def _differs(a, b) -> bool:
    a, b = [float(v) for v in a], [float(v) for v in b]
    return len(a) != len(b) or any(abs(x - y) > 1e-6 for x, y in zip(a, b))
