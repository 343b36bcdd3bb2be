"""The admin HTTP API, ``/v1/admin/...``: what ``mlcapsule admin`` does, over HTTP.

Every endpoint takes ``Authorization: Bearer <admin token>``. Admin tokens live in their own
table (``admin_tokens``, only their SHA-256), so an admin token is never valid on the clients'
endpoints and an account token never valid here. Roles:

* ``read``: list accounts, capsules, grants, usage and alarms (``GET``).
* ``operator``: everything: also create accounts, register capsules, grant, revoke, issue
  vouchers and unlock vouchers, import receipts, and manage admin tokens.

Each endpoint calls the same :class:`~mlcapsule.server.service.ProviderService` method as the
command line; nothing here decides anything the service does not. A capsule is named by
``CAPSULE_ID[:VERSION]`` only (never a path on the server's disk), and registered by sending the
capsule file and its key file in the body (base64; the body limit, 64 MiB, bounds the capsule
to about 47 MiB: register larger ones with the local ``mlcapsule admin capsule add``).

Tokens: ``mlcapsule admin token create --role read|operator --name NAME`` prints one once;
``admin token revoke NAME`` ends it at once (every request checks the table).
"""

# No `from __future__ import annotations`: the routes' dependencies are local names FastAPI must see.
import base64
import binascii
import datetime as dt
import hashlib
import logging
import re
import secrets
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import exc as sa_exc, func, select

from ..enclave import errors as E
from .db import Account, AdminToken, Capsule, Device, Grant
from .errors import Unauthorized
from .schemas import ErrorResponse

log = logging.getLogger("mlcapsule.server")

ROLES = ("read", "operator")
Role = Literal["read", "operator"]
ADMIN_TOKEN_PREFIX = "mlca_"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")
_CAPSULE_REF = re.compile(r"^[0-9A-Fa-f-]{32,36}(:[0-9]{1,9})?$")


class AdminForbidden(E.PolicyError):
    """An admin token whose role does not allow this call (HTTP 403)."""

    status_code = 403
    default_hint = "this needs an operator token (`mlcapsule admin token create --role operator`)"


@dataclass(frozen=True)
class AdminRef:
    id: int
    name: str
    role: str


def hash_admin_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class AdminTokens:
    """Create, list, revoke and check admin tokens, in ``service``'s database."""

    def __init__(self, service: Any) -> None:
        self.service = service

    def create(self, name: str, role: str) -> tuple[dict[str, Any], str]:
        """A new token for ``role``; returns (its row, the token: the only time it exists in clear)."""
        if role not in ROLES:
            raise E.UsageError(f"role {role[:40]!r} is neither read nor operator")
        if not _NAME.match(name):
            raise E.UsageError(f"{name[:80]!r} is not a valid token name",
                               hint="use 1-128 letters, digits and . _ @ + - (starting with a letter or digit)")
        token = ADMIN_TOKEN_PREFIX + secrets.token_urlsafe(32)
        try:
            with self.service._tx() as s:
                row = AdminToken(name=name, role=role, token_hash=hash_admin_token(token), created=self.service.now())
                s.add(row)
                s.flush()
                info = _token_row(row)
        except sa_exc.IntegrityError as e:
            raise E.UsageError(f"an admin token named {name!r} already exists",
                               hint="choose another --name, or revoke it first") from e
        return info, token

    def rows(self) -> list[dict[str, Any]]:
        with self.service._tx() as s:
            return [_token_row(t) for t in s.scalars(select(AdminToken).order_by(AdminToken.name))]

    def revoke(self, name: str) -> dict[str, Any]:
        with self.service._tx() as s:
            row = s.scalar(select(AdminToken).where(AdminToken.name == name))
            if row is None:
                raise E.UsageError(f"no admin token named {name[:80]!r}",
                                   hint="`mlcapsule admin token list` lists them")
            if row.revoked_at is None:
                row.revoked_at = self.service.now()
            return _token_row(row)

    def authenticate(self, token: str | None) -> AdminRef:
        if not token or len(token) > 512:
            raise Unauthorized("missing or malformed admin token",
                               hint="give an admin token (--admin-token or MLCAPSULE_ADMIN_TOKEN)")
        with self.service._tx() as s:
            row = s.scalar(select(AdminToken).where(AdminToken.token_hash == hash_admin_token(token)))
        if row is None or row.revoked_at is not None:
            raise Unauthorized("the admin token is not valid",
                               hint="check --admin-token / MLCAPSULE_ADMIN_TOKEN: `mlcapsule admin token create` "
                                    "makes one on the server's database")
        return AdminRef(row.id, row.name, row.role)


    # The names the command line calls (as on :class:`AdminClient`).
    def token_create(self, name: str, role: str) -> tuple[dict[str, Any], str]:
        return self.create(name, role)

    def token_list(self) -> list[dict[str, Any]]:
        return self.rows()

    def token_revoke(self, name: str) -> dict[str, Any]:
        return self.revoke(name)


