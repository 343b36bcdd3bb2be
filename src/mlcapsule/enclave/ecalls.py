"""The ECALL layer, sans I/O (after h11): typed requests parsed at the boundary, and an explicit
state table.

:func:`parse` turns a decoded JSON request header into one of the request dataclasses below,
checking every field's type and size, or raises ``ProtocolError``. :class:`EcallState` says which
requests the enclave accepts in which state; an illegal one raises ``ProtocolError`` and changes
nothing, and so does a call that fails. The worker (``worker.py``) owns the transport: it reads
frames, asks this module what they mean and whether they are allowed, dispatches through a
table, and writes the reply.

States and what each accepts (``infer`` is the binary fast path, the only way to run the model)::

    new          hello status load setup_begin shutdown
    setting-up   hello status setup_begin setup_finish shutdown          (after setup_begin)
    dev          hello status infer shutdown                             (loaded with a dev key)
    licensed     hello status infer apply_voucher usage_report usage_ack setup_begin shutdown
    replacing    the same as licensed, and setup_finish                  (setup_begin while licensed)
    closed       nothing                                                 (after shutdown)

Transitions on success: new --load--> dev | licensed; new | setting-up --setup_begin-->
setting-up; setting-up | replacing --setup_finish--> licensed; licensed | replacing
--setup_begin--> replacing; any --shutdown--> closed. A second ``load``, a ``load`` after a
setup, or ``setup_finish`` without ``setup_begin`` are refused.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass
from typing import Any

from ._util import b64d
from .errors import NotProvisionedError, ProtocolError

#: The most bytes a base64 argument may decode to (HPKE payloads carry a license and a key).
MAX_BLOB = 1024 * 1024
#: The most characters of a dev-key path.
MAX_PATH = 4096


@dataclass(frozen=True)
class Hello:
    pass


@dataclass(frozen=True)
class Status:
    pass


@dataclass(frozen=True)
class Load:
    dev_key: str | None


@dataclass(frozen=True)
class SetupBegin:
    nonce: bytes


@dataclass(frozen=True)
class SetupFinish:
    payload: bytes
    credential: dict[str, Any] | None


@dataclass(frozen=True)
class ApplyVoucher:
    voucher: dict[str, Any]


@dataclass(frozen=True)
class UsageReport:
    pass


@dataclass(frozen=True)
class UsageAck:
    ack: dict[str, Any]


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class Infer:
    """The binary fast path (its frame is parsed by ``protocol.decode_tensors``)."""


Request = Hello | Status | Load | SetupBegin | SetupFinish | ApplyVoucher | UsageReport | UsageAck | Shutdown | Infer


def _blob(args: dict[str, Any], key: str) -> bytes:
    v = args.get(key)
    if not isinstance(v, str) or len(v) > (MAX_BLOB * 4) // 3 + 4:
        raise ProtocolError(f"argument {key!r} must be base64 of at most {MAX_BLOB} bytes")
    try:
        return b64d(v)
    except (ValueError, binascii.Error) as e:
        raise ProtocolError(f"argument {key!r} must be base64") from e


def _obj(args: dict[str, Any], key: str, *, optional: bool = False) -> dict[str, Any] | None:
    v = args.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, dict):
        raise ProtocolError(f"argument {key!r} must be an object")
    return v


def _only(args: dict[str, Any], *keys: str) -> None:
    extra = set(args) - set(keys)
    if extra:
        raise ProtocolError(f"unexpected argument(s) {sorted(extra)[:4]}")


def _parse_load(a: dict[str, Any]) -> Request:
    _only(a, "dev_key")
    dev_key = a.get("dev_key")
    if dev_key is not None and (not isinstance(dev_key, str) or not 0 < len(dev_key) <= MAX_PATH or "\0" in dev_key):
        raise ProtocolError("argument 'dev_key' must be a path")
    return Load(dev_key)


def _parse_setup_finish(a: dict[str, Any]) -> Request:
    _only(a, "payload", "credential")
    return SetupFinish(_blob(a, "payload"), _obj(a, "credential", optional=True))


def _parse_voucher(a: dict[str, Any]) -> Request:
    _only(a, "voucher")
    v = _obj(a, "voucher")
    assert v is not None
    return ApplyVoucher(v)


def _parse_ack(a: dict[str, Any]) -> Request:
    _only(a, "ack")
    v = _obj(a, "ack")
    assert v is not None
    return UsageAck(v)


def _parse_setup_begin(a: dict[str, Any]) -> Request:
    _only(a, "nonce")
    return SetupBegin(_blob(a, "nonce"))


def _no_args(cls: type) -> Any:
    def parse(a: dict[str, Any]) -> Request:
        _only(a)
        return cls()
    return parse


_PARSERS = {
    "hello": _no_args(Hello), "status": _no_args(Status), "load": _parse_load,
    "setup_begin": _parse_setup_begin, "setup_finish": _parse_setup_finish, "apply_voucher": _parse_voucher,
    "usage_report": _no_args(UsageReport), "usage_ack": _parse_ack, "shutdown": _no_args(Shutdown),
}
#: The ECALLs of the JSON frame (``infer`` has its own binary frame).
OPS = tuple(_PARSERS)


def parse(header: Any) -> Request:
    """A request from a decoded frame header ``{"op": ..., "args": {...}}``, checked field by field."""
    if not isinstance(header, dict) or set(header) - {"op", "args"}:
        raise ProtocolError("malformed request")
    op, args = header.get("op"), header.get("args", {})
    parser = _PARSERS.get(op) if isinstance(op, str) else None
    if parser is None:
        raise ProtocolError(f"unknown request {str(op)[:40]!r}")
    if not isinstance(args, dict):
        raise ProtocolError("request arguments must be an object")
    return parser(args)


_COMMON = {Hello, Status, Shutdown}
_NEEDS_LICENSE = {Infer, ApplyVoucher, UsageReport, UsageAck}
_LICENSED = _COMMON | {Infer, ApplyVoucher, UsageReport, UsageAck, SetupBegin}
ALLOWED: dict[str, frozenset[type]] = {
    "new": frozenset(_COMMON | {Load, SetupBegin}),
    "setting-up": frozenset(_COMMON | {SetupBegin, SetupFinish}),
    "dev": frozenset(_COMMON | {Infer}),
    "licensed": frozenset(_LICENSED),
    "replacing": frozenset(_LICENSED | {SetupFinish}),
    "closed": frozenset(),
}


class EcallState:
    """Which ECALLs the enclave accepts now (see the module docstring)."""

    def __init__(self) -> None:
        self.state = "new"

    def check(self, req: Request) -> None:
        """Raise, changing nothing, if ``req`` is not allowed now: NotProvisionedError for a call
        that needs a license before there is one (what the user must hear), else ProtocolError."""
        if type(req) in ALLOWED[self.state]:
            return
        if self.state in ("new", "setting-up") and type(req) in _NEEDS_LICENSE:
            raise NotProvisionedError("this capsule is not set up on this device",
                                      hint="run `mlcapsule setup CAPSULE --token T` once, online")
        raise ProtocolError(f"{_name(req)} is not allowed now (the enclave is {self.state})")

    def done(self, req: Request, result: dict[str, Any] | None = None) -> None:
        """``req`` succeeded: move to the next state."""
        t, s = type(req), self.state
        if t is Shutdown:
            self.state = "closed"
        elif t is Load:
            self.state = "licensed" if (result or {}).get("license") == "license" else "dev"
        elif t is SetupBegin:
            self.state = "replacing" if s in ("licensed", "replacing") else "setting-up"
        elif t is SetupFinish:
            self.state = "licensed"


def _name(req: Request) -> str:
    for op, parser in _PARSERS.items():
        if getattr(parser, "__name__", "") and type(req).__name__.lower() == op.replace("_", ""):
            return op
    return "infer" if isinstance(req, Infer) else type(req).__name__
