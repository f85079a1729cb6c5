"""AudioSource: decoding, mono mix, resampling, length policy and normalisation.

Every file is made here, in ``tmp_path``. Values are checked against computations that
do not go through featx: PCM WAV bytes are written and read back by hand with Python's
``wave`` module, and a sine of known frequency must come out as that sine (frequency,
amplitude and phase fitted by least squares) with mean 0 and RMS 0.1.
"""

from __future__ import annotations

import math
import pickle
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import featx
from featx.models.cochleagram import Cochleagram
from featx.sources import BadFile, DecodeError
from featx.sources.audio import AudioSource, decode_audio, window_onsets

RATE = 20000
N = 40000


@pytest.fixture(scope="module")
def contract():
    return featx.get_entry("coch_cnn9").input


def sine(freq: float, rate: int, seconds: float, amplitude: float = 0.5, phase: float = 0.0) -> np.ndarray:
    t = np.arange(int(round(rate * seconds))) / rate
    return amplitude * np.sin(2 * np.pi * freq * t + phase)


def write_pcm_wav(path: Path, frames: np.ndarray, rate: int, width: int) -> Path:
    """Integer samples ``[frames, channels]`` as a PCM WAV (``width`` bytes), by hand."""
    frames = np.atleast_2d(frames.T).T
    with wave.open(str(path), "wb") as w:
        w.setnchannels(frames.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        if width == 1:
            w.writeframes(frames.astype(np.uint8).tobytes())
        else:
            data = frames.astype("<i4").reshape(-1)
            w.writeframes(b"".join(int(v).to_bytes(width, "little", signed=True) for v in data)
                          if width == 3 else data.astype(f"<i{width}").tobytes())
    return path


def fit_sines(x: np.ndarray, freqs, rate: int = RATE, skip: int = 200) -> tuple[np.ndarray, float]:
    """Least-squares amplitudes of sines at ``freqs`` (edges skipped) and the residual RMS."""
    t = np.arange(len(x)) / rate
    cols = [f(2 * np.pi * freq * t) for freq in freqs for f in (np.sin, np.cos)]
    basis = np.stack(cols + [np.ones_like(t)], axis=1)[skip:-skip]
    coef, *_ = np.linalg.lstsq(basis, x[skip:-skip], rcond=None)
    amplitudes = np.hypot(coef[0:-1:2], coef[1::2])
    return amplitudes, float(np.sqrt(np.mean((x[skip:-skip] - basis @ coef) ** 2)))


def assert_normalised(w: torch.Tensor):
    assert w.dtype == torch.float32 and w.shape == (N,)
    x = w.double().numpy()
    assert np.isfinite(x).all()
    assert abs(x.mean()) < 1e-7
    assert math.sqrt(np.mean(x**2)) == pytest.approx(0.1, rel=1e-6)


def load_one(path: Path, contract, **kwargs) -> tuple[torch.Tensor, dict]:
    source = AudioSource(path, contract, **kwargs)
    assert source.check() == []
    w = source.load(0)
    cols = {k: v[0] for k, v in source.columns().items()}
    return w, cols


# --- decoding: integer scaling ---------------------------------------------------------


def test_unsigned_8bit_wav_is_scaled_by_its_bit_depth(tmp_path):
    raw = np.array([0, 64, 128, 192, 255], dtype=np.uint8)
    samples, info = decode_audio(write_pcm_wav(tmp_path / "u8.wav", raw, 8000, 1))
    np.testing.assert_array_equal(samples[:, 0], (raw.astype(float) - 128) / 128)
    assert (info.sample_rate, info.channels, info.frames) == (8000, 1, 5)


def test_24bit_is_scaled_by_its_bit_depth(tmp_path):
    raw = np.array([-(2**23), -1, 0, 1, 2**22, 2**23 - 1])
    samples, _ = decode_audio(write_pcm_wav(tmp_path / "s24.wav", raw, 48000, 3))
    np.testing.assert_array_equal(samples[:, 0], raw / 2**23)
    # the same values through libsndfile's own FLAC writer
    sf.write(tmp_path / "s24.flac", raw / 2**23, 48000, subtype="PCM_24")
    flac, info = decode_audio(tmp_path / "s24.flac")
    np.testing.assert_array_equal(flac[:, 0], raw / 2**23)
    assert info.format == "FLAC/PCM_24"


def test_16bit_stereo_is_scaled_and_kept_per_channel(tmp_path):
    raw = np.array([[-32768, 32767], [1, -1], [16384, 0]])
    samples, info = decode_audio(write_pcm_wav(tmp_path / "s16.wav", raw, 44100, 2))
    np.testing.assert_array_equal(samples, raw / 32768)
    assert info.channels == 2


# --- the preprocessed waveform ---------------------------------------------------------


def test_44k_stereo_int16_wav(tmp_path, contract):
    left, right = sine(500, 44100, 3.0, 0.4), sine(1500, 44100, 3.0, 0.4)
    raw = np.round(np.stack([left, right], axis=1) * 32767)
    w, cols = load_one(write_pcm_wav(tmp_path / "stereo.wav", raw, 44100, 2), contract)
    assert_normalised(w)
    # mono = mean of the channels: both sines, equal amplitude, RMS 0.1 in total
    amplitudes, residual = fit_sines(w.numpy(), [500, 1500])
    np.testing.assert_allclose(amplitudes, [0.1, 0.1], rtol=1e-3)
    assert residual < 1e-4
    assert cols["source_sample_rate"] == 44100 and cols["source_channels"] == 2
    assert cols["duration_s"] == 2.0 and not cols["padded"] and not cols["silent"]


def test_8k_unsigned_8bit_wav(tmp_path, contract):
    raw = np.round(128 + 100 * np.sin(2 * np.pi * 440 * np.arange(8000 * 3) / 8000))
    w, cols = load_one(write_pcm_wav(tmp_path / "u8.wav", raw, 8000, 1), contract)
    assert_normalised(w)
    amplitudes, residual = fit_sines(w.numpy(), [440])
    assert amplitudes[0] == pytest.approx(0.1 * math.sqrt(2), rel=2e-3)
    assert residual < 0.01  # 8-bit quantisation noise, about 0.1 * sqrt(2) / 100 / sqrt(3)
    assert cols["source_sample_rate"] == 8000


def test_48k_24bit_flac(tmp_path, contract):
    path = tmp_path / "tone.flac"
    sf.write(path, sine(3000, 48000, 2.5, 0.25, phase=0.3), 48000, subtype="PCM_24")
    w, cols = load_one(path, contract)
    assert_normalised(w)
    t = np.arange(N) / RATE
    expected = 0.1 * math.sqrt(2) * np.sin(2 * np.pi * 3000 * t + 0.3)  # phase kept: no delay
    np.testing.assert_allclose(w.numpy()[200:-200], expected[200:-200], atol=2e-4)
    assert cols["source_sample_rate"] == 48000


def test_20k_float_wav_needs_no_resampling(tmp_path, contract):
    x = sine(700, RATE, 2.0, 0.3) + 0.05  # DC offset is removed
    path = tmp_path / "float.wav"
    sf.write(path, x.astype(np.float32), RATE, subtype="FLOAT")
    w, cols = load_one(path, contract)
    assert_normalised(w)
    expected = x.astype(np.float32).astype(np.float64)
    expected -= expected.mean()
    expected *= 0.1 / math.sqrt(np.mean(expected**2))
    np.testing.assert_allclose(w.numpy(), expected, rtol=0, atol=1e-7)
    assert cols["source_sample_rate"] == RATE and cols["duration_s"] == 2.0


def test_mp3(tmp_path, contract):
    if "MP3" not in sf.available_formats():
        pytest.skip(f"libsndfile {sf.__libsndfile_version__} cannot write MP3 (needs >= 1.1)")
    path = tmp_path / "tone.mp3"
    sf.write(path, sine(440, 44100, 2.5, 0.5), 44100, format="MP3", subtype="MPEG_LAYER_III")
    w, cols = load_one(path, contract)
    assert_normalised(w)
    t = np.arange(N) / RATE
    expected = 0.1 * math.sqrt(2) * np.sin(2 * np.pi * 440 * t)
    # lossy, but gapless: aligned with the original to well within a sample
    assert np.corrcoef(w.numpy()[1000:-1000], expected[1000:-1000])[0, 1] > 0.999
    assert cols["source_sample_rate"] == 44100


def test_six_channels_are_averaged(tmp_path, contract):
    freqs = [300, 600, 900, 1200, 1500, 1800]
    x = np.stack([sine(f, 32000, 2.2, 0.3) for f in freqs], axis=1)
    path = tmp_path / "six.wav"
    sf.write(path, x, 32000, subtype="PCM_24")
    w, cols = load_one(path, contract)
    assert_normalised(w)
    amplitudes, residual = fit_sines(w.numpy(), freqs)
    # six equal sines with total RMS 0.1: each has amplitude 0.1 * sqrt(2 / 6)
    np.testing.assert_allclose(amplitudes, 0.1 * math.sqrt(2 / 6), rtol=1e-3)
    assert residual < 1e-4
    assert cols["source_channels"] == 6


def test_stereo_with_equal_channels_equals_mono(tmp_path, contract):
    x = np.round(sine(440, 44100, 2.5, 0.3) * 32767) + np.round(sine(2300, 44100, 2.5, 0.1) * 32767)
    mono = load_one(write_pcm_wav(tmp_path / "mono.wav", x, 44100, 2), contract)[0]
    stereo = load_one(write_pcm_wav(tmp_path / "stereo.wav", np.stack([x, x], 1), 44100, 2), contract)[0]
    torch.testing.assert_close(stereo, mono, rtol=0, atol=0)
    coch = Cochleagram()
    with torch.no_grad():
        torch.testing.assert_close(coch(stereo[None]), coch(mono[None]), rtol=0, atol=0)


def test_short_clip_is_zero_padded_and_flagged(tmp_path, contract):
    path = tmp_path / "short.wav"
    sf.write(path, sine(1000, 22050, 0.05, 0.5), 22050, subtype="PCM_16")
    w, cols = load_one(path, contract)
    assert_normalised(w)
    real = int(math.ceil(0.05 * 22050 * 400 / 441))  # resample_poly's output length: 1000
    assert torch.all(w[real:] == 0) and torch.all(w[real - 10:real] != 0)
    assert cols["padded"] and cols["duration_s"] == pytest.approx(real / RATE)
    assert not cols["silent"]


def test_silent_clip_stays_zero_and_is_flagged(tmp_path, contract):
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros((44100 * 2, 2)), 44100, subtype="PCM_16")
    w, cols = load_one(path, contract)
    assert torch.isfinite(w).all() and torch.all(w == 0)
    assert cols["silent"] and not cols["padded"]