def _token_row(t: AdminToken) -> dict[str, Any]:
    return {"name": t.name, "role": t.role, "created": t.created, "revoked_at": t.revoked_at}


def list_grants(service: Any) -> list[dict[str, Any]]:
    """Every grant (account, capsule version, terms, devices provisioned), by account and capsule."""
    with service._tx() as s:
        used = dict(s.execute(select(Device.grant_id, func.count(Device.id)).group_by(Device.grant_id)).all())
        rows = s.execute(select(Grant, Account.name, Capsule.name, Capsule.capsule_id, Capsule.version)
                         .join(Account, Grant.account_id == Account.id)
                         .join(Capsule, Grant.capsule_pk == Capsule.id)
                         .order_by(Account.name, Capsule.name, Capsule.version)).all()
        return [{"account": acc, "capsule": f"{cname} v{ver}", "capsule_id": cid, "version": ver,
                 "budget": g.budget, "devices": g.devices, "devices_provisioned": int(used.get(g.id) or 0),
                 "expires": g.expires, "revoked": g.revoked, "revoked_at": g.revoked_at, "created": g.created,
                 "defenses": list(g.defenses or [])}
                for g, acc, cname, cid, ver in rows]


def capsule_ref(ref: str) -> str:
    """``CAPSULE_ID[:VERSION]``, checked: the API never takes a path on the server's disk."""
    text, _, version = ref.partition(":")
    if not _CAPSULE_REF.match(ref):
        raise E.UsageError(f"{ref[:80]!r} is not CAPSULE_ID[:VERSION]",
                           hint="name the capsule by its id (and version), as `admin capsule list` shows it")
    try:
        return str(uuid.UUID(text)) + (f":{int(version)}" if version else "")
    except ValueError as e:
        raise E.UsageError(f"{ref[:80]!r} is not CAPSULE_ID[:VERSION]") from e


# -- request and response models ---------------------------------------------------------------
class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AccountCreate(_Req):
    name: str = Field(max_length=128)


class AccountCreated(BaseModel):
    name: str
    token: str = Field(description="the account's access token: shown once, only its hash is stored")


class AccountRow(BaseModel):
    name: str
    created: dt.datetime
    grants: int


class CapsuleUpload(_Req):
    capsule: str = Field(description="the capsule file, base64")
    key: str = Field(description="its content key file (CAPSULE.key, as `mlcapsule pack` wrote it), base64",
                     max_length=64 * 1024)


class CapsuleRegistered(BaseModel):
    capsule_id: str
    version: int
    name: str
    lease_size: int
    new: bool


class CapsuleRow(BaseModel):
    name: str
    capsule_id: str
    version: int
    lease_size: int
    registered: dt.datetime
    grants: int
    devices: int


class GrantRequest(_Req):
    account: str = Field(max_length=128)
    capsule: str = Field(max_length=64, description="CAPSULE_ID[:VERSION] (latest version if omitted)")
    # The database's integer columns bound both (a larger number was a 500: fuzzing, issue 15).
    budget: int | None = Field(default=None, ge=0, le=2**63 - 1,
                               description="queries per device license; null = unlimited")
    devices: int = Field(default=1, ge=1, le=2**31 - 1)
    expires: dt.datetime | None = Field(default=None, description="aware ISO 8601 time; null = never")
    defenses: list[str] = Field(default_factory=list, max_length=32)


class GrantResult(BaseModel):
    account: str
    capsule: str
    budget: int | None
    devices: int
    expires: dt.datetime | None
    created: bool
    devices_provisioned: int
    defenses: list[str]
    checked: bool
    policy: list[str]


class GrantRow(BaseModel):
    account: str
    capsule: str
    capsule_id: str
    version: int
    budget: int | None
    devices: int
    devices_provisioned: int
    expires: dt.datetime | None
    revoked: bool
    revoked_at: dt.datetime | None
    created: dt.datetime
    defenses: list[str]


class RevokeRequest(_Req):
    account: str = Field(max_length=128)
    capsule: str = Field(max_length=64, description="CAPSULE_ID[:VERSION]")


class Revoked(BaseModel):
    account: str
    capsule: str
    devices_provisioned: int


class VoucherRequest(_Req):
    license_id: str = Field(max_length=64, description="a license id, or a unique prefix of 8+ characters")
    queries: int = Field(ge=1, le=10**12)


