"""Stimulus sources: find, check, decode and preprocess the input files.

``ImageSource`` (``featx.sources.images``) and ``AudioSource``
(``featx.sources.audio``) are imported on first use, so that importing the shared
records here does not load the decoders.
"""

from __future__ import annotations

import importlib

from featx.sources.common import (
    BadFile,
    DecodeError,
    FileSource,
    Stimulus,
    StimulusListError,
    discover_files,
    file_sha256,
    make_stimuli,
    make_stimulus,
    natural_key,
    read_stimulus_list,
    relative_id,
)

__all__ = [
    "AudioSource",
    "BadFile",
    "DecodeError",
    "FileSource",
    "IMAGE_EXTENSIONS",
    "ImageSource",
    "MultiFrameWarning",
    "Stimulus",
    "StimulusListError",
    "discover_files",
    "file_sha256",
    "make_stimuli",
    "make_stimulus",
    "natural_key",
    "read_stimulus_list",
    "relative_id",
]

_LAZY = {
    "ImageSource": "featx.sources.images",
    "MultiFrameWarning": "featx.sources.images",
    "IMAGE_EXTENSIONS": "featx.sources.images",
    "AudioSource": "featx.sources.audio",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
