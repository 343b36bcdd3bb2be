"""Keyword-spotting data made on this machine with espeak-ng (no speech data set is downloaded).

Each utterance is one word spoken by espeak-ng with a voice (an English accent) and a variant
(``+m3``, ``+f2``, ``+whisper``, ...), a speed, a pitch and an amplitude, resampled from 22,050
to 16,000 Hz mono. Each clip is one second: the word at a random place (time shift), sometimes
through a simple reverberation (an exponentially decaying noise impulse response), under
background noise (white, pink, brown or mains hum) at one of several SNRs, at a random level.
Silence clips are noise alone; unknown clips are other words.

The test set holds out whole voices *and* whole variants: a test clip's accent and variant are
never heard in training, so its accuracy measures generalisation, not memorised voices. The
set is cached (``$MLCAPSULE_HOME/kws`` or ``~/.cache/mlcapsule/kws``) under a hash of its recipe.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..enclave.errors import UsageError
from . import KEYWORDS, SAMPLE_RATE, SILENCE, UNKNOWN, WINDOW

ESPEAK_RATE = 22_050
TRAIN_VOICES = ("en-us", "en-gb", "en-gb-x-rp", "en-gb-x-gbclan", "en-us-nyc", "en-gb-x-gbcwmd")
TEST_VOICES = ("en-029", "en-gb-scotland")
TRAIN_VARIANTS = ("", "m1", "m2", "m4", "m5", "m7", "f1", "f2", "f4", "f5", "klatt", "klatt3", "adam", "alex",
                  "andy", "anika", "belinda", "benjamin", "caleb", "david", "edward", "grandpa", "john",
                  "linda", "max", "michael", "norbert", "paul", "quincy", "robert", "steph", "travis")
TEST_VARIANTS = ("m3", "m6", "f3", "klatt2", "aunty", "boris", "gustave", "shelby", "victor", "iven")
UNKNOWN_WORDS = ("cat", "dog", "house", "tree", "bird", "bed", "happy", "wow", "marvin", "sheila", "one",
                 "two", "three", "four", "five", "six", "seven", "eight", "nine", "zero", "learn", "follow",
                 "forward", "backward", "visual", "table", "water", "green", "music", "window", "yellow",
                 "later", "today", "hello", "person", "maybe", "open", "little", "paper", "morning")
#: Words that are neither keywords nor in UNKNOWN_WORDS: the example's sentences use them.
OTHER_WORDS = ("please", "the", "light", "then", "kitchen", "quickly", "after", "music", "weather", "and",
               "turn", "volume", "coffee", "tomorrow", "garden", "window", "bright")
SNRS_DB = (5.0, 10.0, 20.0, 30.0)


def espeak_path() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise UsageError("espeak-ng is not installed; the keyword-spotting data is synthesised with it",
                         hint="install it: sudo apt-get install espeak-ng")
    return path


@dataclass(frozen=True)
class Voice:
    voice: str
    variant: str
    speed: int  # words per minute
    pitch: int  # 0-99
    amplitude: int  # 0-200

    def spec(self) -> str:
        return self.voice + (f"+{self.variant}" if self.variant else "")


def synth(word: str, v: Voice) -> np.ndarray:
    """One word from espeak-ng, float32 at 16 kHz mono, leading and trailing silence trimmed."""
    out = subprocess.run([espeak_path(), "-v", v.spec(), "-s", str(v.speed), "-p", str(v.pitch),
                          "-a", str(v.amplitude), "--stdout", word], capture_output=True, check=False, timeout=30)
    raw = out.stdout
    if out.returncode != 0 or len(raw) < 46 or raw[:4] != b"RIFF":
        raise UsageError(f"espeak-ng failed on {word!r} with voice {v.spec()}: {out.stderr.decode()[:200]}",
                         hint="check that `espeak-ng -v en-us hello` works")
    pcm = np.frombuffer(raw[44:len(raw) - (len(raw) - 44) % 2], dtype="<i2").astype(np.float32) / 32768.0
    y = resample(pcm, ESPEAK_RATE, SAMPLE_RATE)
    loud = np.flatnonzero(np.abs(y) > 0.01 * max(float(np.abs(y).max()), 1e-6))
    if len(loud):
        y = y[max(loud[0] - 160, 0):loud[-1] + 160]
    return np.ascontiguousarray(y[:WINDOW])


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Band-limited resampling through the FFT (numpy only)."""
    if rate_in == rate_out or len(x) == 0:
        return np.asarray(x, np.float32)
    n_out = max(1, int(round(len(x) * rate_out / rate_in)))
    spec = np.fft.rfft(np.asarray(x, np.float64))
    keep = min(len(spec), n_out // 2 + 1)
    out = np.fft.irfft(spec[:keep], n_out) * (n_out / len(x))
    return out.astype(np.float32)


# -- augmentation ------------------------------------------------------------------------------------
def noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS background noise: white, pink (1/f), brown (1/f^2) or mains hum."""
    if kind == "hum":
        t = np.arange(n) / SAMPLE_RATE
        f0 = rng.choice([50.0, 60.0])
        x = sum(rng.uniform(0.2, 1.0) * np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6.3)) for k in (1, 2, 3, 5))
        x = np.asarray(x) + 0.05 * rng.standard_normal(n)
    else:
        white = rng.standard_normal(n)
        if kind == "white":
            x = white
        else:
            spec = np.fft.rfft(white)
            f = np.maximum(np.fft.rfftfreq(n, 1 / SAMPLE_RATE), 20.0)
            spec /= np.sqrt(f) if kind == "pink" else f
            x = np.fft.irfft(spec, n)
    x = x - x.mean()
    return (x / max(float(np.sqrt(np.mean(x ** 2))), 1e-9)).astype(np.float32)


def reverb(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A simple room: the direct sound and an exponentially decaying noise tail (RT60 0.1-0.5 s)."""
    rt60 = rng.uniform(0.1, 0.5)
    n = int(rt60 * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    ir = rng.standard_normal(n) * np.exp(-6.9 * t / rt60) * rng.uniform(0.1, 0.4)
    ir[0] = 1.0
    n_fft = 1 << int(np.ceil(np.log2(len(x) + n)))
    y = np.fft.irfft(np.fft.rfft(x, n_fft) * np.fft.rfft(ir, n_fft), n_fft)[:len(x)]
    return (y * (np.abs(x).max() / max(float(np.abs(y).max()), 1e-9))).astype(np.float32)


def place(word: np.ndarray, rng: np.random.Generator, length: int = WINDOW) -> np.ndarray:
    """The word at a random offset in a clip of ``length`` samples (time shift)."""
    clip = np.zeros(length, np.float32)
    w = word[:length]
    start = int(rng.integers(0, length - len(w) + 1))
    clip[start:start + len(w)] = w
    return clip


def add_noise(x: np.ndarray, rng: np.random.Generator, snr_db: float | None = None) -> np.ndarray:
    kind = str(rng.choice(["white", "pink", "brown", "hum"]))
    snr = float(rng.choice(SNRS_DB)) if snr_db is None else snr_db
    p = float(np.mean(x ** 2))
    if p <= 0:
        return x
    return (x + noise(kind, len(x), rng) * np.sqrt(p / 10 ** (snr / 10))).astype(np.float32)


def augment(word: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = place(word, rng)
    if rng.random() < 0.3:
        x = reverb(x, rng)
    if rng.random() < 0.8:
        x = add_noise(x, rng)
    return level(x, rng)


def level(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    peak = float(np.abs(x).max())
    return (x * (rng.uniform(0.05, 0.9) / peak) if peak > 0 else x).astype(np.float32)


def silence_clip(rng: np.random.Generator) -> np.ndarray:
    kind = str(rng.choice(["white", "pink", "brown", "hum", "none"]))
    if kind == "none":
        return (1e-4 * rng.standard_normal(WINDOW)).astype(np.float32)
    return (noise(kind, WINDOW, rng) * rng.uniform(0.001, 0.2)).astype(np.float32)


# -- the data set ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """What a data set is made of; its hash names the cache file."""

    keywords: tuple[str, ...] = KEYWORDS
    train_per_word: int = 300
    test_per_word: int = 60
    unknown_train: int = 600
    unknown_test: int = 120
    silence_train: int = 300
    silence_test: int = 60
    seed: int = 0
    train_voices: tuple[str, ...] = TRAIN_VOICES
    test_voices: tuple[str, ...] = TEST_VOICES
    train_variants: tuple[str, ...] = TRAIN_VARIANTS
    test_variants: tuple[str, ...] = TEST_VARIANTS
    unknown_words: tuple[str, ...] = UNKNOWN_WORDS
    version: int = field(default=2)

    @property
    def classes(self) -> tuple[str, ...]:
        return (SILENCE, UNKNOWN, *self.keywords)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def tiny(cls, keywords: Sequence[str] = ("yes", "stop")) -> Recipe:
        """A few clips per class, for tests: trains in seconds."""
        return cls(keywords=tuple(keywords), train_per_word=60, test_per_word=10, unknown_train=60,
                   unknown_test=10, silence_train=40, silence_test=8,
                   train_voices=("en-us", "en-gb"), test_voices=("en-029",),
                   train_variants=("", "m1", "f2", "m4"), test_variants=("m3",))


@dataclass
class Dataset:
    recipe: Recipe
    x_train: np.ndarray  # float32 [N, 16000]
    y_train: np.ndarray  # int64 [N]
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def classes(self) -> tuple[str, ...]:
        return self.recipe.classes


def cache_dir() -> Path:
    home = os.environ.get("MLCAPSULE_HOME")
    base = Path(home) if home else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlcapsule"
    return base / "kws"


def random_voice(rng: np.random.Generator, voices: Sequence[str], variants: Sequence[str]) -> Voice:
    return Voice(str(rng.choice(list(voices))), str(rng.choice(list(variants))), int(rng.integers(110, 230)),
                 int(rng.integers(20, 85)), int(rng.integers(60, 170)))


def _jobs(recipe: Recipe, split: str, rng: np.random.Generator) -> list[tuple[str, Voice, int]]:
    voices = recipe.train_voices if split == "train" else recipe.test_voices
    variants = recipe.train_variants if split == "train" else recipe.test_variants
    per_word = recipe.train_per_word if split == "train" else recipe.test_per_word
    n_unknown = recipe.unknown_train if split == "train" else recipe.unknown_test
    jobs = [(w, random_voice(rng, voices, variants), 2 + i) for i, w in enumerate(recipe.keywords)
            for _ in range(per_word)]
    jobs += [(str(rng.choice(list(recipe.unknown_words))), random_voice(rng, voices, variants), 1)
             for _ in range(n_unknown)]
    return jobs


def build(recipe: Recipe, *, workers: int = 4, log: Any = None) -> Dataset:
    """Synthesise and augment the data set (no cache)."""
    rng = np.random.default_rng(recipe.seed)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in ("train", "test"):
        jobs = _jobs(recipe, split, rng)
        if log:
            log(f"[kws] synthesising {len(jobs)} {split} words with espeak-ng")
        with ThreadPoolExecutor(workers) as pool:
            words = list(pool.map(lambda j: synth(j[0], j[1]), jobs))
        n_sil = recipe.silence_train if split == "train" else recipe.silence_test
        xs = [augment(w, rng) for w in words] + [silence_clip(rng) for _ in range(n_sil)]
        ys = [j[2] for j in jobs] + [0] * n_sil
        out[split] = (np.stack(xs).astype(np.float32), np.asarray(ys, np.int64))
    return Dataset(recipe, out["train"][0], out["train"][1], out["test"][0], out["test"][1])


def load(recipe: Recipe | None = None, *, cache: Path | None = None, log: Any = None) -> Dataset:
    """The data set of ``recipe``, from the cache when it was made before."""
    recipe = recipe or Recipe()
    path = (cache or cache_dir()) / f"kws-{recipe.digest()}.npz"
    if path.exists():
        with np.load(path) as z:
            return Dataset(recipe, z["x_train"], z["y_train"], z["x_test"], z["y_test"])
    ds = build(recipe, log=log)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
    np.savez(tmp, x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test)
    os.replace(tmp, path)
    return ds


# -- streams for the example and the tests -----------------------------------------------------------
@dataclass(frozen=True)
class Spoken:
    word: str
    start: float  # seconds
    end: float


def sentence(words: Sequence[str], *, seed: int = 0, voices: Sequence[str] = TEST_VOICES,
             variants: Sequence[str] = TEST_VARIANTS, gap: tuple[float, float] = (0.4, 1.2),
             snr_db: float | None = 20.0, lead: float = 1.0) -> tuple[np.ndarray, list[Spoken]]:
    """``words`` spoken one after another by held-out voices, with pauses, over background
    noise at ``snr_db`` (relative to the speech's mean power); returns the audio (float32,
    16 kHz) and where each word is."""
    rng = np.random.default_rng(seed)
    parts: list[np.ndarray] = [np.zeros(int(lead * SAMPLE_RATE), np.float32)]
    spoken: list[Spoken] = []
    pos = len(parts[0])
    for w in words:
        y = synth(w, random_voice(rng, voices, variants))
        y = y * (rng.uniform(0.3, 0.8) / max(float(np.abs(y).max()), 1e-6))
        spoken.append(Spoken(w, pos / SAMPLE_RATE, (pos + len(y)) / SAMPLE_RATE))
        pause = np.zeros(int(rng.uniform(*gap) * SAMPLE_RATE), np.float32)
        parts += [y.astype(np.float32), pause]
        pos += len(y) + len(pause)
    parts.append(np.zeros(int(lead * SAMPLE_RATE), np.float32))
    audio = np.concatenate(parts)
    if snr_db is not None:
        speech = np.concatenate([p for p in parts if np.any(p)]) if any(np.any(p) for p in parts) else audio
        p = float(np.mean(speech ** 2))
        audio = audio + noise("pink", len(audio), rng) * np.sqrt(p / 10 ** (snr_db / 10))
    return np.clip(audio, -1, 1).astype(np.float32), spoken
