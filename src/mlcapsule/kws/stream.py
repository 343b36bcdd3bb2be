"""Streaming keyword spotting over a capsule: windows, smoothing, threshold, refractory period.

No torch here: this is the client's side. Audio arrives in chunks of any size (16 kHz mono,
int16 or float in [-1, 1]); every ``hop`` seconds the last second goes to the enclave as one
window. What is charged depends on the capsule's signed policy (``policy.charge``):

* per window (the default): the enclave answers each window with its posteriors, charged one
  query each; the detector (smoothing, threshold, refractory period) runs here, on the
  client's parameters;
* per detection: the enclave runs the detector itself on the provider's parameters and answers
  each window with the detection alone (no score), charged only when there is one; the client's
  parameters are not used (enclave/detect.py).

The client holds at most one window of audio (64 KB) besides what the caller passes in.
"""

from __future__ import annotations

import math
import queue
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..enclave.detect import ChargePolicy, Detector
from ..enclave.errors import InputError, UsageError
from . import SAMPLE_RATE, WINDOW

#: The defaults: chosen on two generated streams (seeds 2 and 3) of held-out voices, for the best
#: F1 of precision and recall; BENCHMARKS.md reports another stream (seed 1).
HOP = 0.25  # seconds
SMOOTHING = 3  # windows
THRESHOLD = 0.6
REFRACTORY = 0.75  # seconds


@dataclass(frozen=True)
class Detection:
    time: float  # seconds from the start of the stream to the end of the window that fired
    label: str
    index: int  # class index
    score: float | None  # the smoothed posterior; None when the enclave detects (per-detection charging)
    window: int  # 0-based index of the window

    def to_dict(self) -> dict[str, Any]:
        return {"time": round(self.time, 3), "label": self.label, "index": self.index,
                "score": None if self.score is None else round(self.score, 4), "window": self.window}


def as_float(chunk: Any) -> np.ndarray:
    """A chunk of 16 kHz mono audio as float32 in [-1, 1] (int16 is scaled by 1/32768)."""
    a = np.asarray(chunk)
    if a.ndim == 2 and 1 in a.shape:
        a = a.reshape(-1)
    if a.ndim != 1:
        raise InputError(f"audio chunks must be 1-D mono samples, got shape {list(a.shape)}",
                         hint="mix stereo down to mono first (e.g. x.mean(axis=1))")
    if a.dtype == np.int16:
        return a.astype(np.float32) / 32768.0
    if not np.issubdtype(a.dtype, np.floating):
        raise InputError(f"audio chunks must be int16 or float samples, got {a.dtype}")
    return a.astype(np.float32, copy=False)


def windows(frames: Iterable[Any], hop: int) -> Iterator[tuple[int, np.ndarray]]:
    """(end sample, one-second window) every ``hop`` samples, from chunks of any size."""
    if hop < 1:
        raise UsageError("the hop must be at least one sample")
    buf = np.zeros(WINDOW, np.float32)
    total = 0  # samples received
    next_end = WINDOW
    for chunk in frames:
        x = as_float(chunk)
        while len(x):
            # Take no more than what completes the next window, so every window is emitted.
            take = min(len(x), next_end - total) if next_end > total else len(x)
            part, x = x[:take], x[take:]
            if len(part) >= WINDOW:
                buf[:] = part[-WINDOW:]
            else:
                buf[:-len(part)] = buf[len(part):]
                buf[-len(part):] = part
            total += len(part)
            if total == next_end:
                yield total, buf.copy()
                next_end += hop


def charge_policy(manifest: Any) -> ChargePolicy | None:
    """The capsule's policy when it is charged per detection, else None."""
    charge = manifest.policy.charge
    if not charge:
        return None
    policy = ChargePolicy.from_dict(charge)
    return policy if policy.per == "detection" else None


def background_classes(classes: tuple[str, ...]) -> tuple[int, ...]:
    """Classes never detected: those whose names start with '_' (``_silence_``, ``_unknown_``)."""
    return tuple(i for i, c in enumerate(classes) if c.startswith("_"))


