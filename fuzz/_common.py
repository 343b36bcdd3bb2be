"""What every harness shares: the fixed context the seeds were made with, and the rule.

The rule: a parser on a trust boundary, given any bytes, either accepts them or raises one of our
errors (:class:`mlcapsule.enclave.errors.MlcapsuleError` and its subclasses). Anything else that
escapes a harness's ``TestOneInput`` (a ``KeyError``, a ``TypeError``, a numpy ``ValueError``, a
``RecursionError``, a hang, a crash) is a finding: libFuzzer stops and writes the input.

Harnesses import mlcapsule inside :func:`instrumented` so that atheris instruments only our code
(coverage feedback for mlcapsule, not for numpy or FastAPI). When a test imports a harness (to
replay the corpus, tests/test_fuzz_regressions.py) nothing is instrumented.

The context (keys, certificates, recorded collateral) lives in ``fuzz/data/`` and is written by
``fuzz/make_corpus.py`` together with the seeds: the harnesses need neither the network nor the
shared attestation vectors.
"""

from __future__ import annotations

import base64
import contextlib
import json
import struct
import sys
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

FUZZ = Path(__file__).resolve().parent
DATA = FUZZ / "data"
CORPUS = FUZZ / "corpus"


def instrumented(main: bool) -> contextlib.AbstractContextManager[Any]:
    """``atheris.instrument_imports`` for mlcapsule when the harness runs as a fuzzer, else nothing."""
    if not main:
        return contextlib.nullcontext()
    import atheris

    return atheris.instrument_imports(include=["mlcapsule"])


@cache
def context() -> dict[str, Any]:
    """fuzz/data/context.json: the fixed values the seeds were made with."""
    return json.loads((DATA / "context.json").read_text())


def data_file(name: str) -> bytes:
    return (DATA / name).read_bytes()


def b64(text: str) -> bytes:
    return base64.b64decode(text)


def split(data: bytes, modes: int) -> tuple[int, bytes]:
    """(mode, rest): the first byte picks what the rest is fed to (a seed's first byte is its mode)."""
    if not data:
        return 0, b""
    return data[0] % modes, data[1:]


def json_or_none(data: bytes) -> Any:
    """The JSON value of ``data``, or None if it is not JSON (harness-side parsing, not the target's)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def u32(data: bytes, at: int = 0) -> int:
    return struct.unpack_from("<I", data.ljust(at + 4, b"\0"), at)[0]


def main(test_one_input: Callable[[bytes], None]) -> None:
    """Run ``test_one_input`` under libFuzzer with this process's arguments (-max_total_time, -seed, ...)."""
    import atheris

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


@contextlib.contextmanager
def ours() -> Iterator[None]:
    """Swallow our errors; everything else propagates (and is a finding)."""
    from mlcapsule.enclave.errors import MlcapsuleError

    try:
        yield
    except MlcapsuleError:
        pass
