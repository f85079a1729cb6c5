"""Finding a model's weights: an explicit file, the weights cache, or random init."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .registry import ModelEntry

__all__ = ["WeightsChoice", "resolve_weights", "weights_cache_dir"]

DEFAULT_RANDOM_SEED = 0


@dataclass(frozen=True)
class WeightsChoice:
    """Either a checkpoint file (``path``) or seeded random initialisation (``seed``)."""

    path: Path | None = None
    seed: int | None = None

    @property
    def is_random(self) -> bool:
        return self.path is None


def weights_cache_dir() -> Path:
    """``$FEATX_WEIGHTS`` if set, else ``$XDG_CACHE_HOME/featx/weights`` (``~/.cache/...``)."""
    if os.environ.get("FEATX_WEIGHTS"):
        return Path(os.environ["FEATX_WEIGHTS"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "featx" / "weights"


def resolve_weights(entry: ModelEntry, weights: str | os.PathLike | None) -> WeightsChoice:
    """Interpret the ``weights`` argument of :func:`featx.load_model` / ``--weights``.

    ``None`` looks for the published file in the weights cache; ``"random"`` or
    ``"random:SEED"`` asks for seeded random initialisation; anything else is a path.
    """
    if weights is None:
        path = weights_cache_dir() / entry.weights.file
        if not path.is_file():
            url = entry.weights.url
            if url.endswith(".tar"):
                where = f" (it is inside the archive {url}; download and unpack it)"
            else:
                where = f" (download it from {url})" if url else ""
            raise FileNotFoundError(
                f"weights for {entry.name!r} not found: put {entry.weights.file!r}{where} into "
                f"{weights_cache_dir()} (or set FEATX_WEIGHTS to the folder holding it), pass "
                "--weights PATH, or use --weights random for randomly initialised weights"
            )
        return WeightsChoice(path=path)
    text = str(weights)
    if text == "random" or text.startswith("random:"):
        seed_text = text.partition(":")[2] if ":" in text else str(DEFAULT_RANDOM_SEED)
        try:
            return WeightsChoice(seed=int(seed_text))
        except ValueError:
            raise ValueError(f"--weights {text!r}: the seed after 'random:' must be an integer") from None
    path = Path(text).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    return WeightsChoice(path=path)
