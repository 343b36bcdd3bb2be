"""The client's side of the provider API: :class:`ProviderClient` (httpx, synchronous).

The client machine's HTTP transport: outside the enclave (it is untrusted host code, like
:mod:`mlcapsule.host`) and outside the server package, which the client does not need.

Errors come back as the exception class the server named (``{"error": {"type": ...}}``), with
the server's message and hint, and the HTTP status in ``exc.status_code``. A server that cannot
be reached raises :class:`~mlcapsule.enclave.errors.TransportError` naming the URL.

Retries: a request that fails on the way (connection refused or reset, no answer, a timeout)
or gets a 502, 503 or 504 answer (a proxy whose upstream died, a database outage) is sent
again, identical, after a growing pause (``retries`` times); a 500 is a server bug or
misconfiguration that the same request would meet again, and is not retried. Every
endpoint is safe to repeat: a retried challenge only makes another nonce; the server answers a
retried provisioning (same nonce, keys and evidence) with the answer it already gave, without a
second device slot; and it acknowledges a retried usage upload without counting it twice.
"""

from __future__ import annotations

import binascii
import datetime as dt
import time
import uuid
from typing import Any

import httpx

from . import __version__
from .enclave import errors as E
from .enclave._util import b64d, b64e
from .enclave.messages.receipts import USAGE_PROTOCOL

API = "/v1"
#: Attempts after the first, and the first pause in seconds (doubled each time, up to 8 s): about
#: 15 s of retries, enough for a server restart or a load balancer's fail-over.
RETRIES = 5
BACKOFF = 0.5
MAX_BACKOFF = 8.0
RETRY_STATUS = frozenset({502, 503, 504})


def _error_class(name: Any) -> type[E.MlcapsuleError]:
    cls = getattr(E, name, None) if isinstance(name, str) else None
    if isinstance(cls, type) and issubclass(cls, E.MlcapsuleError):
        return cls
    return E.ServerError


def exchange(http: httpx.Client, url: str, method: str, path: str, **kwargs: Any) -> tuple[httpx.Response, Any]:
    """One request on ``http``: (the response, its JSON body or None). TransportError when the
    server at ``url`` cannot be reached or does not answer in time."""
    try:
        r = http.request(method, path, **kwargs)
    except httpx.TimeoutException as e:
        raise E.TransportError(f"the server at {url} did not answer in time ({type(e).__name__})") from e
    except httpx.HTTPError as e:
        raise E.TransportError(f"cannot reach the server at {url}: {e}") from e
    try:
        return r, r.json()
    except ValueError:
        return r, None


def refusal(r: httpx.Response, data: Any, *, url: str, path: str, hint: str) -> E.MlcapsuleError:
    """The error a failed answer stands for: the server's own (type, message, hint) when it sent
    one, else a ServerError naming the status (``hint`` says what to check)."""
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        given = err.get("hint") if isinstance(err.get("hint"), str) else None
        return _error_class(err.get("type"))(err["message"], hint=given or None)
    return E.ServerError(f"the server at {url} answered {path} with HTTP {r.status_code}", hint=hint)


