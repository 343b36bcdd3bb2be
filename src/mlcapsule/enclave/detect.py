"""Detections from a stream of class posteriors, and the policy that charges per detection.

Pure numpy. The host uses :class:`Detector` to turn the posteriors of overlapping windows into
detections when a capsule is charged per window (it sees the posteriors then anyway). When the
provider's signed policy says ``charge: {"per": "detection", ...}`` (manifest ``policy.charge``),
the enclave runs the same detector itself, on its own parameters, and answers each window with
nothing but the detection: a row of zeros, or a one at the class detected. Only a detection is
charged, so the smoothing, the threshold and the refractory period must run where the client
cannot change them: in here. Rules, per window, in order:

* the posteriors are averaged over the last ``smoothing`` windows (fewer at the start);
* the best class that is not a background class (silence, unknown) is detected when its smoothed
  posterior reaches ``threshold`` and no detection came in the last ``refractory`` windows.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import FormatError


@dataclass(frozen=True)
class ChargePolicy:
    per: str = "query"  # "query" (every row answered) or "detection"
    smoothing: int = 3  # windows averaged
    threshold: float = 0.6
    refractory: int = 3  # windows without a detection after one
    background: tuple[int, ...] = ()  # classes never detected

    def to_dict(self) -> dict[str, Any]:
        return {"per": self.per, "smoothing": self.smoothing, "threshold": self.threshold,
                "refractory": self.refractory, "background": list(self.background)}

    @classmethod
    def from_dict(cls, d: Any, where: str = "policy.charge") -> ChargePolicy:
        if not isinstance(d, dict) or set(d) - {"per", "smoothing", "threshold", "refractory", "background"}:
            raise FormatError(f"manifest: {where} must be an object with per, smoothing, threshold, "
                              "refractory and background")
        per = d.get("per", "query")
        smoothing, refractory = d.get("smoothing", 3), d.get("refractory", 3)
        threshold, background = d.get("threshold", 0.6), d.get("background", [])
        if per not in ("query", "detection"):
            raise FormatError(f"manifest: {where}.per must be 'query' or 'detection'")
        for name, v, lo, hi in (("smoothing", smoothing, 1, 1000), ("refractory", refractory, 0, 100_000)):
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise FormatError(f"manifest: {where}.{name} must be an integer from {lo} to {hi}")
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0 < float(threshold) <= 1:
            raise FormatError(f"manifest: {where}.threshold must be in (0, 1]")
        if not isinstance(background, list) or len(background) > 1000 or not all(
                isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in background):
            raise FormatError(f"manifest: {where}.background must be a list of class indices")
        return cls(per, smoothing, float(threshold), refractory, tuple(background))


class Detector:
    """Smoothing, threshold and refractory period over one stream of windows."""

    def __init__(self, policy: ChargePolicy, n_classes: int) -> None:
        self.policy = policy
        self.mask = np.ones(n_classes, bool)
        for b in policy.background:
            if b < n_classes:
                self.mask[b] = False
        self._recent: deque[np.ndarray] = deque(maxlen=policy.smoothing)
        self._sum = np.zeros(n_classes, np.float64)
        self._since = policy.refractory  # windows since the last detection
        self.windows = 0

    def push(self, probs: np.ndarray) -> tuple[int, float] | None:
        """One window's posteriors; the class detected and its smoothed score, or None."""
        p = np.asarray(probs, np.float64).reshape(-1)
        if p.shape != self._sum.shape or not np.all(np.isfinite(p)):
            raise ValueError("the posteriors do not match the detector's classes")
        if len(self._recent) == self._recent.maxlen:
            self._sum -= self._recent[0]
        self._recent.append(p)
        self._sum += p
        self.windows += 1
        self._since += 1
        smooth = np.where(self.mask, self._sum / len(self._recent), -1.0)
        best = int(np.argmax(smooth))
        score = float(smooth[best])
        if score >= self.policy.threshold and self._since > self.policy.refractory:
            self._since = 0
            return best, score
        return None
