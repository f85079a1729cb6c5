"""featx: named intermediate activations ("stages") of neural networks, stored for
brain-model comparisons.

Public API::

    featx.list_models()                      # registered model names
    featx.load_model(name, weights=...)      # torch.nn.Module with its input contract
    featx.Extractor(model, stages)           # forward-hook extractor for any module
    featx.extract(model_name, inputs, store) # what `featx extract` runs
    featx.open_store(path)                   # lazy xarray.Dataset of a store
"""

__version__ = "0.1.0"

from .extractor import Extractor, list_modules  # noqa: E402
from .models import load_model  # noqa: E402
from .registry import get_entry, list_models  # noqa: E402

__all__ = [
    "Extractor",
    "__version__",
    "extract",
    "get_entry",
    "list_models",
    "list_modules",
    "load_model",
    "open_store",
]


def __getattr__(name: str):
    # The store side (h5py, xarray) is imported on first use, not with featx.
    if name == "extract":
        from .pipeline import extract

        return extract
    if name == "open_store":
        from .store import open_store

        return open_store
    raise AttributeError(f"module 'featx' has no attribute {name!r}")
