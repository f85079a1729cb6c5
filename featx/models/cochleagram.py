"""The cochleagram front end of the audio models (Feather et al. 2023, ``cochleagram_1``).

A waveform of 2 s at 20 kHz becomes a ``[B, 1, 211, 390]`` map: 211 frequency channels
(row 0 the lowest) by 390 frames at 200 Hz. The arithmetic follows the chcochleagram
package that the paper's models were trained with (spec/original_models.md section 5):

1. **Filterbank.** ``X = rfft(x)`` (20001 bins, 0 to 10 kHz in 0.5 Hz steps) is multiplied
   by 211 half-cosine filters on the ERB-number scale, 4x overcomplete between 50 Hz and
   10 kHz: 4 lowpass, 203 bandpass, 4 highpass, each divided by 2 so that the squared
   responses sum to 1 (:func:`erb_cosine_filters`).
2. **Envelope.** Each filtered one-sided spectrum is zero-padded to the signal length
   *without* doubling the positive frequencies, inverse-FFT'd, and its magnitude taken as
   ``sqrt(max(re^2 + im^2, 1e-16))``. For a bandpass channel this is half the textbook
   Hilbert envelope; that factor is part of the trained models' input.
3. **Downsampling.** Each envelope is correlated with a 1001-tap sinc x Kaiser(beta=5)
   lowpass kernel (:func:`sinc_kaiser_kernel`), stride 100, no padding: 390 frames.
4. **Compression.** ``(relu(y) + 1e-8) ** 0.3``.

Steps 1-3 give the *uncompressed* cochleagram (:meth:`Cochleagram.uncompressed`, or the
output of the submodule ``Cochleagram``); step 4 gives the model input.

Module layout. The published checkpoints store the filterbank and the downsampling
kernel as buffers under the original's nested names, and the kernel twice (one module
registered under two names). :func:`build_front_end` reproduces that nesting, so a
model whose child ``0`` is the front end has exactly the file's keys::

    0.full_rep.rep.downsampling_op.downsample_filter          [1, 1, 1001]
    0.full_rep.rep.Cochleagram.compute_subbands.coch_filters  [211, 20001, 2]
    0.full_rep.rep.Cochleagram.downsampling.downsample_filter (same module as downsampling_op)

Checked buffers. featx computes these constants itself. When a state dict is loaded into
a :class:`Cochleagram`, every incoming copy is compared with featx's own values and
loading stops with a :class:`~featx.checkpoints.CheckpointError` if any entry differs by
more than ``1e-6`` (float32 rounding of values of at most 0.5 is below ``3e-8``). A
mismatch means the file was made with a different front end, and the model would not
compute what its registry entry documents.

Memory. The complex subbands of a batch take ``B x 211 x 40000 x 8`` bytes (540 MB for
B = 8), so the filterbank, envelope and downsampling steps run on blocks of channels
sized to stay near ``chunk_bytes`` (default 256 MiB) of intermediates. Blocking does not
change the values.

Precision. The front end computes in float32 (float64 after ``.double()``), also inside
``torch.autocast``, and returns float32; an autocast region applies to the network only.

Known limits: the gradient clipping the original applies in the backward pass of the
compression (metamer synthesis only) is not reproduced; forward values are identical.
Values below about ``1e-6`` in the uncompressed cochleagram (channels with no energy)
sit at the float32 FFT noise floor, which the 0.3 power magnifies: there, results from
different FFT libraries, devices or batch sizes differ by up to about ``1e-4``.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Cochleagram",
    "CochleagramEnvelopes",
    "ERBCosineFilters",
    "PowerCompression",
    "SincKaiserDownsampling",
    "build_front_end",
    "erb_cosine_filters",
    "sinc_kaiser_kernel",
    "with_front_end",
]

log = logging.getLogger(__name__)

#: Largest difference tolerated between a loaded front-end buffer and featx's own value.
BUFFER_TOLERANCE = 1e-6


# ---------------------------------------------------------------------------------------
# constants


def freq_to_erb(freq_hz: np.ndarray | float) -> np.ndarray:
    """ERB-number of a frequency (Glasberg & Moore 1990): ``9.265 ln(1 + f / (24.7 * 9.265))``."""
    return 9.265 * np.log(1 + np.asarray(freq_hz, dtype=np.float64) / (24.7 * 9.265))


def erb_to_freq(erb: np.ndarray | float) -> np.ndarray:
    """Inverse of :func:`freq_to_erb`."""
    return 24.7 * 9.265 * (np.exp(np.asarray(erb, dtype=np.float64) / 9.265) - 1)


def erb_cosine_filters(
    signal_size: int = 40000,
    sample_rate: int = 20000,
    n: int = 50,
    low_lim: float = 50.0,
    high_lim: float = 10000.0,
    sample_factor: int = 4,
) -> np.ndarray:
    """Half-cosine ERB filters on the non-negative frequencies of a ``signal_size`` rfft.

    Returns a float64 array ``[n_channels, n_bins]`` with ``n_channels = sample_factor *
    (n + 1) - 1 + 2 * sample_factor`` (211 by default), ordered lowpass filters, bandpass
    filters from low to high, highpass filters; and ``n_bins = signal_size // 2 + 1``.

    The ``sample_factor * (n + 1) - 1`` bandpass centres are equally spaced in
    ERB-number between ``low_lim`` and ``high_lim`` (both excluded). A bandpass filter
    is ``cos(pi (e - c) / w)`` over the grid points strictly inside ``c +- w / 2``,
    ``w = 2 * sample_factor * spacing``. Lowpass filter ``i`` is ``sqrt(1 - b_i^2)`` from
    0 Hz up to the last grid point below bandpass ``i``'s centre; highpass filter ``i``
    mirrors it at the top. All are divided by ``sqrt(sample_factor)``.
    """
    if sample_factor < 1 or (sample_factor != 1 and sample_factor % 2):
        raise ValueError(f"sample_factor must be 1 or a positive even integer, got {sample_factor!r}")
    if signal_size % 2 == 0:
        n_freqs, max_freq = signal_size // 2, sample_rate / 2
    else:
        n_freqs = (signal_size - 1) // 2
        max_freq = sample_rate * (signal_size - 1) / 2 / signal_size
    if not 0 < low_lim < high_lim <= sample_rate / 2:
        raise ValueError(
            f"need 0 < low_lim < high_lim <= sample_rate / 2, got low_lim={low_lim!r}, "
            f"high_lim={high_lim!r}, sample_rate={sample_rate!r}"
        )

    n_band = sample_factor * (n + 1) - 1
    freqs = np.linspace(0, max_freq, n_freqs + 1)
    erbs = freq_to_erb(freqs)
    edges, spacing = np.linspace(freq_to_erb(low_lim), freq_to_erb(high_lim), n_band + 2, retstep=True)
    centres = edges[1:-1]
    half_width = sample_factor * spacing

    bands = np.zeros((n_band, n_freqs + 1))
    for i, centre in enumerate(centres):
        low, high = centre - half_width, centre + half_width
        inside = (erbs > low) & (erbs < high)
        bands[i, inside] = np.cos((erbs[inside] - (low + high) / 2) / (high - low) * np.pi)

    lowpass = np.zeros((sample_factor, n_freqs + 1))
    highpass = np.zeros((sample_factor, n_freqs + 1))
    for i in range(sample_factor):
        top = np.flatnonzero(freqs < erb_to_freq(centres[i]))[-1]
        lowpass[i, : top + 1] = np.sqrt(1 - bands[i, : top + 1] ** 2)
        bottom = np.flatnonzero(freqs > erb_to_freq(centres[-1 - i]))[0]
        highpass[-1 - i, bottom:] = np.sqrt(1 - bands[-1 - i, bottom:] ** 2)

    return np.concatenate([lowpass, bands, highpass]) / np.sqrt(sample_factor)


def sinc_kaiser_kernel(
    sample_rate: int = 20000, env_sr: int = 200, window_size: int = 1001, beta: float = 5.0
) -> np.ndarray:
    """The lowpass kernel applied before taking every ``sample_rate / env_sr``-th sample.

    ``h(t) = sinc(t / D) / D * kaiser(window_size, beta)`` at ``t = -window_size / 2,
    ..., ceil(window_size / 2) - 1`` (half-integer offsets for an odd window), with
    ``D = sample_rate / env_sr``; not renormalised. Returns float64 ``[window_size]``.
    """
    factor = sample_rate / env_sr
    times = np.arange(-window_size / 2, window_size // 2)
    return np.sinc(times / factor) / factor * np.kaiser(window_size, beta)


@lru_cache(maxsize=4)
def _constants(signal_size, sample_rate, n, low_lim, high_lim, sample_factor, env_sr, window_size):
    """featx's own float32 buffers ``(coch_filters [C, K, 2], downsample_filter [1, 1, W])``."""
    filters = erb_cosine_filters(signal_size, sample_rate, n, low_lim, high_lim, sample_factor)
    coch_filters = np.stack([filters, np.zeros_like(filters)], axis=-1).astype(np.float32)
    kernel = sinc_kaiser_kernel(sample_rate, env_sr, window_size).astype(np.float32)
    coch = torch.from_numpy(coch_filters)
    down = torch.from_numpy(kernel).reshape(1, 1, -1)
    coch.requires_grad_(False)
    down.requires_grad_(False)
    return coch, down


