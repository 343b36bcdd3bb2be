"""The provider server's HTTP API: ``create_app(settings)`` builds a FastAPI app, no globals.

Endpoints (JSON; bytes in standard base64; ``Authorization: Bearer <account token>``)::

    GET  /v1/health      -> {"status": "ok", "version"}
    POST /v1/challenge   {capsule_id, version} -> {nonce, expires_at}
    POST /v1/provision   {capsule_id, version, nonce, hpke_pub, receipt_pub, evidence}
                         -> {license_id, device_id, payload}
    POST /v1/usage       {license_id, device_id, receipts} -> {seq, charged, answered}

Errors are ``{"error": {"type", "message", "hint"}}`` where ``type`` names a class of
:mod:`mlcapsule.enclave.errors`: 401 bad token, 403 attestation / grant / device limit / revoked /
unknown nonce, 404 unknown capsule or license, 409 nonce already used or receipts that do not
continue the chain, 410 nonce expired, 413 body too large, 422 malformed request, 503 database
unavailable. The OpenAPI description is served at ``/openapi.json``. The admin API
(``/v1/admin/...``, admin tokens only) is :mod:`.admin_api`; ``/metrics``, ``/healthz`` and
``/readyz`` are :mod:`.observability`. Vouchers and unlock
vouchers are never issued on the clients' API: only the administrator issues them, with ``mlcapsule
admin voucher`` and ``admin unlock`` (or the admin API, with an operator token); the alarms the
receipts carry are read with ``admin usage`` and ``admin alarms``, not over the clients' API.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..enclave._util import b64d, b64e
from ..enclave.crypto.keys import load_provider_key
from ..enclave.errors import MlcapsuleError
from . import admin_api, observability
from .db import create_schema, make_engine, session_factory
from .errors import UsageProtocolTooOld, status_for, wire_type
from .schemas import (
    USAGE_PROTOCOL,
    ChallengeRequest,
    ChallengeResponse,
    ErrorResponse,
    HealthResponse,
    ProvisionRequest,
    ProvisionResponse,
    UsageRequest,
    UsageResponse,
)
from .service import AccountRef, Clock, ProviderService, utcnow
from .settings import ServerSettings

log = logging.getLogger("mlcapsule.server")

MAX_BODY = 64 * 1024 * 1024
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text} for code, text in {
        401: "missing or invalid token", 403: "refused: attestation, grant, device limit, unknown nonce",
        404: "unknown capsule or license", 409: "nonce already used, or receipts that do not continue the chain",
        410: "nonce expired", 413: "request body too large", 422: "malformed request",
        429: "too many open challenges for this account", 503: "database unavailable"}.items()}


def _error(status: int, type_: str, message: str, hint: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse.model_validate({"error": {"type": type_, "message": message, "hint": hint}})
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


class BodyLimit:
    """Refuse request bodies larger than ``limit`` bytes with 413, whether the client declares
    the size (``Content-Length``) or not (chunked transfer): the body is counted as it arrives,
    and the application sees a disconnect, never more than ``limit`` bytes."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def _refuse(self, send: Any) -> None:
        resp = _error(413, "FormatError", f"request body larger than {self.limit} bytes", "send less data")
        await send({"type": "http.response.start", "status": 413, "headers": resp.raw_headers})
        await send({"type": "http.response.body", "body": resp.body})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await self._refuse(send)
            return
        seen, too_big, started = 0, False, False

        async def counted_receive() -> Any:
            nonlocal seen, too_big
            if too_big:
                return {"type": "http.disconnect"}
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    too_big = True
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg: Any) -> None:
            nonlocal started
            if too_big and not started:
                return  # the app's answer to the disconnect; ours goes out below
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not too_big:
                raise
        if too_big and not started:
            await self._refuse(send)


