"""Server-side refusals, each with its HTTP status.

Every class derives from a public class in :mod:`mlcapsule.enclave.errors`. On the wire the error's
``type`` is that public ancestor's name (``ProtocolError``, ``PolicyError``, ...), so a client
that knows only :mod:`mlcapsule.enclave.errors` can raise the same class again; the HTTP status carries
the finer distinction (409 nonce used, 410 nonce expired, ...).
"""

from __future__ import annotations

from ..enclave import errors as E

#: HTTP status for each public error class (the first match along the class's MRO wins).
DEFAULT_STATUS: tuple[tuple[type[E.MlcapsuleError], int], ...] = (
    (E.AttestationError, 403),
    (E.PolicyError, 403),
    (E.IntegrityError, 409),
    (E.FormatError, 422),
    (E.UsageError, 422),
    (E.ProtocolError, 400),
)


class Unauthorized(E.ServerError):
    status_code = 401
    default_hint = "check the access token the provider gave you (--token or MLCAPSULE_TOKEN)"


class UnknownCapsule(E.ServerError):
    status_code = 404
    default_hint = "the provider has not registered this capsule version on its server; ask the provider"


class UsageProtocolTooOld(E.ProtocolError):
    status_code = 426
    default_hint = ("upgrade mlcapsule on this device: the server acknowledges usage with a signature the "
                    "enclave checks (usage protocol 2)")


class UnknownLicense(E.ServerError):
    status_code = 404
    default_hint = "this license was not issued to your account by this server"


class NonceRefused(E.ProtocolError):
    status_code = 403
    default_hint = "ask for a fresh challenge and run setup again"


class NonceReplayed(E.ProtocolError):
    status_code = 409
    default_hint = "challenges are single use: ask for a fresh one and run setup again"


class NonceExpired(E.ProtocolError):
    status_code = 410
    default_hint = "the challenge expired before provisioning finished: run setup again"


class GrantRefused(E.PolicyError):
    status_code = 403
    default_hint = "ask the provider for access to this capsule"


class GrantExpired(E.LicenseExpiredError):
    status_code = 403
    default_hint = "ask the provider to renew the grant"


class DeviceLimitReached(E.PolicyError):
    status_code = 403
    default_hint = ("each device is provisioned once and counts against the grant; ask the provider for more "
                    "devices, or keep using the devices already set up")


class ChainConflict(E.IntegrityError):
    status_code = 409
    default_hint = "the receipts do not continue the chain the server holds; do not edit or drop receipts"


class TooManyChallenges(E.ServerError):
    status_code = 429
    default_hint = ("finish the setups in progress, or wait for their challenges to expire, then try again; "
                    "a device needs one challenge per setup")


class Misconfigured(E.ServerError):
    status_code = 500
    default_hint = "the provider's server is misconfigured; tell the provider"


class Unavailable(E.ServerError):
    status_code = 503
    default_hint = "the server is busy; try again shortly"


def status_for(exc: E.MlcapsuleError) -> int:
    code = getattr(type(exc), "status_code", None)
    if isinstance(code, int):
        return code
    for cls, status in DEFAULT_STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def wire_type(exc: E.MlcapsuleError) -> str:
    """The name of the nearest public ancestor in :mod:`mlcapsule.enclave.errors`."""
    for cls in type(exc).__mro__:
        if cls.__module__ == E.__name__ and issubclass(cls, E.MlcapsuleError):
            return cls.__name__
    return "ServerError"
