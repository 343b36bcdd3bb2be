"""Wake-up mechanisms for the ECALL path, measured against each other (issue 10 item 7).

Every ECALL wakes the enclave process and then the host. This measures one round trip between
two Python processes (a one-byte request, a one-byte answer) for each mechanism the ECALL path
could use, in the same run and interleaved, so the ratios hold on a noisy machine:

* ``pipe``: a blocking ``os.read`` on a pipe each way (what the ECALL path uses today);
* ``seqpacket``: a ``SOCK_SEQPACKET`` socket pair (what the enclave service uses);
* ``eventfd``: ``os.eventfd`` each way (a counter in the kernel, no buffer);
* ``spin+pipe``: the waiter first spins on a byte of shared memory for up to ``SPIN_US``, then
  falls back to the pipe (a futex with a short spin, as far as Python can express it).

    python -m mlcapsule.bench.wakeups [--rounds N] [--out FILE.json]

The ``fixed`` suite of ``mlcapsule bench`` runs it too and puts the table in BENCHMARKS.md.
Alone, it prints median, mean and p99 per mechanism (microseconds) and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import select
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

SPIN_US = 50.0


def _stats(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {"median_us": statistics.median(s) * 1e6, "mean_us": statistics.fmean(s) * 1e6,
            "p99_us": s[min(len(s) - 1, int(0.99 * len(s)))] * 1e6, "min_us": s[0] * 1e6, "n": len(s)}


def _spin_wait(shm: mmap.mmap, want: int, fd: int) -> None:
    """Spin on the answer byte for up to SPIN_US, then sleep on the (non-blocking) pipe."""
    deadline = time.perf_counter() + SPIN_US / 1e6
    while time.perf_counter() < deadline:
        if shm[0] == want:
            return
    while shm[0] != want:
        select.select([fd], [], [])
        try:
            os.read(fd, 65536)
        except BlockingIOError:
            pass


def _pair(kind: str) -> tuple[Callable[[], None], Callable[[], None], Callable[[], None]]:
    """(client round trip, server loop, close) for one mechanism; the server runs in a fork."""
    if kind == "pipe":
        a_r, a_w = os.pipe()
        b_r, b_w = os.pipe()

        def rt() -> None:
            os.write(a_w, b"x")
            os.read(b_r, 1)

        def serve() -> None:
            while os.read(a_r, 1) == b"x":
                os.write(b_w, b"y")

        def close() -> None:
            os.write(a_w, b"q")
        return rt, serve, close
    if kind == "seqpacket":
        c, s = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

        def rt() -> None:
            c.send(b"x")
            c.recv(16)

        def serve() -> None:
            while s.recv(16) == b"x":
                s.send(b"y")

        def close() -> None:
            c.send(b"q")
        return rt, serve, close
    if kind == "eventfd":
        a, b = os.eventfd(0), os.eventfd(0)

        def rt() -> None:
            os.eventfd_write(a, 1)
            os.eventfd_read(b)

        def serve() -> None:
            while os.eventfd_read(a) == 1:
                os.eventfd_write(b, 1)

        def close() -> None:
            os.eventfd_write(a, 2)
        return rt, serve, close
    if kind == "spin+pipe":
        shm = mmap.mmap(-1, 2)
        a_r, a_w = os.pipe()
        b_r, b_w = os.pipe()
        os.set_blocking(b_r, False)
        state = {"seq": 0}

        def rt() -> None:
            state["seq"] = state["seq"] % 250 + 1
            shm[1] = state["seq"]  # the request
            os.write(a_w, b"x")  # the fallback wake-up; the server consumes it either way
            _spin_wait(shm, state["seq"], b_r)
            try:  # the server's fallback byte, if it came already (keeps the pipe short)
                os.read(b_r, 65536)
            except BlockingIOError:
                pass

        def serve() -> None:
            last = 0
            while True:
                deadline = time.perf_counter() + SPIN_US / 1e6
                while shm[1] == last and time.perf_counter() < deadline:
                    pass
                if os.read(a_r, 1) == b"q":
                    return
                last = shm[1]
                shm[0] = last  # the answer
                os.write(b_w, b"y")

        def close() -> None:
            os.write(a_w, b"q")
        return rt, serve, close
    raise ValueError(kind)


KINDS = ("pipe", "seqpacket", "eventfd", "spin+pipe")


def run(rounds: int, per_round: int) -> dict[str, dict[str, float]]:
    pairs = {}
    for kind in KINDS:
        rt, serve, close = _pair(kind)
        pid = os.fork()
        if pid == 0:
            try:
                serve()
            finally:
                os._exit(0)
        pairs[kind] = (rt, close, pid)
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    for kind in KINDS:  # warm up
        for _ in range(200):
            pairs[kind][0]()
    for _ in range(rounds):  # interleaved rounds: every mechanism sees the same machine
        for kind in KINDS:
            rt = pairs[kind][0]
            out = times[kind]
            for _ in range(per_round):
                t0 = time.perf_counter()
                rt()
                out.append(time.perf_counter() - t0)
    for _kind, (_rt, close, pid) in pairs.items():
        close()
        os.waitpid(pid, 0)
    return {k: _stats(v) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--per-round", type=int, default=500)
    ap.add_argument("--out", type=Path, default=Path("wakeups.json"))
    a = ap.parse_args()
    res = run(a.rounds, a.per_round)
    base = res["pipe"]["median_us"]
    for k, v in res.items():
        print(f"{k:10s} median {v['median_us']:7.1f} us  mean {v['mean_us']:7.1f}  p99 {v['p99_us']:8.1f}  "
              f"min {v['min_us']:6.1f}  ({v['median_us'] / base:.2f}x pipe)")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"cpus": os.cpu_count(), "load": os.getloadavg(), "spin_us": SPIN_US,
                                 "python": sys.version.split()[0], "results": res}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