class UnlockRequest(_Req):
    license_id: str = Field(max_length=64)
    device_id: str | None = Field(default=None, max_length=64)
    reset_detectors: bool = False


class SignedEnvelope(BaseModel):
    """A provider-signed message (voucher/v1, unlock/v1), as the client's ``mlcapsule topup`` takes it."""

    type: str
    body: dict[str, Any]
    signature: str


class UsageRow(BaseModel):
    account: str
    capsule: str
    capsule_id: str
    device_id: str
    license_id: str
    budget: int | None
    vouchers: int
    charged: int
    answered: int
    receipts: int
    last_sync: dt.datetime | None
    created: dt.datetime
    revoked: bool
    evidence: str
    rollbacks: int
    forks: int
    alarms: int
    defense_gaps: int
    gap_queries: int
    unlock_seq: int
    defenses: list[str]
    defense: dict[str, Any] | None


class AlarmRow(BaseModel):
    account: str
    capsule: str
    license_id: str
    device_id: str
    detector: str
    query: int
    statistic: float | None
    threshold: float | None
    action: str
    receipt: int
    time: str
    received: dt.datetime


class ReceiptsImport(_Req):
    license_id: str = Field(max_length=64)
    device_id: str = Field(max_length=64)
    receipts: list[dict[str, Any]]


class ReceiptsImported(BaseModel):
    account: str
    license_id: str
    seq: int
    hash: str
    charged: int
    answered: int


class TokenCreate(_Req):
    name: str = Field(max_length=128)
    role: Role


class TokenCreated(BaseModel):
    name: str
    role: str
    token: str = Field(description="the admin token: shown once, only its hash is stored")


class TokenRow(BaseModel):
    name: str
    role: str
    created: dt.datetime
    revoked_at: dt.datetime | None


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text} for code, text in {
        401: "missing or invalid admin token", 403: "this token's role does not allow the call",
        422: "malformed request, or refused by the service (unknown account, license...)",
        503: "database unavailable"}.items()}


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise E.FormatError(f"{what} is not standard base64") from e