def test_constant_clip_is_silent(tmp_path, contract):
    path = tmp_path / "dc.wav"
    sf.write(path, np.full(RATE * 2, 0.25), RATE, subtype="FLOAT")
    w, cols = load_one(path, contract)
    assert torch.all(w == 0) and cols["silent"]


def test_loud_short_clip_is_flagged_clipped(tmp_path, contract):
    path = tmp_path / "click.wav"
    x = np.zeros(RATE * 2)
    x[1000] = 1.0  # one click: RMS 0.1 over 2 s puts it far above 1
    sf.write(path, x, RATE, subtype="FLOAT")
    w, cols = load_one(path, contract)
    assert_normalised(w)
    assert cols["clipped"] and w.abs().max() > 1


# --- bad files -------------------------------------------------------------------------


def test_check_reports_corrupt_and_empty_files(tmp_path, contract):
    sf.write(tmp_path / "good.wav", sine(440, RATE, 2.0), RATE)
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "corrupt.flac").write_bytes(b"fLaC" + bytes(range(256)) * 4)
    (tmp_path / "noise.mp3").write_bytes(b"\x00garbage" * 64)
    header_only = tmp_path / "zero_frames.wav"
    sf.write(header_only, np.zeros(0), RATE, subtype="PCM_16")
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.array([0.0, np.nan, 0.5], dtype=np.float32), RATE, subtype="FLOAT")

    source = AudioSource(tmp_path, contract)
    assert [s.id for s in source.stimuli] == [
        "corrupt.flac", "empty.wav", "good.wav", "nan.wav", "noise.mp3", "zero_frames.wav"]
    bad = {Path(b.path).name: b.reason for b in source.check()}
    assert set(bad) == {"corrupt.flac", "empty.wav", "nan.wav", "noise.mp3", "zero_frames.wav"}
    assert bad["empty.wav"] == "empty file (0 bytes)"
    assert "libsndfile" in bad["corrupt.flac"] and "libsndfile" in bad["noise.mp3"]
    assert "no audio frames" in bad["zero_frames.wav"]
    assert "NaN" in bad["nan.wav"]
    assert all(isinstance(b, BadFile) for b in source.check())

    with pytest.raises(DecodeError, match="empty file"):
        source.load(1)
    cols = source.columns()
    assert np.isnan(cols["duration_s"][1]) and cols["source_sample_rate"][1] == -1

    source.drop(source.check())
    assert [s.id for s in source.stimuli] == ["good.wav"]
    assert_normalised(source.load(0))
    assert len(source.columns()["padded"]) == 1


