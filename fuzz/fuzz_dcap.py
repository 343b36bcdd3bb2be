"""Shared by fuzz_sgx.py and fuzz_tdx.py: an Intel DCAP quote and its collateral, each fuzzed.

Input: a mode byte, then
  0: the quote, verified with the recorded collateral;
  1: the collateral (the PCS responses, JSON), with the recorded quote.
Both go through the parser (``parse_*_quote``) and ``verify_*`` (dcap-qvl, then this project's
cross-check, TCB status, identity and report_data checks) at a time inside the collateral's
validity, under a policy that accepts the recorded quote.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from _common import data_file, ours, split

#: Inside the recorded SGX and TDX v4 collateral's validity (2025-06-19 .. 2025-07-19).
NOW = int(dt.datetime(2025, 7, 1, tzinfo=dt.UTC).timestamp())


def harness(kind: str, parse: Callable[[bytes], Any], verify: Callable[..., Any],
            policy: Any) -> Callable[[bytes], None]:
    quote, collateral = data_file(f"{kind}_quote"), data_file(f"{kind}_collateral.json")

    def test_one_input(data: bytes) -> None:
        mode, rest = split(data, 2)
        q, c = (rest, collateral) if mode == 0 else (quote, rest)
        with ours():
            parse(q)
        with ours():
            verify(q, c, policy=policy, now=NOW, expected_report_data=None)
        with ours():
            verify(q, c, policy=policy, now=NOW, expected_report_data=bytes(32))

    return test_one_input