def router(service: Any) -> APIRouter:
    """The ``/v1/admin`` routes over ``service`` (the app's :class:`ProviderService`)."""
    tokens = AdminTokens(service)
    bearer = HTTPBearer(auto_error=False, scheme_name="AdminToken",
                        description="an admin token from `mlcapsule admin token create` (never an account token)")

    def admin(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> AdminRef:
        if credentials is None or credentials.scheme.lower() != "bearer":
            return tokens.authenticate(None)
        who = tokens.authenticate(credentials.credentials)
        if request.method != "GET":  # an audit line per change (names only, never a token or key)
            log.info("admin API: %s %s by admin token %r (%s)", request.method, request.url.path, who.name, who.role)
        return who

    def operator(who: AdminRef = Depends(admin)) -> AdminRef:
        if who.role != "operator":
            raise AdminForbidden(f"admin token {who.name!r} has role {who.role!r}: it may only read")
        return who

    Reader = Annotated[AdminRef, Depends(admin)]
    Operator = Annotated[AdminRef, Depends(operator)]
    r = APIRouter(prefix="/v1/admin", tags=["admin"], responses=_ERRORS)

    # -- read -------------------------------------------------------------------------------
    @r.get("/accounts", response_model=list[AccountRow])
    def accounts(_: Reader) -> Any:
        """Accounts, with how many grants each holds."""
        return service.list_accounts()

    @r.get("/capsules", response_model=list[CapsuleRow])
    def capsules(_: Reader) -> Any:
        """Registered capsule versions, with their grants and provisioned devices."""
        return service.list_capsules()

    @r.get("/grants", response_model=list[GrantRow])
    def grants(_: Reader) -> Any:
        """Every grant and its terms."""
        return list_grants(service)

    @r.get("/usage", response_model=list[UsageRow])
    def usage(_: Reader) -> Any:
        """Usage reported by each device (from uploaded receipts)."""
        return service.usage()

    @r.get("/alarms", response_model=list[AlarmRow])
    def alarms(_: Reader, license: Annotated[str | None, Query(max_length=64)] = None) -> Any:
        """Defense alarms the devices reported, oldest first (of one license: ``?license=ID``)."""
        return service.alarms(license)

    # -- operate ----------------------------------------------------------------------------
    @r.post("/accounts", response_model=AccountCreated, status_code=201)
    def account_add(req: AccountCreate, _: Operator) -> Any:
        """Create an account; its access token is in the answer, once."""
        ref, token = service.add_account(req.name)
        return AccountCreated(name=ref.name, token=token)

    @r.post("/capsules", response_model=CapsuleRegistered)
    def capsule_add(req: CapsuleUpload, _: Operator) -> Any:
        """Register a capsule and its content key (checked as `admin capsule add` does), pinned to
        this server's provider key."""
        data, key = _b64(req.capsule, "capsule"), _b64(req.key, "key")
        with tempfile.TemporaryDirectory(prefix="mlcapsule-upload-") as d:
            cap_path, key_path = Path(d) / "upload.capsule", Path(d) / "upload.capsule.key"
            cap_path.write_bytes(data)
            key_path.touch(mode=0o600)
            key_path.write_bytes(key)
            try:
                info, new = service.register_capsule(cap_path, key_path, provider_public=None)
            except E.KeyFileError as e:  # the uploaded key is the caller's fault: a 422, not a 500 (fuzzing)
                raise E.FormatError(f"the uploaded content key is not valid: {e.message}",
                                    hint="upload the .key file written when the capsule was packed") from e
        return CapsuleRegistered(**info, new=new)

    @r.post("/grants", response_model=GrantResult)
    def grant(req: GrantRequest, _: Operator) -> Any:
        """Create or replace an account's grant for a capsule version (lifts a revocation)."""
        if req.expires is not None and req.expires.tzinfo is None:
            raise E.UsageError("expires must carry a time zone (e.g. 2030-01-01T00:00:00Z)")
        return service.grant(req.account, capsule_ref(req.capsule), budget=req.budget, devices=req.devices,
                             expires=req.expires, defenses=list(req.defenses))

    @r.post("/revocations", response_model=Revoked)
    def revoke(req: RevokeRequest, _: Operator) -> Any:
        """Refuse the account's later challenges and provisions for the capsule."""
        return service.revoke(req.account, capsule_ref(req.capsule))

    @r.post("/vouchers", response_model=SignedEnvelope)
    def voucher(req: VoucherRequest, _: Operator) -> Any:
        """A provider-signed top-up for a license (the next in its sequence)."""
        return service.issue_voucher(req.license_id, req.queries)

    @r.post("/unlocks", response_model=SignedEnvelope)
    def unlock(req: UnlockRequest, _: Operator) -> Any:
        """A provider-signed unlock voucher for a license (lifts a defense lock once)."""
        return service.issue_unlock(req.license_id, device_id=req.device_id, reset_detectors=req.reset_detectors)

    @r.post("/receipts", response_model=ReceiptsImported)
    def import_receipts(req: ReceiptsImport, _: Operator) -> Any:
        """Ingest receipts a client exported (`setup --replace --export-receipts FILE`)."""
        account_name, head = service.import_usage(req.model_dump())
        return ReceiptsImported(account=account_name, license_id=req.license_id, seq=head.seq, hash=head.hash,
                                charged=head.charged, answered=head.answered)

    @r.get("/tokens", response_model=list[TokenRow])
    def token_list(_: Operator) -> Any:
        """Admin tokens (names and roles; never the tokens)."""
        return tokens.rows()

    @r.post("/tokens", response_model=TokenCreated, status_code=201)
    def token_create(req: TokenCreate, _: Operator) -> Any:
        """A new admin token; it is in the answer, once."""
        info, token = tokens.create(req.name, req.role)
        return TokenCreated(name=info["name"], role=info["role"], token=token)

    @r.delete("/tokens/{name}", response_model=TokenRow)
    def token_revoke(name: str, _: Operator) -> Any:
        """Revoke an admin token at once."""
        return tokens.revoke(name)

    return r


# -- the client (``mlcapsule admin --server URL``) ----------------------------------------------
#: Fields of the API's rows that are times: the client turns them back into datetimes, so the
#: command line prints a remote server's rows exactly as a local database's.
_TIME_FIELDS = frozenset({"created", "registered", "expires", "last_sync", "received", "revoked_at"})


def _times(row: Any) -> Any:
    if isinstance(row, list):
        return [_times(r) for r in row]
    if isinstance(row, dict):
        return {k: (dt.datetime.fromisoformat(v) if k in _TIME_FIELDS and isinstance(v, str) else v)
                for k, v in row.items()}
    return row


@dataclass(frozen=True)
class _Named:
    name: str


class AdminClient:
    """The admin API at ``url`` with an admin token: the methods ``mlcapsule admin`` calls on a
    local :class:`~mlcapsule.server.service.ProviderService`, with the same results, so every
    command prints the same whichever it talks to. Errors are raised as the class the server named."""

    def __init__(self, url: str, token: str, *, timeout: float = 120) -> None:
        import httpx

        from .. import __version__

        self.url = url.rstrip("/")
        for suffix in ("/v1/admin", "/v1"):
            if self.url.endswith(suffix):
                self.url = self.url[: -len(suffix)]
        if not self.url.startswith(("http://", "https://")):
            raise E.UsageError(f"server URL {url!r} must start with http:// or https://")
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers={
            "User-Agent": f"mlcapsule/{__version__}", "Accept": "application/json",
            "Authorization": f"Bearer {token}"})

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None) -> Any:
        from ..provider_client import exchange, refusal

        r, data = exchange(self._http, self.url, method, "/v1/admin" + path, json=body, params=params)
        if r.is_success and data is not None:
            return _times(data)
        raise refusal(r, data, url=self.url, path=path,
                      hint="check --server: is it an mlcapsule provider server of this version?")

    # -- the ProviderService methods the commands use ----------------------------------------
    def list_accounts(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/accounts"))

    def add_account(self, name: str) -> tuple[Any, str]:
        d = self._call("POST", "/accounts", {"name": name})
        return _Named(d["name"]), d["token"]

    def list_capsules(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/capsules"))

    def register_capsule(self, capsule_path: Any, key_path: Any, *, provider_public: bytes | None = None
                         ) -> tuple[dict[str, Any], bool]:
        d = self._call("POST", "/capsules", {"capsule": base64.b64encode(Path(capsule_path).read_bytes()).decode(),
                                             "key": base64.b64encode(Path(key_path).read_bytes()).decode()})
        new = d.pop("new")
        return d, bool(new)

    @staticmethod
    def _ref(ref: str) -> str:
        """A capsule file is named by its id and version (the server never opens local paths)."""
        if Path(ref).is_file():
            from ..enclave.format.container import CapsuleFile
            from ..enclave.format.trust import UnsafeTrustManifestKey

            with CapsuleFile(ref, trust=UnsafeTrustManifestKey()) as cf:  # only its id and version
                return f"{cf.manifest.capsule_id}:{cf.manifest.version}"
        return ref

    def grant(self, account_name: str, capsule_ref: str, *, budget: int | None, devices: int,
              expires: dt.datetime | None, defenses: list[str] | tuple[str, ...] | None = None) -> dict[str, Any]:
        return dict(self._call("POST", "/grants", {
            "account": account_name, "capsule": self._ref(capsule_ref), "budget": budget, "devices": devices,
            "expires": expires.isoformat() if expires is not None else None, "defenses": list(defenses or [])}))

    def revoke(self, account_name: str, capsule_ref: str) -> dict[str, Any]:
        return dict(self._call("POST", "/revocations", {"account": account_name, "capsule": self._ref(capsule_ref)}))

    def list_grants(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/grants"))

    def issue_voucher(self, license_id: str, queries: int) -> dict[str, Any]:
        return dict(self._call("POST", "/vouchers", {"license_id": license_id, "queries": queries}))

    def issue_unlock(self, license_id: str, *, device_id: str | None = None,
                     reset_detectors: bool = False) -> dict[str, Any]:
        return dict(self._call("POST", "/unlocks", {"license_id": license_id, "device_id": device_id,
                                                    "reset_detectors": reset_detectors}))

    def alarms(self, license_id: str | None = None) -> list[dict[str, Any]]:
        return list(self._call("GET", "/alarms", params={"license": license_id} if license_id else None))

    def usage(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/usage"))

    def import_usage(self, report: Any) -> tuple[str, Any]:
        from ..enclave.messages.receipts import ChainHead

        if not isinstance(report, dict):
            raise E.UsageError("not a usage report: expected a JSON object with license_id, device_id and receipts",
                               hint="give the file written by `mlcapsule setup --replace --export-receipts FILE`")
        d = self._call("POST", "/receipts", {k: report.get(k) for k in ("license_id", "device_id", "receipts")})
        return d["account"], ChainHead(d["seq"], d["hash"], d["charged"], d["answered"])

    # -- admin tokens (AdminTokens) ------------------------------------------------------------
    def token_create(self, name: str, role: str) -> tuple[dict[str, Any], str]:
        d = self._call("POST", "/tokens", {"name": name, "role": role})
        return {"name": d["name"], "role": d["role"]}, d["token"]

    def token_list(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/tokens"))

    def token_revoke(self, name: str) -> dict[str, Any]:
        from urllib.parse import quote

        return dict(self._call("DELETE", "/tokens/" + quote(name, safe="")))


__all__ = ["AdminClient", "ADMIN_TOKEN_PREFIX", "ROLES", "AdminForbidden", "AdminRef", "AdminTokens", "capsule_ref",
           "list_grants", "router"]
