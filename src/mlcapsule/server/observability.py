"""The provider server's observability: Prometheus metrics, health and readiness, JSON logs.

* ``GET /metrics``: Prometheus text format (``prometheus-client``). Counters: setups
  (``/v1/provision`` requests), provisions (devices provisioned), challenges, refusals by
  endpoint and *reason* (a fixed set, :data:`REFUSAL_REASONS`: never free text, so the number of
  series stays bounded), usage uploads accepted, receipts ingested, queries reported answered (from
  the receipts), and the defense alarms the receipts carry (by detector and action, both from
  fixed sets); a latency histogram per endpoint (the route's template, never the raw path).
* ``GET /healthz``: the process is up (no database access). ``GET /readyz``: the database answers
  a ``SELECT 1`` (503 if not): take an instance out of the load balancer while it fails.
* :func:`log_config` / :func:`configure_logging`: ``text`` or ``json`` logs (one JSON object per
  line), picked with ``MLCAPSULE_LOG_FORMAT`` (level: ``MLCAPSULE_LOG_LEVEL``). SQLAlchemy's
  loggers are held at WARNING whatever the level: at INFO they print every statement's
  parameters, which include content keys.

Several worker processes: prometheus-client keeps each process's counters in that process. With
``PROMETHEUS_MULTIPROC_DIR`` set (to an empty folder, before the workers start), every worker
writes its values there and ``/metrics`` sums all of them, whichever worker answers;
:func:`prepare_multiprocess` sets it up for ``serve --workers N``. Without it, each scrape sees
one worker's counters only.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations at run time.
import datetime as dt
import json
import logging
import logging.config
import os
import tempfile
import time
from collections.abc import Callable, MutableMapping
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from sqlalchemy import text

from ..enclave import errors as E
from . import errors as SE

log = logging.getLogger("mlcapsule.server")

#: The reasons a refusal is counted under (label ``reason`` of ``mlcapsule_refusals_total``).
REFUSAL_REASONS = ("unauthorized", "forbidden", "attestation", "no_grant", "grant_expired", "device_limit",
                   "nonce_unknown", "nonce_used", "nonce_expired", "unknown_capsule", "unknown_license",
                   "chain_conflict", "integrity", "too_many_challenges", "protocol_too_old", "malformed",
                   "too_large", "not_found", "bad_request", "unavailable", "misconfigured", "internal", "other")
#: Detector names counted as themselves in ``mlcapsule_alarms_reported_total``; any other is "other".
DETECTORS = ("prada", "ood", "kennen", "shapiro")
ALARM_ACTIONS = ("record", "degrade", "refuse", "lock")
#: Latency buckets (seconds): a setup is milliseconds, a large upload can take seconds.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Most specific first: the first class in this list that the exception is an instance of wins.
_REASONS: tuple[tuple[type[E.MlcapsuleError], str], ...] = (
    (SE.Unauthorized, "unauthorized"), (SE.GrantExpired, "grant_expired"), (SE.GrantRefused, "no_grant"),
    (SE.DeviceLimitReached, "device_limit"), (SE.NonceRefused, "nonce_unknown"), (SE.NonceReplayed, "nonce_used"),
    (SE.NonceExpired, "nonce_expired"), (SE.UnknownCapsule, "unknown_capsule"),
    (SE.UnknownLicense, "unknown_license"), (SE.ChainConflict, "chain_conflict"),
    (SE.TooManyChallenges, "too_many_challenges"), (SE.UsageProtocolTooOld, "protocol_too_old"),
    (SE.Unavailable, "unavailable"), (SE.Misconfigured, "misconfigured"), (E.AttestationError, "attestation"),
    (E.IntegrityError, "integrity"), (E.FormatError, "malformed"), (E.UsageError, "malformed"),
    (E.PolicyError, "forbidden"),
)
_BY_STATUS = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "bad_request",
              409: "integrity", 413: "too_large", 422: "malformed", 503: "unavailable"}
SCOPE_KEY = "mlcapsule.refusal"  # set in the ASGI scope by the app's error handlers


def refusal_reason(exc: BaseException) -> str:
    """The label a refusal is counted under: one of :data:`REFUSAL_REASONS`."""
    for cls, reason in _REASONS:
        if isinstance(exc, cls):
            return reason
    return "other"


def mark_refusal(scope: MutableMapping[str, Any], reason: str) -> None:
    """Record why this request was refused, for the metrics middleware (a known reason or "other")."""
    scope[SCOPE_KEY] = reason if reason in REFUSAL_REASONS else "other"


# -- metrics ----------------------------------------------------------------------------------
class Metrics:
    """One app's metrics, in a registry of its own (two apps in one process do not mix)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = r = CollectorRegistry()
        self.challenges = Counter("mlcapsule_challenges", "Challenges (setup nonces) issued", registry=r)
        self.setups = Counter("mlcapsule_setups", "Setup requests received (POST /v1/provision)", registry=r)
        self.provisions = Counter("mlcapsule_provisions", "Devices provisioned (new setups answered with a key)",
                                  registry=r)
        self.replays = Counter("mlcapsule_provision_replays", "Setups answered again with the stored answer "
                               "(an identical retry after a lost answer)", registry=r)
        self.refusals = Counter("mlcapsule_refusals", "Requests refused, by endpoint and reason",
                                ["endpoint", "reason"], registry=r)
        self.uploads = Counter("mlcapsule_uploads", "Usage uploads accepted (POST /v1/usage)", registry=r)
        self.receipts = Counter("mlcapsule_receipts", "Usage receipts ingested (new entries of the chains)",
                                registry=r)
        self.queries = Counter("mlcapsule_queries_reported", "Queries answered, as the devices' receipts report",
                               registry=r)
        self.alarms = Counter("mlcapsule_alarms_reported", "Defense alarms reported in receipts",
                              ["detector", "action"], registry=r)
        self.latency = Histogram("mlcapsule_http_request_duration_seconds", "Request latency by endpoint",
                                 ["endpoint", "method"], buckets=BUCKETS, registry=r)
        for reason in ("unauthorized", "attestation", "device_limit", "nonce_used", "chain_conflict"):
            self.refusals.labels(endpoint="/v1/provision", reason=reason)  # shown at 0 before the first one

    def exposition(self) -> tuple[bytes, str]:
        """The text format of every metric: this process's, or every worker's in multiprocess mode."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def provisioned(self, p: Any) -> None:
        """Count a setup answered: a new device, or the stored answer of a retry."""
        (self.replays if getattr(p, "replayed", False) else self.provisions).inc()

    # -- usage accounting (around ProviderService.upload_usage) -----------------------------
    def usage_before(self, service: Any, license_id: str, device_id: str) -> tuple[int, int] | None:
        """The device's stored chain head (seq, answered) before an upload, or None (unknown)."""
        from sqlalchemy import select

        from .db import Device

        try:
            with service.sessions() as s:
                row = s.execute(select(Device.head_seq, Device.answered)
                                .where(Device.license_id == license_id, Device.device_id == device_id)).first()
        except Exception:  # metrics never fail a request; the upload reports database trouble itself
            return None
        return (int(row[0]), int(row[1])) if row is not None else None

    def usage_after(self, before: tuple[int, int] | None, head: Any, receipts: Any) -> None:
        """Count an accepted upload: the new receipts, the queries they report, their alarms."""
        from ..enclave.messages.receipts import alarm_records

        self.uploads.inc()
        if before is None:
            return
        seq0, answered0 = before
        if head.seq > seq0:
            self.receipts.inc(head.seq - seq0)
        if head.answered > answered0:
            self.queries.inc(head.answered - answered0)
        for e in receipts if isinstance(receipts, list) else ():
            try:
                body = e["body"]
                if body["kind"] != "alarm" or int(body["seq"]) <= seq0:
                    continue
                alarms, _ = alarm_records(body["data"])
            except Exception:  # already verified by the service; never fail on metrics
                continue
            for a in alarms:
                det = a.get("detector")
                act = a.get("action")
                self.alarms.labels(detector=det if det in DETECTORS else "other",
                                   action=act if act in ALARM_ACTIONS else "other").inc()


