"""The cochleagram front end against the original implementation's numbers.

``shared/fidelity/cochleagram_reference.npz`` holds five 2 s waveforms and their
cochleagrams (before and after compression) computed by the original code;
``cochleagram_buffers.npz`` holds the two constant buffers as the published audio
checkpoints store them. featx computes all of it itself.

Tolerances. Before compression featx agrees with the reference to about 1e-8
(float32 FFT round-off). The 0.3 power has slope ``0.3 x^-0.7``, which is huge near
zero: in channels with no energy (values at the float32 noise floor, below about 1e-6)
the round-off of *any* two FFT implementations differs by up to ~2e-9 and the
compressed values by up to ~1e-4. The compressed cochleagram is therefore compared
with ``atol = 1e-5`` plus that propagated round-off, ``0.3 (u + 1e-8)^-0.7 * 5e-9``,
which adds nothing above ``u`` of about 1e-4 (the bulk of the entries, which are also
checked at plain ``atol = 1e-5``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featx.checkpoints import CheckpointError
from featx.models.cochleagram import (
    Cochleagram,
    build_front_end,
    erb_cosine_filters,
    erb_to_freq,
    freq_to_erb,
    sinc_kaiser_kernel,
)

FFT_ROUNDOFF = 5e-9  # absolute, on the uncompressed cochleagram


@pytest.fixture(scope="module")
def reference(shared):
    with np.load(shared / "fidelity" / "cochleagram_reference.npz") as npz:
        return {key: npz[key] for key in npz.files}


@pytest.fixture(scope="module")
def buffers(shared):
    with np.load(shared / "fidelity" / "cochleagram_buffers.npz") as npz:
        return {key: npz[key] for key in npz.files}


@pytest.fixture(scope="module")
def coch():
    return Cochleagram().eval()


@pytest.fixture(scope="module")
def computed(coch, reference):
    """featx's uncompressed and compressed cochleagrams of the five waveforms."""
    waveforms = torch.from_numpy(reference["waveform"])
    with torch.no_grad():
        return coch.uncompressed(waveforms)[:, 0].numpy(), coch(waveforms)[:, 0].numpy()


def compress(u: np.ndarray) -> np.ndarray:
    return (np.maximum(u, 0) + np.float32(1e-8)) ** np.float32(0.3)


# --- constants -----------------------------------------------------------------------


def test_buffers_equal_the_published_ones(coch, buffers):
    state = coch.state_dict()
    assert list(state) == [
        "downsampling_op.downsample_filter",
        "Cochleagram.compute_subbands.coch_filters",
        "Cochleagram.downsampling.downsample_filter",
    ]
    for key, name in [("Cochleagram.compute_subbands.coch_filters", "coch_filters"),
                      ("downsampling_op.downsample_filter", "downsample_filter"),
                      ("Cochleagram.downsampling.downsample_filter", "downsample_filter")]:
        assert state[key].dtype == torch.float32
        torch.testing.assert_close(state[key], torch.from_numpy(buffers[name]), rtol=0, atol=1e-7)