class ProviderClient:
    """Talks to a provider's server at ``url`` (e.g. ``https://models.example.com``) as the
    account whose bearer ``token`` the provider issued. Use as a context manager, or call
    :meth:`close`. ``retries``, ``backoff`` and ``max_backoff``: see the module's docstring
    (``retries=0`` sends each request once).
    """

    def __init__(self, url: str, token: str | None, *, timeout: float = 30,
                 transport: httpx.BaseTransport | None = None, retries: int = RETRIES,
                 backoff: float = BACKOFF, max_backoff: float = MAX_BACKOFF) -> None:
        if retries < 0 or backoff < 0 or max_backoff < 0:
            raise E.UsageError("retries, backoff and max_backoff must be at least 0")
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self.url = url.rstrip("/")
        if self.url.endswith(API):
            self.url = self.url[: -len(API)]
        if not self.url.startswith(("http://", "https://")):
            raise E.UsageError(f"server URL {url!r} must start with http:// or https://")
        headers = {"User-Agent": f"mlcapsule/{__version__}", "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> ProviderClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- plumbing ---------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict[str, Any] | None = None, *,
                 retry: bool = True) -> dict[str, Any]:
        """One API call, sent again on a transport error or a 502/503/504 answer (see the module's
        docstring) unless ``retry`` is false. The body is the same object every time."""
        attempt = 0
        while True:
            try:
                return self._request_once(method, path, body)
            except E.MlcapsuleError as e:
                status = getattr(e, "status_code", None)
                transient = status in RETRY_STATUS or (status is None and isinstance(e, E.TransportError))
                if not retry or not transient or attempt >= self.retries:
                    raise
                pause = min(self.max_backoff, self.backoff * 2 ** attempt)
                retry_after = getattr(e, "retry_after", None)
                if retry_after is not None:
                    pause = min(self.max_backoff, max(pause, retry_after))
            time.sleep(pause)
            attempt += 1

    def _request_once(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        r, data = exchange(self._http, self.url, method, API + path, json=body)
        if r.is_success:
            if not isinstance(data, dict):
                raise E.ProtocolError(f"the server at {self.url} answered {path} with something that is not JSON")
            return data
        exc = refusal(r, data, url=self.url, path=path,
                      hint="check the server URL; is it an mlcapsule provider server?")
        exc.status_code = r.status_code  # type: ignore[attr-defined]
        after = r.headers.get("Retry-After", "")
        exc.retry_after = float(after) if after.isdigit() else None  # type: ignore[attr-defined]
        raise exc

    @staticmethod
    def _field(data: dict[str, Any], name: str, typ: type) -> Any:
        v = data.get(name)
        if not isinstance(v, typ) or isinstance(v, bool) and typ is int:
            raise E.ProtocolError(f"the server's answer has no valid {name!r}")
        return v

    # -- API --------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """The server's status, asked once (no retries: it is a probe)."""
        return self._request("GET", "/health", retry=False)

    def challenge(self, capsule_id: uuid.UUID | str, version: int) -> tuple[bytes, dt.datetime]:
        """A fresh single-use nonce and when it expires."""
        data = self._request("POST", "/challenge", {"capsule_id": str(capsule_id), "version": version})
        try:
            nonce = b64d(self._field(data, "nonce", str))
            expires = dt.datetime.fromisoformat(self._field(data, "expires_at", str))
        except (ValueError, binascii.Error) as e:
            raise E.ProtocolError("the server's challenge is malformed") from e
        if len(nonce) != 32:
            raise E.ProtocolError("the server's challenge nonce is not 32 bytes")
        return nonce, expires

    def provision(self, capsule_id: uuid.UUID | str, version: int, *, nonce: bytes, hpke_pub: bytes,
                  receipt_pub: bytes, evidence: dict[str, Any]) -> dict[str, Any]:
        """Returns ``{"license_id": str, "device_id": str, "payload": str, "credential": dict | None}``.

        ``payload`` stays standard base64, as on the wire (the enclave's message interface takes
        it that way); ``b64d(payload)`` gives the HPKE message for ``open_payload``. For ``tpm``
        evidence, ``credential`` is the TPM2_ActivateCredential challenge that unwraps it.
        """
        try:
            data = self._request("POST", "/provision", {
                "capsule_id": str(capsule_id), "version": version, "nonce": b64e(nonce), "hpke_pub": b64e(hpke_pub),
                "receipt_pub": b64e(receipt_pub), "evidence": evidence})
        except E.TransportError as e:
            # The server may have provisioned the device before the line or the server failed: a
            # new setup is a new request, which takes another slot.
            lost = E.TransportError(
                f"{e.message} (after {self.retries + 1} attempts)",
                hint="try the setup again when the server answers; if it is then refused with the device "
                     "limit, the lost attempt may have used a device slot: ask the provider to free it")
            lost.__dict__.update({k: v for k, v in vars(e).items() if k in ("status_code", "retry_after")})
            raise lost from e
        payload = self._field(data, "payload", str)
        try:
            b64d(payload)
        except (ValueError, binascii.Error) as e:
            raise E.ProtocolError("the server's provisioning payload is not base64") from e
        credential = data.get("credential")
        if credential is not None and not isinstance(credential, dict):
            raise E.ProtocolError("the server's credential challenge is malformed")
        return {"license_id": self._field(data, "license_id", str), "device_id": self._field(data, "device_id", str),
                "payload": payload, "credential": credential}

    def upload_usage(self, license_id: str, device_id: str, receipts: list[dict[str, Any]]) -> dict[str, Any]:
        """Returns ``{"seq", "charged", "answered", "ack"}``: the chain head the server now holds,
        and its signed acknowledgement (which only the enclave can judge)."""
        data = self._request("POST", "/usage", {"protocol": USAGE_PROTOCOL, "license_id": license_id,
                                                "device_id": device_id, "receipts": receipts})
        out: dict[str, Any] = {k: self._field(data, k, int) for k in ("seq", "charged", "answered")}
        out["ack"] = self._field(data, "ack", dict)
        return out
