"""The enclave: trusted code that runs in an isolated worker, and the host-side proxy to it.

Trusted computing base (measured, see :mod:`.measurement`): this package (except ``host.py``),
``mlcapsule.runtime``, ``mlcapsule.format``, ``mlcapsule.crypto``, ``errors.py`` and ``_util.py``.
It contains no network code.
"""
