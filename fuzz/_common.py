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
import copy
import json
import random
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


def main(test_one_input: Callable[[bytes], None], *, json_input: bool = False, prefix: int = 0,
         nul_tail: bool = False) -> None:
    """Run ``test_one_input`` under libFuzzer with this process's arguments (-max_total_time, -seed, ...).

    ``json_input``: the input is JSON after ``prefix`` mode bytes (and, with ``nul_tail``, before a
    NUL and a binary tail). Half of the mutations are then structure-aware (:func:`mutate_json`:
    a value of another type, a lone surrogate, an absurd number, a key dropped or added...), which
    reach the schemas that byte flips rarely get past the JSON parser with; the other half are
    libFuzzer's own byte mutations.
    """
    import atheris

    if not json_input:
        atheris.Setup(sys.argv, test_one_input)
    else:
        def mutator(data: bytes, max_size: int, seed: int) -> bytes:
            if seed % 2:
                return atheris.Mutate(data, max_size)
            head, body = data[:prefix], data[prefix:]
            tail = b""
            if nul_tail:
                body, sep, rest = body.partition(b"\0")
                tail = sep + rest
            doc = json_or_none(body)
            if doc is None:
                return atheris.Mutate(data, max_size)
            # The "deep" marker becomes 1,500 open brackets: the JSON decoder's RecursionError.
            text = json.dumps(mutate_json(random.Random(seed), doc)).replace(_DEEP_JSON, "[" * 1500)
            out = head + text.encode() + tail
            return out if len(out) <= max_size else atheris.Mutate(data, max_size)

        atheris.Setup(sys.argv, test_one_input, custom_mutator=mutator)
    atheris.Fuzz()


#: Values a structure-aware mutation puts in the place of another: every JSON type, the edges of
#: the integer types, non-finite numbers (Python's json reads NaN and Infinity), a lone surrogate,
#: strings that look like base64, hex digests or times, and nesting (the last one, a marker, becomes
#: nesting deeper than Python's JSON decoder takes).
SPECIAL: tuple[Any, ...] = (
    None, True, False, 0, -1, 1, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30, 1.5, -0.0, 1e308, float("nan"),
    float("inf"), "", "x", "x" * 300, "\ud800", "0" * 64, "A" * 44, "AAAA", "2030-01-01T00:00:00",
    "2030-01-01T00:00:00+00:00", "yesterday", "\x00", [], {}, [[]], {"a": 1}, [1, 2], ["x"], [[[[[[[[[[]]]]]]]]]],
    "\x00deep\x00")
_DEEP_JSON = json.dumps("\x00deep\x00")


def _paths(doc: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield at
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*at, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*at, i))


def _get(doc: Any, at: tuple[Any, ...]) -> Any:
    for k in at:
        doc = doc[k]
    return doc


def mutate_json(rng: random.Random, doc: Any) -> Any:
    """One to three structure-aware edits of a copy of ``doc``."""
    doc = copy.deepcopy(doc)
    for _ in range(rng.randint(1, 3)):
        paths = list(_paths(doc))
        at = rng.choice(paths)
        r = rng.random()
        if not at:
            if r < 0.05:
                return copy.deepcopy(rng.choice(SPECIAL))
            continue
        parent, k = _get(doc, at[:-1]), at[-1]
        if r < 0.55:
            parent[k] = copy.deepcopy(rng.choice(SPECIAL))
        elif r < 0.65:
            parent[k] = copy.deepcopy(_get(doc, rng.choice(paths)))
        elif r < 0.75:
            del parent[k]
        elif r < 0.85:
            if isinstance(parent, dict):
                parent[f"extra{rng.randint(0, 9)}"] = copy.deepcopy(rng.choice(SPECIAL))
            else:
                parent.append(copy.deepcopy(parent[k]))
        else:
            v = parent[k]
            if isinstance(v, int) and not isinstance(v, bool):
                parent[k] = v + rng.choice([-1, 1, -v - 1, 10**6, -(10**6)])
            elif isinstance(v, str):
                parent[k] = v[:rng.randint(0, len(v))] + rng.choice(["", "=", "a", "\u00e9", "0"])
    return doc


@contextlib.contextmanager
def ours() -> Iterator[None]:
    """Swallow our errors; everything else propagates (and is a finding)."""
    from mlcapsule.enclave.errors import MlcapsuleError

    try:
        yield
    except MlcapsuleError:
        pass
