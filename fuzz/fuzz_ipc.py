"""Fuzz the IPC frames between the host and the enclave worker (both directions).

Input: a mode byte, then one frame body (after the u32 length prefix):
  0: a JSON frame: ``protocol.decode``, then for a request ``ecalls.parse`` and the state table
     (``EcallState.check`` in every state), as the worker does; for a reply, what the host makes
     of it (``EnclaveProcess._raise_error``: the enclave's error as one of ours);
  1: a binary tensor frame with inline tensors: ``protocol.decode_tensors`` (twice: the second
     call takes the cached-head fast path), and with ``copy``;
  2: a tensor frame against a 64 KiB shared-memory arena (``SharedArena``), as the worker decodes
     requests whose large tensors lie in shared memory;
  3: a message of the enclave service's socket (``enclaved.recv_msg``, over a Unix socket pair, as
     the service reads a local client's request and the client the service's reply): it returns an
     object or raises ValueError (its documented contract, which its callers catch).
Seeds: every ECALL request and some replies, by the real encoders; the service's requests.
"""

from __future__ import annotations

import os
import socket
import sys

from _common import instrumented, main, ours, split

with instrumented(__name__ == "__main__"):
    from mlcapsule import enclaved
    from mlcapsule.enclave import ecalls, protocol
    from mlcapsule.host import EnclaveProcess

_ARENA = protocol.SharedArena.create("mlcapsule-fuzz")
_ARENA.reserve(64 * 1024)
os.pwrite(_ARENA.fd, bytes(range(256)) * 256, 0)


def TestOneInput(data: bytes) -> None:  # noqa: N802
    mode, body = split(data, 4)
    if mode == 0:
        with ours():
            msg = protocol.decode(bytearray(body))
            if msg.kind == protocol.REQUEST:
                req = ecalls.parse(msg.header)
                for state in ecalls.ALLOWED:
                    machine = ecalls.EcallState()
                    machine.state = state
                    with ours():
                        machine.check(req)
            else:
                EnclaveProcess._raise_error(msg.header)
    elif mode == 1:
        for copy in (False, True, False):
            with ours():
                protocol.decode_tensors(bytearray(body), copy=copy)
    elif mode == 3:
        if not body or len(body) > enclaved.MAX_MESSAGE:
            return
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with a, b:
            a.send(body)
            try:
                enclaved.recv_msg(b)
            except ValueError:
                pass
    else:
        with ours():
            reuse: list[object] = []
            protocol.decode_tensors(bytearray(body), _ARENA, reuse=reuse)  # type: ignore[arg-type]
            protocol.decode_tensors(bytearray(body), _ARENA, reuse=reuse)  # type: ignore[arg-type]


if __name__ == "__main__":
    main(TestOneInput)
    sys.exit(0)