# --- length policies -------------------------------------------------------------------


@pytest.fixture()
def long_file(tmp_path) -> Path:
    """5.3 s at 44.1 kHz: a sweep, so that every window differs."""
    t = np.arange(int(44100 * 5.3)) / 44100
    path = tmp_path / "long.wav"
    sf.write(path, 0.3 * np.sin(2 * np.pi * (200 * t + 150 * t**2)), 44100, subtype="PCM_16")
    return path


def full_signal(path: Path) -> np.ndarray:
    from scipy.signal import resample_poly

    x, rate = sf.read(path, dtype="float64")
    return resample_poly(x, 200, 441)


def normalise(x: np.ndarray) -> np.ndarray:
    window = np.zeros(N)
    window[: len(x)] = x - x.mean()
    return window * 0.1 / math.sqrt(np.mean(window**2))


def test_start_decodes_only_what_it_needs_and_equals_the_whole_file(long_file, contract):
    source = AudioSource(long_file, contract)
    w = source.load(0)
    np.testing.assert_allclose(w.numpy(), normalise(full_signal(long_file)[:N]), rtol=0, atol=1e-7)
    assert len(source._cache[2]) < len(full_signal(long_file))  # a prefix was decoded


def test_center(long_file, contract):
    source = AudioSource(long_file, contract, clip="center")
    signal = full_signal(long_file)
    start = (len(signal) - N) // 2
    assert source.stimuli[0].onset == start / RATE
    np.testing.assert_allclose(source.load(0).numpy(), normalise(signal[start:start + N]), atol=1e-7)