class MetricsMiddleware:
    """ASGI middleware: latency per endpoint (the route template, or ``unmatched``) and refusals
    (status >= 400) by the reason the app's error handlers recorded, else by status."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_status(msg: Any) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = int(msg["status"])
            await send(msg)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            if endpoint != "/metrics":
                self.metrics.latency.labels(endpoint=endpoint, method=scope.get("method", "?")).observe(
                    time.perf_counter() - start)
            if status >= 400:
                reason = scope.get(SCOPE_KEY) or _BY_STATUS.get(status) or ("internal" if status >= 500 else "other")
                self.metrics.refusals.labels(endpoint=endpoint, reason=reason).inc()


class Status(BaseModel):
    status: str


def install(app: Any, engine: Any) -> Metrics:
    """Add ``/metrics``, ``/healthz``, ``/readyz`` and the metrics middleware to ``app``; return
    its :class:`Metrics` (also ``app.state.metrics``)."""
    metrics = Metrics()
    app.state.metrics = metrics
    router = APIRouter(tags=["status"])

    @router.get("/healthz", response_model=Status)
    def healthz() -> Status:
        """The process is up (the database is not checked: see /readyz)."""
        return Status(status="ok")

    @router.get("/readyz", response_model=Status, responses={503: {"model": Status, "description": "not ready"}})
    def readyz() -> Any:  # Status, or 503
        """Ready to serve: the database answers a cheap query."""
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as e:
            log.warning("not ready: the database does not answer (%s)", type(e).__name__)
            return JSONResponse({"status": "database unavailable"}, status_code=503)
        return Status(status="ok")

    @router.get("/metrics", response_class=Response,
                responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
    def prometheus_metrics() -> Response:
        """Prometheus metrics (text exposition format)."""
        body, ctype = metrics.exposition()
        return Response(body, media_type=ctype)

    app.include_router(router)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return metrics


def prepare_multiprocess(workers: int) -> Callable[[], None]:
    """For ``serve --workers N`` (N > 1): unless ``PROMETHEUS_MULTIPROC_DIR`` is set already, point
    it at a fresh private folder, before the workers start (they inherit the environment), so that
    ``/metrics`` sums every worker. Returns a cleanup to call when the server stops."""
    if workers <= 1 or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return lambda: None
    import shutil

    folder = tempfile.mkdtemp(prefix="mlcapsule-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder

    def cleanup() -> None:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        shutil.rmtree(folder, ignore_errors=True)

    return cleanup


# -- logs -------------------------------------------------------------------------------------
LOG_FORMATS = ("text", "json")
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime",
                                                                                      "color_message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, and any ``extra``
    fields; an exception's traceback under ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for k, v in vars(record).items():
            if k not in _RECORD_FIELDS and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def _choice(value: str | None, env: str, default: str) -> str:
    return (value or os.environ.get(env) or default).strip().lower()


def log_config(fmt: str | None = None, level: str | int | None = None) -> dict[str, Any]:
    """A :func:`logging.config.dictConfig` for the server and uvicorn (pass it as uvicorn's
    ``log_config``): ``fmt`` ``text`` or ``json`` (default ``$MLCAPSULE_LOG_FORMAT`` or text),
    ``level`` a level name or number (default ``$MLCAPSULE_LOG_LEVEL`` or INFO)."""
    fmt = _choice(fmt, "MLCAPSULE_LOG_FORMAT", "text")
    if fmt not in LOG_FORMATS:
        raise E.UsageError(f"log format {fmt[:40]!r} is neither text nor json",
                           hint="set MLCAPSULE_LOG_FORMAT (or --log-format) to text or json")
    lvl: str | int = level if isinstance(level, int) else _choice(level, "MLCAPSULE_LOG_LEVEL", "info").upper()
    if isinstance(lvl, str) and not isinstance(logging.getLevelName(lvl), int):
        raise E.UsageError(f"log level {lvl[:40]!r} is not a level name",
                           hint="use debug, info, warning or error (MLCAPSULE_LOG_LEVEL)")
    formatter = ({"()": f"{__name__}.JsonFormatter"} if fmt == "json" else
                 {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"})
    handler = {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}
    quiet = {"level": "WARNING", "propagate": True}
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"default": handler},
        "root": {"handlers": ["default"], "level": lvl},
        "loggers": {
            # uvicorn's own loggers propagate to the root handler (no second, text-only handler).
            "uvicorn": {"handlers": [], "level": lvl, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": lvl, "propagate": True},
            "uvicorn.access": {"handlers": [], "level": lvl, "propagate": True},
            # At INFO and below SQLAlchemy logs statement parameters: content keys, token hashes.
            "sqlalchemy": quiet, "sqlalchemy.engine": quiet, "sqlalchemy.pool": quiet,
        },
    }


def configure_logging(fmt: str | None = None, level: str | int | None = None) -> None:
    """Install :func:`log_config` in this process."""
    logging.config.dictConfig(log_config(fmt, level))


__all__ = ["REFUSAL_REASONS", "JsonFormatter", "Metrics", "MetricsMiddleware", "configure_logging", "install",
           "log_config", "mark_refusal", "prepare_multiprocess", "refusal_reason"]