# ---------------------------------------------------------------------------------------
# modules


class ERBCosineFilters(nn.Module):
    """Holds the filterbank: buffer ``coch_filters`` ``[channels, bins, 2]`` (real, imaginary).

    Calling it on a one-sided spectrum ``[..., bins]`` (complex) returns the subbands
    ``[..., channels, bins]``; ``channels=slice(a, b)`` restricts it to a block.
    """

    def __init__(self, coch_filters: torch.Tensor):
        super().__init__()
        self.register_buffer("coch_filters", coch_filters.clone())

    @property
    def n_channels(self) -> int:
        return self.coch_filters.shape[0]

    def forward(self, spectrum: torch.Tensor, channels: slice = slice(None)) -> torch.Tensor:
        filters = torch.view_as_complex(self.coch_filters[channels].to(spectrum.real.dtype).contiguous())
        return spectrum.unsqueeze(-2) * filters


class SincKaiserDownsampling(nn.Module):
    """Holds buffer ``downsample_filter`` ``[1, 1, window]``; ``[..., time]`` -> ``[..., frames]``."""

    def __init__(self, downsample_filter: torch.Tensor, stride: int):
        super().__init__()
        self.stride = stride
        self.register_buffer("downsample_filter", downsample_filter.clone())

    def forward(self, envelopes: torch.Tensor) -> torch.Tensor:
        return _downsample(envelopes, self.downsample_filter, self.stride)

    def extra_repr(self) -> str:
        return f"taps={self.downsample_filter.shape[-1]}, stride={self.stride}"