def test_filterbank_layout_and_power_complementarity():
    filters = erb_cosine_filters()
    assert filters.shape == (211, 20001)
    freqs = np.linspace(0, 10000, 20001)
    # squared responses sum to one at every frequency; peaks are 1/sqrt(4), except
    # for the top highpass filters, which Nyquist cuts off before they reach it
    np.testing.assert_allclose((filters**2).sum(axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(filters[:208].max(axis=1), 0.5, atol=1e-4)
    assert np.all(filters[208:].max(axis=1) < 0.5)
    # 4 lowpass, 203 bandpass ascending, 4 highpass
    assert all(filters[i, 0] > 0 for i in range(4)) and filters[4:, 0].max() == 0
    assert all(filters[-1 - i, -1] > 0 for i in range(4))
    peaks = freqs[filters[4:207].argmax(axis=1)]
    assert np.all(np.diff(peaks) > 0)
    assert peaks[0] == pytest.approx(55.0, abs=1.0) and peaks[-1] == pytest.approx(9821, abs=2.0)
    # bandpass centres equally spaced in ERB-number
    spacing = np.diff(freq_to_erb(peaks))
    np.testing.assert_allclose(spacing, spacing.mean(), atol=0.02)  # peaks on a 0.5 Hz grid
    np.testing.assert_allclose(erb_to_freq(freq_to_erb(peaks)), peaks)


def test_downsampling_kernel():
    h = sinc_kaiser_kernel()
    assert h.shape == (1001,)
    assert h.argmax() == 500
    assert h[500] == pytest.approx(0.0099996, abs=1e-7)
    assert h.sum() == pytest.approx(1.00094, abs=1e-5)


def test_output_shape_and_input_forms(coch, reference):
    x = torch.from_numpy(reference["waveform"][:2])
    with torch.no_grad():
        flat, channel = coch(x), coch(x[:, None])
    assert flat.shape == (2, 1, 211, 390) and coch.output_shape == (1, 211, 390)
    torch.testing.assert_close(flat, channel, rtol=0, atol=0)
    with pytest.raises(ValueError, match="40000"):
        coch(torch.zeros(2, 39999))


# --- values --------------------------------------------------------------------------


def test_uncompressed_matches_the_reference(computed, reference):
    uncompressed, _ = computed
    expected = reference["cochleagram_uncompressed"]
    for i, name in enumerate(reference["names"]):
        np.testing.assert_allclose(uncompressed[i], expected[i], rtol=1e-5, atol=2e-8, err_msg=str(name))


def test_compression_is_the_reference_formula(reference):
    np.testing.assert_allclose(compress(reference["cochleagram_uncompressed"]), reference["cochleagram"],
                               rtol=0, atol=1e-7)


def test_compressed_matches_the_reference(computed, reference):
    _, compressed = computed
    u, expected = reference["cochleagram_uncompressed"], reference["cochleagram"]
    noise_floor = 0.3 * (np.maximum(u, 0) + 1e-8) ** -0.7 * FFT_ROUNDOFF
    above = u >= 1e-5
    assert above.mean() > 0.7
    for i, name in enumerate(reference["names"]):
        diff = np.abs(compressed[i] - expected[i])
        assert diff[above[i]].max() <= 1e-5, f"{name}: {diff[above[i]].max():.3g} above the noise floor"
        excess = diff - (1e-5 + noise_floor[i])
        assert excess.max() <= 0, f"{name}: {int((excess > 0).sum())} values off by up to {diff.max():.3g}"


def test_batch_items_are_independent(coch, reference, computed):
    """One item alone gives the same cochleagram (to FFT round-off) as in a batch."""
    uncompressed, _ = computed
    with torch.no_grad():
        alone = coch.uncompressed(torch.from_numpy(reference["waveform"][2:3]))[0, 0].numpy()
    np.testing.assert_allclose(alone, uncompressed[2], rtol=1e-5, atol=2e-8)


def test_channel_blocks_do_not_change_values(reference):
    x = torch.from_numpy(reference["waveform"][:2])
    with torch.no_grad():
        whole = Cochleagram(chunk_bytes=1 << 40)(x)
        blocks = Cochleagram(chunk_bytes=7 * 2 * 40000 * 28)(x)  # blocks of 7 channels
    torch.testing.assert_close(blocks, whole, rtol=0, atol=0)


def test_envelope_is_half_the_hilbert_envelope(coch):
    """A steady tone on the 0.5 Hz grid: envelope = amplitude * filter gain / 2."""
    t = torch.arange(40000, dtype=torch.float64) / 20000
    amplitude, freq = 0.1, 1000.0
    with torch.no_grad():
        u = coch.uncompressed((amplitude * torch.sin(2 * np.pi * freq * t)).float()[None])[0, 0]
    gains = erb_cosine_filters()[:, int(freq * 2)]
    channel = int(gains.argmax())
    expected = amplitude * gains[channel] / 2 * sinc_kaiser_kernel().sum()
    np.testing.assert_allclose(u[channel, 10:-10].numpy(), expected, rtol=1e-4)


def test_double_precision_agrees(coch, reference, computed):
    uncompressed, _ = computed
    with torch.no_grad():
        double = Cochleagram().double()(torch.from_numpy(reference["waveform"][:1]).double())
    assert double.dtype == torch.float64
    np.testing.assert_allclose(compress(uncompressed[0]), double[0, 0].numpy(), atol=2e-4)


# --- loading buffers -----------------------------------------------------------------


def test_loading_the_published_buffers(buffers):
    front = build_front_end()
    filters = torch.from_numpy(buffers["coch_filters"])
    kernel = torch.from_numpy(buffers["downsample_filter"])
    front.load_state_dict({
        "full_rep.rep.downsampling_op.downsample_filter": kernel,
        "full_rep.rep.Cochleagram.compute_subbands.coch_filters": filters,
        "full_rep.rep.Cochleagram.downsampling.downsample_filter": kernel,
    })
    rep = front.full_rep.rep
    assert rep.downsampling_op is rep.Cochleagram.downsampling  # one module, two names


def test_loading_different_buffers_is_refused(buffers):
    front = build_front_end()
    before = {k: v.clone() for k, v in front.state_dict().items()}
    filters = torch.from_numpy(buffers["coch_filters"]).clone()
    filters[100, 5000, 0] += 0.01
    kernel = torch.from_numpy(buffers["downsample_filter"])
    state = {
        "full_rep.rep.downsampling_op.downsample_filter": kernel,
        "full_rep.rep.Cochleagram.compute_subbands.coch_filters": filters,
        "full_rep.rep.Cochleagram.downsampling.downsample_filter": kernel * 2,
    }
    with pytest.raises(CheckpointError, match="coch_filters.*downsampling.downsample_filter"):
        front.load_state_dict(state)
    after = front.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_autocast_does_not_lower_the_front_end_precision(coch, reference):
    x = torch.from_numpy(reference["waveform"][:2])
    with torch.no_grad():
        plain = coch(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = coch(x)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain, rtol=0, atol=0)