def detect(cap: Any, frames: Iterable[Any], *, hop: float = HOP, smoothing: int = SMOOTHING,
           threshold: float = THRESHOLD, refractory: float = REFRACTORY,
           counter: dict[str, int] | None = None) -> Iterator[Detection]:
    """Detections in an audio stream run through the capsule ``cap`` (see the module docstring).

    ``hop`` and ``refractory`` are in seconds, ``smoothing`` in windows. ``counter``, if given,
    receives ``windows`` and ``detections`` as the stream goes."""
    m = cap.manifest
    if len(m.inputs) != 1 or len(m.outputs) != 1:
        raise UsageError("this capsule is not a keyword spotter (it needs one audio input and one output)")
    shape = m.inputs[0].shape
    if m.inputs[0].dtype != "float32" or len(shape) != 2 or shape[1] != WINDOW:
        raise UsageError(f"this capsule does not take one-second windows of 16 kHz audio (its input is "
                         f"{m.inputs[0].dtype} {list(shape)}; a keyword spotter takes float32 [N, {WINDOW}])")
    if not 0 < hop <= 10:
        raise UsageError("--hop must be between 0 and 10 seconds")
    hop_n = max(1, int(round(hop * SAMPLE_RATE)))
    n_classes = m.outputs[0].shape[1] if isinstance(m.outputs[0].shape[1], int) else None
    classes = tuple(m.class_names) if m.class_names else tuple(str(i) for i in range(n_classes or 0))
    enclave_detects = charge_policy(m) is not None
    det: Detector | None = None
    if not enclave_detects:
        policy = ChargePolicy("query", smoothing, threshold, math.ceil(refractory * SAMPLE_RATE / hop_n - 1e-9),
                              background_classes(classes))
        det = Detector(policy, len(classes))
    counts = counter if counter is not None else {}
    counts.setdefault("windows", 0)
    counts.setdefault("detections", 0)
    for i, (end, w) in enumerate(windows(frames, hop_n)):
        out = np.asarray(cap.predict(w[None, :]))[0]
        counts["windows"] += 1
        if det is None:
            if not np.any(out > 0):
                continue
            k, score = int(np.argmax(out)), None
        else:
            hit = det.push(out)
            if hit is None:
                continue
            k, score = hit[0], hit[1]
        counts["detections"] += 1
        yield Detection(end / SAMPLE_RATE, classes[k] if k < len(classes) else str(k), k, score, i)


# -- audio sources -----------------------------------------------------------------------------------
def read_wav(path: str | Path) -> np.ndarray:
    """A PCM WAV file as float32 16 kHz mono (other rates are resampled, channels averaged)."""
    import wave

    from .data import resample

    try:
        with wave.open(str(path), "rb") as w:
            rate, width, channels = w.getframerate(), w.getsampwidth(), w.getnchannels()
            raw = w.readframes(w.getnframes())
    except (wave.Error, EOFError, OSError) as e:
        raise InputError(f"{path} is not a PCM WAV file ({e})",
                         hint="convert it to 16-bit PCM WAV, e.g. ffmpeg -i IN -ac 1 -ar 16000 OUT.wav") from None
    a: np.ndarray
    if width == 1:
        a = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width in (2, 4):
        a = np.frombuffer(raw, f"<i{width}").astype(np.float32) / float(1 << (8 * width - 1))
    else:
        raise InputError(f"{path} has {8 * width}-bit samples", hint="convert it to 16-bit PCM WAV")
    a = a.reshape(-1, channels).mean(axis=1) if channels > 1 else a
    return resample(a, rate, SAMPLE_RATE) if rate != SAMPLE_RATE else a.astype(np.float32)


def write_wav(path: str | Path, audio: np.ndarray) -> None:
    """float audio in [-1, 1] as 16-bit PCM mono WAV at 16 kHz."""
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())


def chunks(audio: np.ndarray, size: int = 1600) -> Iterator[np.ndarray]:
    """``audio`` in chunks of ``size`` samples (100 ms), as a microphone would deliver it."""
    for i in range(0, len(audio), size):
        yield audio[i:i + size]


def microphone(seconds: float | None = None, block: int = 1600) -> Iterator[np.ndarray]:
    """Chunks from the default input device through ``sounddevice`` (16 kHz mono float32)."""
    import importlib

    try:
        sd: Any = importlib.import_module("sounddevice")
    except ImportError:
        raise UsageError("--mic needs the sounddevice package",
                         hint="pip install sounddevice (and the PortAudio library: sudo apt-get install "
                              "libportaudio2), or use --wav FILE") from None
    except OSError as e:  # the package is there, PortAudio is not
        raise UsageError(f"--mic: sounddevice cannot load PortAudio ({e})",
                         hint="sudo apt-get install libportaudio2, or use --wav FILE") from None
    q: queue.Queue[np.ndarray] = queue.Queue()

    def callback(indata: Any, frames: int, time: Any, status: Any) -> None:
        q.put(np.array(indata[:, 0], np.float32))

    left = None if seconds is None else int(seconds * SAMPLE_RATE)
    with sd.InputStream(samplerate=SAMPLE_RATE, channels=1, dtype="float32", blocksize=block, callback=callback):
        while left is None or left > 0:
            x = q.get()
            if left is not None:
                x = x[:left]
                left -= len(x)
            yield x
