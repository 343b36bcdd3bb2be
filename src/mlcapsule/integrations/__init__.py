"""Bridges between mlcapsule and other libraries, each imported only when used.

* :mod:`mlcapsule.integrations.art`: a capsule (or any :mod:`mlcapsule.attacks` oracle) as an
  adversarial-robustness-toolbox ``BlackBoxClassifier``, so that ART's attacks run against it
  (``pip install 'mlcapsule[attacks]'``).

Importing this package imports nothing from those libraries.
"""

from __future__ import annotations

__all__: list[str] = []
