"""Private keyword spotting (issue 16): the Offline Model Guard use case as a capsule.

A provider trains a small DS-CNN on speech synthesised here with espeak-ng
(:mod:`.data`), with the log-mel front end inside the ONNX graph (:mod:`.frontend`, opset 17
STFT and MelWeightMatrix), and packs it; a client runs it on a live audio stream with
``mlcapsule listen`` or :meth:`mlcapsule.Capsule.stream` (:mod:`.stream`). The audio goes only
into the enclave. Only :mod:`.train` imports torch; the enclave never imports this package.
"""

from __future__ import annotations

SAMPLE_RATE = 16_000
#: One window is one second of audio.
WINDOW = SAMPLE_RATE
KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
SILENCE = "_silence_"
UNKNOWN = "_unknown_"
#: The model's classes, in output order: silence and unknown first (never detected).
CLASSES = (SILENCE, UNKNOWN, *KEYWORDS)
BACKGROUND = (0, 1)

__all__ = ["SAMPLE_RATE", "WINDOW", "KEYWORDS", "SILENCE", "UNKNOWN", "CLASSES", "BACKGROUND"]
