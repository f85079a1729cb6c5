"""A forward-hook extractor that works on any ``torch.nn.Module``.

Stages are addressed by module path (``features.1``, ``module.V4.conv2``); registry
models map the documents' stage names onto such paths. The extractor reads each
module's *output*, copies it at once, and can stop the forward pass as soon as the
last requested activation is in hand.
"""

from __future__ import annotations

import difflib
import logging
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

__all__ = ["Extractor", "INPUT", "list_modules"]

log = logging.getLogger(__name__)

#: Module path that stands for the model's input, exactly as passed to the extractor.
INPUT = ""


class _StopForward(Exception):
    """Raised inside a hook once every requested activation has been captured."""


def list_modules(model: nn.Module) -> list[tuple[str, str]]:
    """Every module path of ``model`` with its class name, in registration order.

    These are the paths :class:`Extractor` accepts (``""`` is the model input).
    """
    return [(path, type(module).__name__) for path, module in model.named_modules() if path]


class Extractor:
    """Capture the outputs of named modules while a model runs on a batch.

    Args:
        model: any ``torch.nn.Module``. For a model from :func:`featx.load_model`,
            ``stages`` may be a list of the registry's stage names.
        stages: a list of registry stage names, or a mapping ``{stage name: module
            path}``. Module path ``""`` captures the model input itself.
        stop_early: end the forward pass once every requested activation has been
            captured (the deepest stage reached), skipping the rest of the network.

    Calling the extractor on a batch returns ``{stage: tensor}``: copies made at
    capture time (so a later in-place operation such as torchvision's
    ``ReLU(inplace=True)`` cannot change them), on the model's device. The model runs
    in eval mode under ``torch.inference_mode()``; the train/eval mode of every
    submodule is restored afterwards.

    A module that runs more than once in one forward pass (a recurrent block, a
    module reused at several positions) yields one activation per call, named
    ``stage@t0``, ``stage@t1``, ... in call order; :attr:`output_names` lists the
    names after the first batch.

    Known limits of forward hooks, which apply here:

    * Only module outputs are visible. Functional calls (``torch.nn.functional.relu``,
      ``x + y``, ``torch.flatten``) have no module, so their results cannot be
      addressed; hook the module that produces the value, or wrap the operation in
      a module.
    * A module's output must be a tensor whose first axis is the batch; modules that
      return tuples or sequence-first tensors are refused with an error naming them.
    * Early stopping learns how often each module runs from the first batch (which
      runs the whole network) and assumes later batches run the same modules the same
      number of times. For models whose control flow depends on the data, pass
      ``stop_early=False``.
    """

    def __init__(
        self,
        model: nn.Module,
        stages: Sequence[str] | Mapping[str, str],
        *,
        stop_early: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.stage_paths = _resolve_stages(model, stages)
        self.stop_early = stop_early
        self._calls: dict[str, int] | None = None  # module path -> calls per forward

    @property
    def output_names(self) -> list[str]:
        """Names of the activations a call returns (known after the first batch)."""
        if self._calls is None:
            raise RuntimeError("output names are known after the first batch; call the extractor once")
        names = []
        for stage, path in self.stage_paths.items():
            n = 1 if path == INPUT else self._calls[path]
            names.extend([stage] if n == 1 else [f"{stage}@t{i}" for i in range(n)])
        return names

    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        if not isinstance(batch, torch.Tensor):
            raise TypeError(f"the extractor takes a torch.Tensor batch, got {type(batch).__name__}; "
                            "convert with torch.as_tensor(...)")
        captured: dict[str, list[torch.Tensor]] = {p: [] for p in set(self.stage_paths.values()) if p}
        handles = [
            self.model.get_submodule(path).register_forward_hook(self._hook(path, captured, len(batch)))
            for path in captured
        ]
        modes = {module: module.training for module in self.model.modules()}
        try:
            self.model.eval()
            with torch.inference_mode():
                try:
                    if captured:  # nothing to run for when only the input is requested
                        self.model(batch)
                except _StopForward:
                    pass
        finally:
            for handle in handles:
                handle.remove()
            for module, mode in modes.items():
                module.training = mode

        if self._calls is None:
            self._calls = {path: len(outs) for path, outs in captured.items()}
            self._report_calls()
        return self._name_outputs(batch, captured)

    def _hook(self, path: str, captured: dict[str, list[torch.Tensor]], batch_size: int):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if not isinstance(output, torch.Tensor):
                raise TypeError(
                    f"module {path!r} ({type(module).__name__}) returned {type(output).__name__}, "
                    "not a tensor; choose a submodule that outputs a tensor (see featx.list_modules)"
                )
            if output.dim() == 0 or output.shape[0] != batch_size:
                raise ValueError(
                    f"module {path!r} returned shape {tuple(output.shape)} whose first axis is not "
                    f"the batch ({batch_size}); sequence-first or batch-merging modules cannot be "
                    "stored per stimulus"
                )
            captured[path].append(output.detach().clone())
            if self.stop_early and self._calls is not None and self._all_captured(captured):
                raise _StopForward

        return hook

    def _all_captured(self, captured: dict[str, list[torch.Tensor]]) -> bool:
        return all(len(outs) >= self._calls[path] for path, outs in captured.items())

    def _report_calls(self) -> None:
        for path, n in self._calls.items():
            if n == 0:
                stages = [s for s, p in self.stage_paths.items() if p == path]
                raise RuntimeError(
                    f"module {path!r} (stage {', '.join(stages)}) never ran during the forward "
                    "pass; it is defined but unused, or only reached through a functional call"
                )
            if n > 1:
                log.info("module %r runs %d times per forward pass; activations are named @t0..@t%d",
                         path, n, n - 1)

    def _name_outputs(
        self, batch: torch.Tensor, captured: dict[str, list[torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for stage, path in self.stage_paths.items():
            if path == INPUT:
                out[stage] = batch.detach().clone()
                continue
            outs = captured[path]
            if len(outs) != self._calls[path]:
                raise RuntimeError(
                    f"module {path!r} ran {len(outs)} times in this batch but {self._calls[path]} "
                    "times in the first; this model's control flow depends on its input, so "
                    "create the Extractor with stop_early=False"
                )
            if len(outs) == 1:
                out[stage] = outs[0]
            else:
                out.update({f"{stage}@t{i}": t for i, t in enumerate(outs)})
        return out


def _resolve_stages(model: nn.Module, stages: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """Turn the ``stages`` argument into ``{stage name: module path}``, checking both."""
    if isinstance(stages, str):
        raise TypeError(f"stages must be a list or a mapping, not the string {stages!r}")
    if isinstance(stages, Mapping):
        paths = dict(stages)
    else:
        entry = getattr(model, "featx_entry", None)
        if entry is None:
            raise TypeError(
                "stage names need a model from featx.load_model; for any other module pass a "
                "mapping {stage name: module path} (featx.list_modules(model) lists the paths)"
            )
        paths = {}
        for name in stages:
            stage = entry.stage(name)  # KeyError with close matches for unknown names
            paths[stage.name] = stage.module
    if not paths:
        raise ValueError("no stages requested")
    known = {path for path, _ in model.named_modules()}
    for stage, path in paths.items():
        if path not in known:
            raise KeyError(_unknown_path_message(stage, path, known))
    return paths


def _unknown_path_message(stage: str, path: str, known: Iterable[str]) -> str:
    known = sorted(p for p in known if p)
    close = difflib.get_close_matches(path, known, n=5, cutoff=0.5)
    hint = f" Closest module paths: {', '.join(map(repr, close))}." if close else ""
    shown = ", ".join(known[:30]) + (", ..." if len(known) > 30 else "")
    return (
        f"stage {stage!r}: the model has no module at path {path!r}.{hint} "
        f"Module paths: {shown} (featx.list_modules(model) lists them all)."
    )
