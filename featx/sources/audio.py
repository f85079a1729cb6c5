"""Audio stimuli: decode, mix to mono, resample, cut to length and normalise.

Every sound becomes the waveform the audio models were trained on (spec section 5.1):
``sample_rate * duration`` samples (40000 at 20 kHz for 2 s), mean 0 and RMS 0.1.

Decoding uses ``soundfile`` (libsndfile): WAV, FLAC, OGG (Vorbis, Opus) and MP3 (with
libsndfile 1.1 or newer). Samples are read as float64; libsndfile scales integer
formats by their bit depth, so 16-bit ``v`` becomes ``v / 32768``, 24-bit ``v / 2**23``,
and unsigned 8-bit ``u`` becomes ``(u - 128) / 128``. Float files keep their values.

Preprocessing, in this order:

1. **mono**: the mean of all channels (any channel count);
2. **resample** to the contract's rate with ``scipy.signal.resample_poly`` (up and
   down factors from the greatest common divisor of the two rates; Kaiser window,
   beta 5);
3. **window** (the ``clip`` policy, on the resampled signal):

   * ``"start"`` (default): the first ``duration`` seconds;
   * ``"center"``: the middle ``duration`` seconds (onset rounded down to a sample);
   * ``"windows"``: windows starting at 0, ``hop``, ``2 hop``, ... seconds (``hop``
     defaults to ``duration``). Every window that fits is kept, and so is the first
     that does not, if it starts before the end of the sound, so the whole sound
     is covered. Each window is its own stimulus, with id ``<file id>@<onset>s``
     (onset with three decimals, more if needed): ``speech/a.wav@12.500s``;

4. **demean**: subtract the mean of the real audio in the window;
5. **pad**: a window with less than ``duration`` seconds of audio is zero-padded at
   the end (flag ``padded``); after step 4 the padded window still has mean 0;
6. **RMS**: scale the whole window to RMS ``rms`` (0.1). A window whose RMS is at or
   below ``1e-9`` (about -180 dBFS; digital silence, or a constant) stays all zeros,
   without NaN (flag ``silent``).

Steps 4-6 make every model input satisfy the contract exactly (mean 0, RMS 0.1 over
the 2 s), as the paper's clips did. A short sound is therefore louder than its own
file: a 0.5 s sound padded to 2 s has RMS 0.2 over its 0.5 s. Values outside the
contract's ``value_range`` ([-1, 1]) are clamped by the model; such windows are
flagged ``clipped``.

Per-row columns in the store: ``onset_s`` (window onset in the file), ``duration_s``
(seconds of real audio in the window), ``source_sample_rate``, ``source_channels``,
``padded``, ``silent``, ``clipped`` (0/1, uint8), plus the file path, hash and size.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import soundfile as sf
import torch
from scipy.signal import resample_poly

from featx.sources.common import BadFile, DecodeError, FileSource, Stimulus, make_stimuli

__all__ = [
    "AUDIO_EXTENSIONS",
    "AudioInfo",
    "AudioSource",
    "CLIP_POLICIES",
    "decode_audio",
    "resample",
    "window_onsets",
]

logger = logging.getLogger(__name__)

#: File extensions that :class:`AudioSource` picks up when walking a folder.
AUDIO_EXTENSIONS = frozenset({"wav", "flac", "ogg", "mp3"})

#: The length policies of :class:`AudioSource`.
CLIP_POLICIES = ("start", "center", "windows")

#: A window whose RMS (after demeaning) is at or below this is silent (left at zero).
SILENCE_RMS = 1e-9


@dataclass(frozen=True)
class AudioInfo:
    """What a sound file holds, from its header."""

    sample_rate: int
    channels: int
    frames: int  # per channel; libsndfile's count (an estimate for some MP3 files)
    format: str  # libsndfile's format and subtype, e.g. "WAV/PCM_16"


@dataclass(frozen=True)
class _Row:
    """What one window held (recorded per row in the store)."""

    duration_s: float
    padded: bool
    silent: bool
    clipped: bool


# --- decoding -------------------------------------------------------------------


def _reason(path: str, exc: BaseException) -> str:
    """A readable explanation of why a sound file cannot be decoded."""
    if isinstance(exc, DecodeError):
        return exc.reason
    if isinstance(exc, FileNotFoundError) or not os.path.exists(path):
        return "file does not exist"
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        return "empty file (0 bytes)"
    if isinstance(exc, sf.LibsndfileError):
        text = exc.error_string.strip()
        if text.startswith("File does not exist"):  # libsndfile's words for unparsable MPEG data
            text = "format not recognised or data corrupt"
        return f"not a sound file libsndfile can read ({text.rstrip('.')})"
    return f"cannot decode: {type(exc).__name__}: {exc}"


def audio_info(path: str | os.PathLike) -> AudioInfo:
    """Sample rate, channel count and length of a sound file, from its header.

    Raises:
        featx.sources.DecodeError: the file cannot be opened as sound.
    """
    path = os.fspath(path)
    try:
        info = sf.info(path)
    except Exception as exc:
        raise DecodeError(path, _reason(path, exc)) from exc
    return AudioInfo(int(info.samplerate), int(info.channels), int(info.frames),
                     f"{info.format}/{info.subtype}")


def decode_audio(path: str | os.PathLike, frames: int = -1) -> tuple[np.ndarray, AudioInfo]:
    """Decode a sound file to float64 samples ``[frames, channels]``.

    Args:
        path: the file.
        frames: how many frames to read from the start (``-1``: all).

    Raises:
        featx.sources.DecodeError: the file cannot be read, holds no audio frames, or
            holds NaN or infinite samples.
    """
    path = os.fspath(path)
    try:
        with sf.SoundFile(path) as f:
            info = AudioInfo(int(f.samplerate), int(f.channels), int(f.frames),
                             f"{f.format}/{f.subtype}")
            samples = f.read(frames, dtype="float64", always_2d=True)
    except Exception as exc:
        raise DecodeError(path, _reason(path, exc)) from exc
    if samples.shape[0] == 0:
        raise DecodeError(path, f"no audio frames ({info.format} file with 0 samples)")
    if not np.isfinite(samples).all():
        raise DecodeError(path, "holds NaN or infinite samples")
    return samples, info


def resample(x: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample ``x`` (last axis) with ``scipy.signal.resample_poly``.

    Up and down factors are ``to_rate / g`` and ``from_rate / g`` with ``g`` the
    greatest common divisor; the output has ``ceil(len(x) * up / down)`` samples.
    """
    if from_rate == to_rate:
        return x
    g = math.gcd(int(from_rate), int(to_rate))
    return resample_poly(x, to_rate // g, from_rate // g, axis=-1)


def _source_frames_for(n_out: int, from_rate: int, to_rate: int) -> int:
    """Source frames that determine the first ``n_out`` resampled samples exactly.

    resample_poly's output sample m depends on input samples up to about
    ``(m * down + half_len) / up`` with ``half_len = 10 * max(up, down)``; a prefix
    that long (plus a margin) gives the same first ``n_out`` samples as the whole file.
    """
    if from_rate == to_rate:
        return n_out
    g = math.gcd(int(from_rate), int(to_rate))
    up, down = to_rate // g, from_rate // g
    return math.ceil(n_out * down / up) + math.ceil(10 * max(up, down) / up) + 2


def _resampled_length(frames: int, from_rate: int, to_rate: int) -> int:
    if from_rate == to_rate:
        return frames
    g = math.gcd(int(from_rate), int(to_rate))
    return math.ceil(frames * (to_rate // g) / (from_rate // g))


def window_onsets(length: int, n: int, hop: int) -> list[int]:
    """Start samples of the ``"windows"`` policy for a signal of ``length`` samples.

    Windows of ``n`` samples start every ``hop`` samples; all that fit are kept, plus
    the first that does not fit if it starts inside the signal (at least one window).
    """
    starts = []
    start = 0
    while start + n <= length:
        starts.append(start)
        start += hop
    if start < length or not starts:
        starts.append(start if starts else 0)
    return starts


def _format_onset(seconds: float) -> str:
    for decimals in range(3, 10):
        text = f"{seconds:.{decimals}f}"
        if abs(float(text) - seconds) < 1e-10:
            return text
    return repr(seconds)


# --- the source -----------------------------------------------------------------


def _check_contract(contract) -> tuple[int, int]:
    kind = getattr(contract, "kind", None)
    if kind != "audio":
        raise ValueError(
            f"AudioSource needs an audio input contract (kind 'audio'), got kind {kind!r}; "
            "image models take an ImageSource"
        )
    rate = int(contract.sample_rate)
    n = int(round(rate * float(contract.duration)))
    if rate <= 0 or n <= 0:
        raise ValueError(f"audio contract needs a positive sample_rate and duration, got "
                         f"{contract.sample_rate!r} and {contract.duration!r}")
    return rate, n


class AudioSource(FileSource):
    """Sound files, decoded and preprocessed for one model's input contract.

    Args:
        root_or_files: A folder (walked recursively in natural order, hidden files
            skipped; ids are paths relative to it), a single sound file, or a
            sequence of sound files (kept in the given order; ids relative to their
            common folder). With ``stimuli_list``, the folder that relative paths in
            the list refer to (``None``: the list's own folder).
        contract: The model's :class:`featx.registry.InputContract` (``sample_rate``,
            ``duration``, ``demean``, ``rms``, ``value_range``).
        clip: ``"start"``, ``"center"`` or ``"windows"`` (see the module docstring).
        hop: Seconds between window onsets, for ``clip="windows"`` only (default:
            the contract's duration, i.e. consecutive windows).
        stimuli_list: A list file giving the order and ids explicitly (see
            :func:`featx.sources.read_stimulus_list`).

    ``load(i)`` returns a float32 tensor ``(sample_rate * duration,)``. With
    ``"windows"`` the number of rows per file comes from the file's header, read at
    construction; a file whose header cannot be read gets one row, which ``check()``
    reports.
    """

    def __init__(
        self,
        root_or_files: str | os.PathLike | Sequence[str | os.PathLike] | None,
        contract,
        clip: str = "start",
        hop: float | None = None,
        stimuli_list: str | os.PathLike | None = None,
    ):
        self.contract = contract
        self.sample_rate, self.n_samples = _check_contract(contract)
        if clip not in CLIP_POLICIES:
            raise ValueError(f"clip must be one of {', '.join(map(repr, CLIP_POLICIES))}, got {clip!r}")
        if hop is not None and clip != "windows":
            raise ValueError(f"hop={hop!r} applies to clip='windows' only (clip is {clip!r})")
        self.clip = clip
        self.hop = float(contract.duration) if hop is None and clip == "windows" else hop
        if self.hop is not None:
            self._hop_samples = int(round(self.hop * self.sample_rate))
            if not self._hop_samples >= 1:
                raise ValueError(f"hop must be at least one sample (1/{self.sample_rate} s), got {hop!r}")
        self.demean = bool(contract.demean)
        self.rms = None if contract.rms is None else float(contract.rms)
        self.value_range = (float(contract.value_range[0]), float(contract.value_range[1]))
        self.stimuli_list = None if stimuli_list is None else str(stimuli_list)

        files = _find_stimuli(root_or_files, stimuli_list)
        self._info: dict[str, AudioInfo] = {}
        self.stimuli: list[Stimulus] = self._expand(files)
        self._rows: dict[tuple[str, float], _Row] = {}
        self._cache: tuple[str, bool, np.ndarray] | None = None

    # -- rows

    def _expand(self, files: list[Stimulus]) -> list[Stimulus]:
        """One stimulus per file (``start``/``center``) or per window (``windows``)."""
        if self.clip == "start":
            return files
        rows = []
        for s in files:
            try:
                info = self._header(s.path)
            except DecodeError as exc:
                logger.debug("cannot read the header of %s: %s", s.path, exc.reason)
                rows.append(s)  # one row; check() reports the file
                continue
            length = _resampled_length(info.frames, info.sample_rate, self.sample_rate)
            if self.clip == "center":
                start = max(length - self.n_samples, 0) // 2
                rows.append(_at(s, s.id, start / self.sample_rate))
                continue
            for start in window_onsets(length, self.n_samples, self._hop_samples):
                onset = start / self.sample_rate
                rows.append(_at(s, f"{s.id}@{_format_onset(onset)}s", onset))
        return rows

    def _header(self, path: str) -> AudioInfo:
        if path not in self._info:
            self._info[path] = audio_info(path)
        return self._info[path]

    def _start(self, stimulus: Stimulus) -> int:
        return int(round(stimulus.onset * self.sample_rate))

    # -- decoding

    def _signal(self, path: str, full: bool) -> np.ndarray:
        """The file as a mono float64 signal at the contract's rate (last file cached).

        With ``full=False`` (``clip="start"``) only the prefix that determines the
        first window is decoded; its samples equal those of the whole file.
        """
        if self._cache is not None and self._cache[0] == path and (self._cache[1] or not full):
            return self._cache[2]
        frames = -1
        if not full:
            info = self._header(path)
            frames = _source_frames_for(self.n_samples, info.sample_rate, self.sample_rate)
        samples, info = decode_audio(path, frames)
        self._info[path] = info
        mono = samples.mean(axis=1)
        signal = resample(mono, info.sample_rate, self.sample_rate)
        self._cache = (path, full, signal)
        return signal

    def _window(self, signal: np.ndarray, start: int) -> tuple[np.ndarray, _Row]:
        n = self.n_samples
        real = signal[start:start + n]
        window = np.zeros(n)
        if self.demean and len(real):
            window[: len(real)] = real - real.mean()
        else:
            window[: len(real)] = real
        silent = False
        if self.rms is not None:
            level = math.sqrt(float(np.mean(window**2)))
            if level <= SILENCE_RMS:
                window[:] = 0.0
                silent = True
            else:
                window *= self.rms / level
        low, high = self.value_range
        row = _Row(
            duration_s=len(real) / self.sample_rate,
            padded=len(real) < n,
            silent=silent,
            clipped=bool(window.min() < low or window.max() > high),
        )
        return window, row

    def _prepare(self, i: int, full: bool) -> np.ndarray:
        stimulus = self.stimuli[i]
        signal = self._signal(stimulus.path, full)
        window, row = self._window(signal, self._start(stimulus))
        self._rows[(stimulus.path, stimulus.onset)] = row
        return window

    def load(self, i: int) -> torch.Tensor:
        """Decode and preprocess stimulus ``i``: float32 tensor ``(n_samples,)``.

        Raises:
            featx.sources.DecodeError: the file cannot be decoded.
        """
        window = self._prepare(i, full=self.clip != "start")
        return torch.from_numpy(window.astype(np.float32))

    def check(self) -> list[BadFile]:
        """Decode every file completely; return those that cannot be used.

        Unreadable, empty and zero-frame files, and files with NaN or infinite
        samples, are reported with the reason. The per-row columns of the files that
        decode are filled in on the way.
        """
        bad: list[BadFile] = []
        bad_paths: set[str] = set()
        for i, stimulus in enumerate(self.stimuli):
            if stimulus.path in bad_paths:
                continue
            try:
                self._prepare(i, full=True)  # windows of one file share the cached decode
            except DecodeError as exc:
                logger.debug("bad sound %s: %s", stimulus.path, exc.reason)
                bad_paths.add(stimulus.path)
                bad.append(BadFile(stimulus.path, exc.reason))
        self._cache = None
        return bad

    def __getstate__(self) -> dict:
        # DataLoader workers get a copy without the cached signal
        state = dict(self.__dict__)
        state["_cache"] = None
        return state

    def _on_drop(self, dropped: list[Stimulus]) -> None:
        for s in dropped:
            self._rows.pop((s.path, s.onset), None)
        self._cache = None

    # -- records

    def columns(self) -> dict[str, np.ndarray]:
        """Per-row metadata: file path, hash and size, and per window ``onset_s``,
        ``duration_s``, ``source_sample_rate``, ``source_channels``, ``padded``,
        ``silent``, ``clipped``.

        Rows not yet decoded (by ``check()`` or ``load()``) are decoded here. Files
        that cannot be decoded give -1 / NaN / 0.
        """
        rows, infos = [], []
        for i, s in enumerate(self.stimuli):
            key = (s.path, s.onset)
            if key not in self._rows:
                try:
                    self._prepare(i, full=self.clip != "start")
                except DecodeError:
                    pass
            rows.append(self._rows.get(key))
            infos.append(self._info.get(s.path))
        cols = super().columns()
        cols["onset_s"] = np.array([s.onset for s in self.stimuli], dtype=np.float64)
        cols["duration_s"] = np.array([r.duration_s if r else np.nan for r in rows], np.float64)
        cols["source_sample_rate"] = np.array([x.sample_rate if x else -1 for x in infos], np.int64)
        cols["source_channels"] = np.array([x.channels if x else -1 for x in infos], np.int64)
        for flag in ("padded", "silent", "clipped"):
            cols[flag] = np.array([bool(r and getattr(r, flag)) for r in rows], np.uint8)
        return cols

    def audio_info(self, i: int) -> AudioInfo | None:
        """Header information of stimulus ``i``'s file (None if unreadable)."""
        try:
            return self._header(self.stimuli[i].path)
        except DecodeError:
            return None

    def settings(self) -> dict[str, Any]:
        """Every parameter that determines the values ``load`` returns."""
        return {
            "source": "audio",
            "sample_rate": self.sample_rate,
            "duration": float(self.contract.duration),
            "n_samples": self.n_samples,
            "clip": self.clip,
            "hop": self.hop,
            "decoder": "soundfile (libsndfile), float64, integer formats scaled by bit depth",
            "mono": "mean of all channels",
            "resampler": "scipy.signal.resample_poly, up/down = rates / gcd, window ('kaiser', 5.0)",
            "demean": self.demean,
            "rms": self.rms,
            "order": "mono, resample, window, demean (real audio), zero-pad at end, scale to rms",
            "silence_rms": SILENCE_RMS,
            "value_range": list(self.value_range),
            "dtype": "float32",
        }

    def __repr__(self) -> str:
        hop = f", hop={self.hop}" if self.clip == "windows" else ""
        return (f"AudioSource({len(self)} stimuli, {self.sample_rate} Hz, {self.n_samples} samples, "
                f"clip={self.clip!r}{hop})")


def _at(stimulus: Stimulus, id: str, onset: float) -> Stimulus:
    return Stimulus(id=id, path=stimulus.path, size_bytes=stimulus.size_bytes,
                    sha256=stimulus.sha256, onset=float(onset))


def _find_stimuli(root_or_files, stimuli_list) -> list[Stimulus]:
    if stimuli_list is not None:
        return make_stimuli(root=root_or_files, stimuli_list=stimuli_list)
    if root_or_files is None:
        raise TypeError("AudioSource needs a folder, sound files or a stimulus list")
    if isinstance(root_or_files, (str, os.PathLike)):
        path = Path(root_or_files).expanduser()
        if path.is_file():
            return make_stimuli([path])
        return make_stimuli(root=path, extensions=AUDIO_EXTENSIONS)
    return make_stimuli(list(root_or_files))