def test_windows(long_file, contract):
    source = AudioSource(long_file, contract, clip="windows")
    assert [s.id for s in source.stimuli] == ["long.wav@0.000s", "long.wav@2.000s", "long.wav@4.000s"]
    assert source.check() == []
    cols = source.columns()
    np.testing.assert_array_equal(cols["onset_s"], [0.0, 2.0, 4.0])
    np.testing.assert_allclose(cols["duration_s"], [2.0, 2.0, 1.3])
    np.testing.assert_array_equal(cols["padded"], [0, 0, 1])
    assert len(set(cols["stimulus_sha256"])) == 1
    signal = full_signal(long_file)
    for i, start in enumerate([0, N, 2 * N]):
        np.testing.assert_allclose(source.load(i).numpy(), normalise(signal[start:start + N]), atol=1e-7)


def test_windows_with_hop(long_file, contract):
    source = AudioSource(long_file, contract, clip="windows", hop=1.25)
    assert [s.id for s in source.stimuli] == [
        "long.wav@0.000s", "long.wav@1.250s", "long.wav@2.500s", "long.wav@3.750s"]
    np.testing.assert_array_equal(source.columns()["padded"], [0, 0, 0, 1])
    assert source.settings()["hop"] == 1.25


def test_window_onsets():
    assert window_onsets(100, 40, 40) == [0, 40, 80]  # last padded
    assert window_onsets(80, 40, 40) == [0, 40]  # exact fit
    assert window_onsets(10, 40, 40) == [0]  # shorter than one window
    assert window_onsets(100, 40, 25) == [0, 25, 50, 75]
    assert window_onsets(100, 40, 70) == [0, 70]  # a gap, then a padded window
    assert window_onsets(100, 40, 110) == [0]  # the next window would start past the end


def test_options_are_checked(long_file, contract):
    with pytest.raises(ValueError, match="clip must be one of"):
        AudioSource(long_file, contract, clip="middle")
    with pytest.raises(ValueError, match="hop"):
        AudioSource(long_file, contract, hop=1.0)
    with pytest.raises(ValueError, match="audio input contract"):
        AudioSource(long_file, featx.get_entry("alexnet").input)


# --- records ---------------------------------------------------------------------------


def test_columns_and_settings(tmp_path, long_file, contract):
    sf.write(tmp_path / "b.flac", sine(300, 16000, 1.0), 16000)
    source = AudioSource(tmp_path, contract)
    cols = source.columns()  # decodes on demand
    assert set(cols) == {"stimulus_path", "stimulus_sha256", "stimulus_bytes", "onset_s", "duration_s",
                         "source_sample_rate", "source_channels", "padded", "silent", "clipped"}
    assert all(len(v) == len(source) == 2 for v in cols.values())
    np.testing.assert_array_equal(cols["source_sample_rate"], [16000, 44100])
    assert cols["padded"].dtype == np.uint8 and cols["onset_s"].dtype == np.float64
    settings = source.settings()
    assert settings["sample_rate"] == RATE and settings["n_samples"] == N and settings["clip"] == "start"
    assert settings["rms"] == 0.1 and settings["demean"] is True


def test_source_pickles_without_its_cache(long_file, contract):
    source = AudioSource(long_file, contract)
    source.load(0)
    copy = pickle.loads(pickle.dumps(source))
    assert copy._cache is None
    torch.testing.assert_close(copy.load(0), source.load(0), rtol=0, atol=0)


def test_stimulus_list_ids_and_order(tmp_path, contract):
    for name in ("a.wav", "b.wav"):
        sf.write(tmp_path / name, sine(440, RATE, 4.0), RATE)
    listing = tmp_path / "list.csv"
    listing.write_text("id,path\nsecond,b.wav\nfirst,a.wav\n")
    source = AudioSource(None, contract, clip="windows", stimuli_list=listing)
    assert [s.id for s in source.stimuli] == [
        "second@0.000s", "second@2.000s", "first@0.000s", "first@2.000s"]
