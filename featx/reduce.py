"""Reductions applied to each batch of activations before it is written.

A reduction turns one stage's activation ``(batch, *shape)`` into a smaller array and
is stored as its own variable, ``<stage>.<reduction>``, beside (or instead of) the full
activation. Every reduction is defined by a small settings dict that the store
records, so the same reduction can be applied to another stimulus set later:

* ``spatial-mean``: mean over the ``y`` and ``x`` axes (image maps).
* ``time-mean``: mean over the ``time`` axis (audio maps and waveforms), as the
  original fMRI analyses of the auditory models do.
* ``srp:DIM[:SEED]``: a seeded sparse random projection of the flattened activation
  to ``DIM`` features (Li, Hastie & Church 2006 "very sparse" projections, density
  ``1/sqrt(n_features)``, entries ``±sqrt(1/(density*DIM))``). The matrix depends only
  on the seed, the input size and ``DIM``, is generated column by column with numpy's
  PCG64 generator and is kept sparse, so it is never materialised densely.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

__all__ = ["Reduction", "parse_reductions", "sparse_projection"]

_SPATIAL = ("y", "x")
#: Largest sparse projection matrix featx builds (indices + values), in bytes.
_SRP_MATRIX_LIMIT = 2 << 30
_DIGITS = re.compile(r"[0-9]+")  # ASCII digits only: str.isdigit() accepts '²', which int() refuses


@dataclass(frozen=True)
class Reduction:
    """One reduction: ``kind`` is ``spatial-mean``, ``time-mean`` or ``srp``."""

    kind: str
    dim: int | None = None
    seed: int = 0

    @property
    def suffix(self) -> str:
        return {"spatial-mean": "spatial_mean", "time-mean": "time_mean", "srp": f"srp{self.dim}"}[self.kind]

    def settings(self) -> dict:
        out = {"kind": self.kind}
        if self.kind == "srp":
            out.update(dim=self.dim, seed=self.seed, density="1/sqrt(n_features)", generator="numpy PCG64")
        return out

    def applies_to(self, dims: tuple[str, ...]) -> bool:
        if self.kind == "spatial-mean":
            return all(d in dims for d in _SPATIAL)
        if self.kind == "time-mean":
            return "time" in dims
        return True

    def output(self, shape: tuple[int, ...], dims: tuple[str, ...]) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """Per-stimulus shape and dims after the reduction."""
        if self.kind == "srp":
            return (self.dim,), ("feature",)
        drop = _SPATIAL if self.kind == "spatial-mean" else ("time",)
        kept = [(s, d) for s, d in zip(shape, dims) if d not in drop]
        if not kept:
            return (1,), ("feature",)
        return tuple(s for s, _ in kept), tuple(d for _, d in kept)

    def check_size(self, stage: str, n_features: int) -> None:
        """Refuse a projection that is no reduction, or whose matrix would not fit."""
        if self.kind != "srp":
            return
        if self.dim >= n_features:
            raise ValueError(
                f"--reduce srp:{self.dim} on stage {stage!r}, which has only {n_features} features: "
                "a projection to as many features or more is no reduction; choose a smaller DIM "
                "or store the stage in full")
        nnz = self.dim * math.sqrt(n_features)
        if nnz * 20 > _SRP_MATRIX_LIMIT:
            raise ValueError(
                f"--reduce srp:{self.dim} on stage {stage!r} ({n_features} features) needs a sparse "
                f"matrix of about {nnz * 20 / 2**30:.1f} GiB; choose a smaller DIM (at most "
                f"{int(_SRP_MATRIX_LIMIT / 20 / math.sqrt(n_features))} for this stage)")

    def apply(self, batch: torch.Tensor, dims: tuple[str, ...]) -> torch.Tensor:
        """Reduce ``batch`` of shape ``(B, *shape)`` whose per-item axes are ``dims``."""
        if self.kind == "srp":
            flat = batch.reshape(len(batch), -1).to(torch.float32)
            matrix = sparse_projection(flat.shape[1], self.dim, self.seed).to(flat.device)
            return torch.sparse.mm(matrix, flat.T).T
        drop = _SPATIAL if self.kind == "spatial-mean" else ("time",)
        axes = tuple(1 + i for i, d in enumerate(dims) if d in drop)
        reduced = batch.to(torch.float32).mean(dim=axes)
        return reduced.reshape(len(batch), -1) if reduced.dim() == 1 else reduced


def parse_reductions(specs: list[str] | tuple[str, ...] | None) -> list[Reduction]:
    """Parse ``--reduce`` values such as ``spatial-mean``, ``time-mean``, ``srp:1000:7``."""
    if isinstance(specs, str):
        specs = [specs]
    out = []
    for spec in specs or ():
        for part in str(spec).split(","):
            part = part.strip()
            if not part:
                continue
            kind, *args = part.split(":")
            if kind in ("spatial-mean", "time-mean") and not args:
                out.append(Reduction(kind))
            elif kind == "srp" and 1 <= len(args) <= 2 and all(_DIGITS.fullmatch(a) for a in args) and int(args[0]) > 0:
                out.append(Reduction("srp", dim=int(args[0]), seed=int(args[1]) if len(args) == 2 else 0))
            else:
                raise ValueError(
                    f"--reduce {part!r} is not understood; use spatial-mean, time-mean or "
                    "srp:DIM[:SEED] (for example srp:1000:0)"
                )
    suffixes = [r.suffix for r in out]
    twice = sorted({s for s in suffixes if suffixes.count(s) > 1})
    if twice:
        raise ValueError(f"--reduce {specs!r} asks more than once for "
                         f"{', '.join(f'<stage>.{s}' for s in twice)}; give each reduction once "
                         "(srp:DIM once per DIM, whatever its seed)")
    return out


@lru_cache(maxsize=8)
def sparse_projection(n_features: int, dim: int, seed: int) -> torch.Tensor:
    """The ``(dim, n_features)`` sparse projection matrix for ``srp:dim:seed``.

    Row by row (output feature ``j``), the number of non-zero entries is drawn
    from Binomial(n_features, density), their positions without replacement and
    their signs uniformly, all from ``numpy.random.Generator(PCG64([seed, j]))``, so
    each row of the result depends only on ``(seed, j, n_features)``.
    """
    density = 1.0 / math.sqrt(n_features)
    scale = math.sqrt(1.0 / (density * dim))
    rows, cols, vals = [], [], []
    for j in range(dim):
        rng = np.random.Generator(np.random.PCG64([seed, j]))
        count = int(rng.binomial(n_features, density))
        picks = rng.choice(n_features, size=count, replace=False, shuffle=False)
        signs = rng.integers(0, 2, size=count) * 2 - 1
        rows.append(np.full(count, j, dtype=np.int64))
        cols.append(picks.astype(np.int64))
        vals.append(signs * scale)
    indices = torch.from_numpy(np.stack([np.concatenate(rows), np.concatenate(cols)]))
    values = torch.from_numpy(np.concatenate(vals).astype(np.float32))
    # check_invariants: a cheap check of the indices, and it keeps torch from warning that
    # the checks are off each time a matrix is built.
    return torch.sparse_coo_tensor(indices, values, (dim, n_features), check_invariants=True).coalesce()
