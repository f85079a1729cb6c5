"""Make the example sounds in this folder (run from anywhere: ``python make_sounds.py``).

Everything is synthesised with numpy; nothing is recorded or downloaded, so the
files are our own and are dedicated to the public domain (CC0). The set differs in
sample rate, bit depth, channel count and container on purpose, so that it exercises
featx's decoding, mono mixing and resampling:

* ``am_tone_22k_stereo.wav``: 22.05 kHz, 16-bit WAV, 2 channels, 2.0 s. A 1 kHz tone
  with 4 Hz amplitude modulation (depth 0.8); the right channel is the left at half
  amplitude.
* ``chirp_16k.flac``: 16 kHz, 16-bit FLAC, mono, 2.5 s. A logarithmic sweep from
  100 Hz to 6 kHz.
* ``harmonic_tone_8k_u8.wav``: 8 kHz, unsigned 8-bit WAV, mono, 2.0 s. A 200 Hz
  complex tone (harmonics 1-10 with amplitudes 1/k).
* ``noise_burst_48k_24bit.flac``: 48 kHz, 24-bit FLAC, mono, 3.0 s. A white-noise burst
  from 0.8 s to 1.6 s in silence.

Every sound starts and ends with 10 ms raised-cosine ramps.
The noise is drawn from ``numpy.random.default_rng(0)``, so the files are the same on
every run (up to the FLAC encoder's version).
"""

from pathlib import Path

import numpy as np
import soundfile as sf

HERE = Path(__file__).resolve().parent


def _t(rate: int, seconds: float) -> np.ndarray:
    return np.arange(int(round(rate * seconds))) / rate


def _ramp(x: np.ndarray, rate: int, seconds: float = 0.01) -> np.ndarray:
    """Raised-cosine onset and offset ramps, so that the sound starts and ends at zero."""
    n = int(rate * seconds)
    window = np.ones(len(x))
    window[:n] = 0.5 - 0.5 * np.cos(np.pi * np.arange(n) / n)
    window[len(x) - n:] = window[:n][::-1]
    return x * window


def am_tone(rate: int = 22050) -> np.ndarray:
    t = _t(rate, 2.0)
    mono = _ramp(0.4 * (1 + 0.8 * np.sin(2 * np.pi * 4 * t)) / 1.8 * np.sin(2 * np.pi * 1000 * t), rate)
    return np.stack([mono, 0.5 * mono], axis=1)


def chirp(rate: int = 16000, f0: float = 100.0, f1: float = 6000.0, seconds: float = 2.5) -> np.ndarray:
    t = _t(rate, seconds)
    k = np.log(f1 / f0) / seconds
    return _ramp(0.3 * np.sin(2 * np.pi * f0 * (np.exp(k * t) - 1) / k), rate)


def harmonic_tone(rate: int = 8000, f0: float = 200.0) -> np.ndarray:
    t = _t(rate, 2.0)
    x = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 11))
    return _ramp(0.5 * x / np.abs(x).max(), rate)


def noise_burst(rate: int = 48000) -> np.ndarray:
    x = np.zeros(int(rate * 3.0))
    start, stop = int(rate * 0.8), int(rate * 1.6)
    noise = np.random.default_rng(0).standard_normal(stop - start)
    x[start:stop] = _ramp(0.1 * noise, rate)
    return x


def main() -> None:
    sf.write(HERE / "am_tone_22k_stereo.wav", am_tone(), 22050, subtype="PCM_16")
    sf.write(HERE / "chirp_16k.flac", chirp(), 16000, subtype="PCM_16")
    sf.write(HERE / "harmonic_tone_8k_u8.wav", harmonic_tone(), 8000, subtype="PCM_U8")
    sf.write(HERE / "noise_burst_48k_24bit.flac", noise_burst(), 48000, subtype="PCM_24")


if __name__ == "__main__":
    main()