def create_app(settings: ServerSettings, *, clock: Clock | None = None,
               provider_key: Ed25519PrivateKey | None = None, tpm_policy: Any = None) -> FastAPI:
    """Build the server for ``settings``: opens the database (creating missing tables) and loads
    the provider key (``provider_key`` overrides ``settings.provider_key_path``). ``clock``
    returns the current aware UTC time; tests inject one to expire nonces and grants.
    ``tpm_policy`` (a :class:`mlcapsule.attestation.tpm.TpmPolicy`) overrides the one built from
    ``settings.tpm_ek_roots``; with neither, `tpm` evidence is refused.

    ``app.state.service`` is the :class:`ProviderService`; ``app.state.verifier`` its
    :class:`~mlcapsule.attestation.EvidenceVerifier`; ``app.state.engine`` the SQLAlchemy
    engine, disposed when the app shuts down.
    """
    key = provider_key or load_provider_key(settings.provider_key_path, passphrase=settings.passphrase)
    engine = make_engine(settings.database_url)
    create_schema(engine)
    # The app's own verifier, from its own settings: nothing process-wide (two apps, two decisions).
    verifier = settings.evidence_verifier(tpm_policy=tpm_policy)
    log.info("accepting evidence of type(s): %s", ", ".join(verifier.types()) or "none")
    service = ProviderService(session_factory(engine), verifier=verifier, provider_key=key,
                              nonce_ttl_seconds=settings.nonce_ttl_seconds,
                              max_open_challenges=settings.max_open_challenges, clock=clock or utcnow)
    if settings.allow_software_evidence:
        log.warning("UNSAFE: accepting evidence from the 'software' backend, which does not protect "
                    "the model against the client machine's owner")
    if not verifier.policy.measurements:
        log.warning("no enclave measurement is allowed: every provisioning request will be refused")

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.dispose()

    app = FastAPI(title="mlcapsule provider server", version=__version__, lifespan=lifespan,
                  description="Provisions MLCapsule enclaves: challenges, attested provisioning, usage receipts.")
    app.state.settings = settings
    app.state.service = service
    app.state.verifier = verifier
    app.state.engine = engine
    bearer = HTTPBearer(auto_error=False, description="the account token from `mlcapsule admin account add`")

    def account(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> AccountRef:
        if credentials is None or credentials.scheme.lower() != "bearer":
            return service.authenticate(None)
        return service.authenticate(credentials.credentials)

    v1 = APIRouter(prefix="/v1")

    @v1.get("/health", response_model=HealthResponse, tags=["status"])
    def health() -> HealthResponse:
        return HealthResponse(status="ok", version=__version__)

    @v1.post("/challenge", response_model=ChallengeResponse, responses=_ERRORS, tags=["setup"])
    def challenge(req: ChallengeRequest, acc: AccountRef = Depends(account)) -> ChallengeResponse:
        """A fresh single-use nonce for the setup phase; refused without a live grant."""
        c = service.challenge(acc, req.capsule_id, req.version)
        metrics.challenges.inc()
        return ChallengeResponse(nonce=b64e(c.nonce), expires_at=c.expires_at)

    @v1.post("/provision", response_model=ProvisionResponse, responses=_ERRORS, tags=["setup"])
    def provision(req: ProvisionRequest, acc: AccountRef = Depends(account)) -> ProvisionResponse:
        """Verify the enclave's evidence and answer with the content key and a license, sealed to it."""
        metrics.setups.inc()
        p = service.provision(acc, capsule_id=req.capsule_id, version=req.version, nonce=b64d(req.nonce),
                              hpke_pub=b64d(req.hpke_pub), receipt_pub=b64d(req.receipt_pub),
                              evidence=req.evidence)
        metrics.provisioned(p)
        return ProvisionResponse(license_id=p.license_id, device_id=p.device_id, payload=b64e(p.payload),
                                 credential=p.credential)

    @v1.post("/usage", response_model=UsageResponse, responses=_ERRORS, tags=["usage"])
    def usage(req: UsageRequest, acc: AccountRef = Depends(account)) -> UsageResponse:
        """Upload usage receipts; they must continue the chain the server holds for the device."""
        if req.protocol < USAGE_PROTOCOL:
            raise UsageProtocolTooOld(f"this server speaks usage protocol {USAGE_PROTOCOL}; the client spoke "
                                      f"{req.protocol}")
        before = metrics.usage_before(service, req.license_id, req.device_id)
        head = service.upload_usage(acc, license_id=req.license_id, device_id=req.device_id, receipts=req.receipts)
        metrics.usage_after(before, head, req.receipts)
        return UsageResponse(seq=head.seq, charged=head.charged, answered=head.answered,
                             ack=service.sign_ack(req.license_id, req.device_id, head))

    app.include_router(v1)
    app.include_router(admin_api.router(service))

    app.add_middleware(BodyLimit, limit=MAX_BODY)
    metrics = observability.install(app, engine)  # outside BodyLimit: its 413s are counted

    @app.exception_handler(MlcapsuleError)
    async def on_mlcapsule_error(_request: Request, exc: MlcapsuleError) -> JSONResponse:
        status = status_for(exc)
        observability.mark_refusal(_request.scope, observability.refusal_reason(exc))
        if status >= 500:
            log.error("%s: %s", type(exc).__name__, exc.message)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return _error(status, wire_type(exc), exc.message, exc.hint, headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        observability.mark_refusal(_request.scope, "malformed")
        problems = []
        for err in exc.errors()[:5]:
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
        return _error(422, "FormatError", "malformed request: " + "; ".join(problems),
                      "client and server versions may not match; upgrade mlcapsule")

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, "ServerError", str(exc.detail), "check the server URL and API version (/v1/)")

    @app.exception_handler(Exception)
    async def on_bug(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        observability.mark_refusal(_request.scope, "internal")
        return _error(500, "ServerError", "internal server error", "tell the provider; the server log has details")

    return app


__all__ = ["create_app"]