def _downsample(envelopes: torch.Tensor, kernel: torch.Tensor, stride: int) -> torch.Tensor:
    lead = envelopes.shape[:-1]
    flat = envelopes.reshape(-1, 1, envelopes.shape[-1])
    frames = F.conv1d(flat, kernel.to(envelopes.dtype), stride=stride)
    return frames.reshape(*lead, frames.shape[-1])


class PowerCompression(nn.Module):
    """``(relu(x) + offset) ** power`` (``coch_p3``: power 0.3, offset 1e-8)."""

    def __init__(self, power: float = 0.3, offset: float = 1e-8):
        super().__init__()
        self.power, self.offset = power, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.relu(x) + self.offset) ** self.power

    def extra_repr(self) -> str:
        return f"power={self.power}, offset={self.offset}"


class CochleagramEnvelopes(nn.Module):
    """Waveform ``[B, N]`` or ``[B, 1, N]`` -> uncompressed cochleagram ``[B, 1, C, frames]``.

    Runs filterbank, envelope and downsampling on blocks of channels (see the module
    docstring for the memory bound). Children: ``compute_subbands``
    (:class:`ERBCosineFilters`) and ``downsampling`` (:class:`SincKaiserDownsampling`).
    """

    def __init__(
        self,
        compute_subbands: ERBCosineFilters,
        downsampling: SincKaiserDownsampling,
        signal_size: int,
        chunk_bytes: int = 256 * 2**20,
    ):
        super().__init__()
        self.signal_size = signal_size
        self.chunk_bytes = chunk_bytes
        self.compute_subbands = compute_subbands
        self.downsampling = downsampling

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        x = _as_batch(waveform, self.signal_size)
        # float32 even under autocast: a half-precision downsampling conv loses ~1e-3
        with _autocast_off(x.device.type):
            return self._envelopes(x)

    def _envelopes(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(self.compute_subbands.coch_filters.dtype, torch.float32)
        spectrum = torch.fft.rfft(x.to(dtype), dim=-1)  # [B, bins]

        n_channels = self.compute_subbands.n_channels
        # per channel and item: subbands, padded spectrum, ifft output (complex) + envelope
        per_channel = x.shape[0] * self.signal_size * 28
        block = max(1, min(n_channels, self.chunk_bytes // per_channel))
        frames = []
        for start in range(0, n_channels, block):
            subbands = self.compute_subbands(spectrum, slice(start, start + block))
            # one-sided spectrum, zero-padded to the full length, NOT doubled
            analytic = torch.fft.ifft(subbands, n=self.signal_size, dim=-1)
            envelopes = torch.sqrt(torch.clamp(analytic.real**2 + analytic.imag**2, min=1e-16))
            del subbands, analytic
            frames.append(
                _downsample(envelopes, self.downsampling.downsample_filter, self.downsampling.stride)
            )
        return torch.cat(frames, dim=1).unsqueeze(1)

    def extra_repr(self) -> str:
        return f"signal_size={self.signal_size}, chunk_bytes={self.chunk_bytes}"


class Cochleagram(nn.Module):
    """The cochleagram front end: waveform -> compressed cochleagram ``[B, 1, 211, 390]``.

    Args:
        signal_size, sample_rate: input length and rate (40000 samples at 20 kHz).
        n, low_lim, high_lim, sample_factor: filterbank (:func:`erb_cosine_filters`).
        env_sr, window_size: rate after downsampling and kernel length
            (:func:`sinc_kaiser_kernel`).
        power, offset: compression (:class:`PowerCompression`).
        chunk_bytes: rough bound on the intermediates of one block of channels.

    The input is ``[B, N]`` or ``[B, 1, N]`` with ``N = signal_size``, already demeaned
    and RMS-normalised (featx's audio sources do that). The computation runs in float32
    (float64 if the module was converted with ``.double()``) on the buffers' device.

    Children (names from the original): ``downsampling_op`` (the same module as
    ``Cochleagram.downsampling``), ``Cochleagram`` (:class:`CochleagramEnvelopes`,
    output: the uncompressed cochleagram) and ``compression``.
    """

    def __init__(
        self,
        signal_size: int = 40000,
        sample_rate: int = 20000,
        n: int = 50,
        low_lim: float = 50.0,
        high_lim: float = 10000.0,
        sample_factor: int = 4,
        env_sr: int = 200,
        window_size: int = 1001,
        power: float = 0.3,
        offset: float = 1e-8,
        chunk_bytes: int = 256 * 2**20,
    ):
        super().__init__()
        if sample_rate % env_sr:
            raise ValueError(f"sample_rate {sample_rate} must be a multiple of env_sr {env_sr}")
        if window_size > signal_size:
            raise ValueError(f"window_size {window_size} exceeds signal_size {signal_size}")
        self.params = (signal_size, sample_rate, n, float(low_lim), float(high_lim),
                       sample_factor, env_sr, window_size)
        coch_filters, downsample_filter = _constants(*self.params)

        downsampling = SincKaiserDownsampling(downsample_filter, stride=sample_rate // env_sr)
        # registration order gives the checkpoint's key order
        self.downsampling_op = downsampling
        self.Cochleagram = CochleagramEnvelopes(
            ERBCosineFilters(coch_filters), downsampling, signal_size, chunk_bytes
        )
        self.compression = PowerCompression(power, offset)
        if hasattr(self, "register_load_state_dict_pre_hook"):  # public from torch 2.5
            self.register_load_state_dict_pre_hook(_check_loaded_buffers)
        else:
            self._register_load_state_dict_pre_hook(_check_loaded_buffers, with_module=True)

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """Per-item output shape ``(1, channels, frames)``."""
        signal_size, _, _, _, _, _, _, window_size = self.params
        channels = self.Cochleagram.compute_subbands.n_channels
        return (1, channels, (signal_size - window_size) // self.downsampling_op.stride + 1)

    def uncompressed(self, waveform: torch.Tensor) -> torch.Tensor:
        """The cochleagram before compression, ``[B, 1, C, frames]``."""
        return self.Cochleagram(waveform)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        envelopes = self.Cochleagram(waveform)
        with _autocast_off(envelopes.device.type):
            return self.compression(envelopes)

    def reference_buffers(self) -> dict[str, torch.Tensor]:
        """featx's own values of this module's state-dict entries (relative keys)."""
        coch_filters, downsample_filter = _constants(*self.params)
        return {
            "downsampling_op.downsample_filter": downsample_filter,
            "Cochleagram.compute_subbands.coch_filters": coch_filters,
            "Cochleagram.downsampling.downsample_filter": downsample_filter,
        }


class _Holder(nn.Module):
    """Holds one child under the attribute name the checkpoint's keys need; forwards to it."""

    def __init__(self, name: str, child: nn.Module):
        super().__init__()
        self._child_name = name
        self.add_module(name, child)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self._child_name)(x)


def build_front_end(**options) -> nn.Module:
    """A :class:`Cochleagram` nested as ``full_rep.rep`` like the original's module ``0``.

    The returned module maps a waveform to the compressed cochleagram; its state-dict
    keys are ``full_rep.rep.<Cochleagram keys>``. ``options`` go to :class:`Cochleagram`.
    """
    return _Holder("full_rep", _Holder("rep", Cochleagram(**options)))


# ---------------------------------------------------------------------------------------
# helpers


def _as_batch(waveform: torch.Tensor, signal_size: int) -> torch.Tensor:
    if waveform.dim() == 3 and waveform.shape[1] == 1:
        waveform = waveform[:, 0]
    if waveform.dim() != 2 or waveform.shape[-1] != signal_size:
        raise ValueError(
            f"the cochleagram takes waveforms of shape [B, {signal_size}] or "
            f"[B, 1, {signal_size}], got {list(waveform.shape)}"
        )
    return waveform


def _autocast_off(device_type: str):
    try:
        return torch.autocast(device_type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        return contextlib.nullcontext()


def _check_loaded_buffers(module: Cochleagram, state_dict, prefix, local_metadata, strict,
                          missing_keys, unexpected_keys, error_msgs) -> None:
    """Refuse front-end buffers that differ from featx's own constants."""
    from ..checkpoints import CheckpointError

    problems, checked = [], []
    for key, expected in module.reference_buffers().items():
        full_key = prefix + key
        if full_key not in state_dict:
            continue  # strict loading reports missing keys itself
        given = state_dict[full_key]
        if not isinstance(given, torch.Tensor) or given.shape != expected.shape:
            continue  # ... and wrong shapes
        worst = (given.detach().to("cpu", torch.float64) - expected.double()).abs().max().item()
        if not worst <= BUFFER_TOLERANCE:
            problems.append(f"{full_key} (largest difference {worst:.3g})")
        checked.append(f"{key} {worst:.2g}")
    if checked and not problems:
        log.debug("loaded cochleagram buffers match featx's constants (largest differences: %s)",
                  ", ".join(checked))
    if problems:
        raise CheckpointError(
            "the cochleagram buffers being loaded differ from the constants featx computes "
            f"for this front end by more than {BUFFER_TOLERANCE:g}: {', '.join(problems)}. "
            "The file was made with a different cochleagram (filterbank or downsampling "
            "kernel), so this model would not compute the documented front end; nothing "
            "was loaded into the front end."
        )


def with_front_end(network: nn.Module, **options) -> nn.Sequential:
    """``nn.Sequential`` of the front end (child ``0``) and ``network`` (child ``1``).

    This is the original's ``model`` (``SequentialAttacker(cochleagram, network)``), so
    its state dict has the published audio checkpoints' network keys without their
    ``module.model.`` prefix. A file without the front-end buffers still loads: those
    keys are listed in ``featx_optional_keys`` and keep featx's own constants.
    ``options`` go to :class:`Cochleagram`.
    """
    model = nn.Sequential(OrderedDict([("0", build_front_end(**options)), ("1", network)]))
    model.featx_optional_keys = ("0.full_rep.rep.*",)
    return model
