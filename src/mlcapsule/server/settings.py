"""Server settings: command-line flags > environment ``MLCAPSULE_SERVER_*`` > TOML config file.

Config file (``--config FILE``, or ``$MLCAPSULE_SERVER_CONFIG``, or
``$MLCAPSULE_HOME/server/server.toml`` if it exists). Keys are the field names, at the top level
or under a ``[server]`` table::

    database_url = "postgresql+psycopg://mlcapsule@db.internal/mlcapsule"
    provider_key_path = "/etc/mlcapsule/provider-key.pem"
    passphrase_file = "/run/secrets/provider-passphrase"   # or passphrase = "..."
    allow_software_evidence = false
    allowed_measurements = ["3f9a...", "..."]
    tpm_ek_roots = ["/etc/mlcapsule/tpm-roots/"]           # accept `tpm` evidence from these EK CAs
    tpm_ek_intermediates = []
    tpm_pcr_policy = "/etc/mlcapsule/pcr-policy.json"      # optional
    policy_file = "/etc/mlcapsule/policy.toml"             # evidence types and hardware policies
    nonce_ttl_seconds = 120
    max_open_challenges = 1000                             # per account: unused, unexpired
    host = "127.0.0.1"
    port = 8700

Environment: ``MLCAPSULE_SERVER_DATABASE_URL``, ``..._PROVIDER_KEY_PATH``, ``..._PASSPHRASE``,
``..._PASSPHRASE_FILE``, ``..._ALLOW_SOFTWARE_EVIDENCE`` (1/0, true/false, yes/no, on/off),
``..._ALLOWED_MEASUREMENTS`` (comma- or space-separated), ``..._NONCE_TTL_SECONDS``, ``..._MAX_OPEN_CHALLENGES``,
``..._HOST``, ``..._PORT``, ``..._TPM_EK_ROOTS`` and ``..._TPM_EK_INTERMEDIATES`` (paths separated by
``os.pathsep``), ``..._TPM_PCR_POLICY``, ``..._POLICY_FILE``. The policy file's format is in
:mod:`mlcapsule.attestation.policy_file`; its rules are applied over the settings above.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..enclave._util import data_home
from ..enclave.errors import UsageError

ENV_PREFIX = "MLCAPSULE_SERVER_"
DEFAULT_PORT = 8700
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def default_database_url() -> str:
    return f"sqlite:///{data_home() / 'server' / 'server.db'}"


def default_provider_key_path() -> Path:
    return data_home() / "provider" / "provider-key.pem"


def default_config_path() -> Path:
    return data_home() / "server" / "server.toml"


@dataclass(frozen=True)
class ServerSettings:
    database_url: str = field(default_factory=default_database_url)
    provider_key_path: Path = field(default_factory=default_provider_key_path)
    passphrase: bytes | None = field(default=None, repr=False)
    allow_software_evidence: bool = False
    allowed_measurements: frozenset[str] = frozenset()
    nonce_ttl_seconds: int = 120
    #: Unused, unexpired challenges one account may hold at once (429 beyond): bounds what
    #: /v1/challenge can make the database store; a fleet set up in parallel needs one each.
    max_open_challenges: int = 1000
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    #: TPM evidence: EK CA certificates (PEM/DER files or folders) and an optional PCR policy
    #: (JSON). Without roots, `tpm` evidence is refused.
    tpm_ek_roots: tuple[Path, ...] = ()
    tpm_ek_intermediates: tuple[Path, ...] = ()
    tpm_pcr_policy: Path | None = None
    #: The evidence policy file (``serve --policy``): accepted types, hardware policies,
    #: per-capsule rules. See :mod:`mlcapsule.attestation.policy_file`.
    policy_file: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "provider_key_path", Path(self.provider_key_path))
        object.__setattr__(self, "tpm_ek_roots", tuple(Path(p) for p in self.tpm_ek_roots))
        object.__setattr__(self, "tpm_ek_intermediates", tuple(Path(p) for p in self.tpm_ek_intermediates))
        if self.tpm_pcr_policy is not None:
            object.__setattr__(self, "tpm_pcr_policy", Path(self.tpm_pcr_policy))
        if self.policy_file is not None:
            object.__setattr__(self, "policy_file", Path(self.policy_file))
        if isinstance(self.passphrase, str):
            object.__setattr__(self, "passphrase", self.passphrase.encode())
        object.__setattr__(self, "allowed_measurements", frozenset(
            _measurement(m) for m in self.allowed_measurements))
        if not 0 <= self.nonce_ttl_seconds <= 86_400:
            raise UsageError("nonce_ttl_seconds must be between 0 and 86400")
        if not 1 <= self.max_open_challenges <= 1_000_000:
            raise UsageError("max_open_challenges must be between 1 and 1000000")
        if not 0 <= self.port <= 65_535:
            raise UsageError("port must be between 0 and 65535")

    @classmethod
    def load(cls, *, config_file: str | os.PathLike[str] | None = None,
             environ: Mapping[str, str] | None = None, **flags: Any) -> ServerSettings:
        """Merge the sources. ``flags`` left as None do not override; unknown names are refused."""
        environ = os.environ if environ is None else environ
        known = {f.name for f in fields(cls)} | {"passphrase_file"}
        bad = set(flags) - known
        if bad:
            raise TypeError(f"unknown settings: {', '.join(sorted(bad))}")
        values: dict[str, Any] = {}
        for source in (_from_toml(config_file, environ), _from_env(environ, known),
                       {k: v for k, v in flags.items() if v is not None}):
            # A passphrase and a passphrase file from a higher-priority source replace each other.
            if "passphrase" in source or "passphrase_file" in source:
                values.pop("passphrase", None)
                values.pop("passphrase_file", None)
            values.update(source)
        pf = values.pop("passphrase_file", None)
        if pf is not None and "passphrase" not in values:
            try:
                values["passphrase"] = Path(pf).read_bytes().rstrip(b"\r\n")
            except OSError as e:
                raise UsageError(f"cannot read the passphrase file {pf}: {e.strerror}") from e
        return cls(**{k: _coerce(k, v) for k, v in values.items()})

    def with_overrides(self, **changes: Any) -> ServerSettings:
        return replace(self, **changes)

    def evidence_verifier(self, *, tpm_policy: Any = None) -> Any:
        """The :class:`~mlcapsule.attestation.EvidenceVerifier` these settings describe: software
        evidence if allowed, the measurement allow-list, and the TPM EK roots and PCR policy
        (``tpm_policy``, a ``TpmPolicy``, overrides the files). Reads the TPM files; no globals."""
        from ..attestation import AttestationPolicy, EvidenceVerifier

        if tpm_policy is None and self.tpm_ek_roots:
            from ..attestation.tpm import TpmPolicy

            try:
                tpm_policy = TpmPolicy.from_files(self.tpm_ek_roots, intermediates=self.tpm_ek_intermediates,
                                                  pcr_policy=self.tpm_pcr_policy)
            except (OSError, ValueError) as e:
                raise UsageError(f"cannot load the TPM EK roots or PCR policy: {e}") from e
        policy = AttestationPolicy(allow_software=self.allow_software_evidence,
                                   measurements=self.allowed_measurements, tpm=tpm_policy)
        if self.policy_file is None:
            return EvidenceVerifier(policy)
        from ..attestation.policy_file import load_policy_file

        loaded = load_policy_file(self.policy_file, base=policy)
        for where, p in (("", loaded.policy), *((f" [capsule.{k}]", v) for k, v in loaded.capsules.items())):
            if p.accept is not None and "software" in p.accept and not self.allow_software_evidence:
                raise UsageError(f"{self.policy_file}{where}: accept lists 'software', but software evidence is "
                                 "enabled only by the server's --UNSAFE-allow-software-evidence")
            missing = (p.accept or frozenset()) - p.configured()
            if missing:
                raise UsageError(f"{self.policy_file}{where}: accept lists {', '.join(sorted(missing))} without "
                                 "a policy for it", hint="add a section such as [tdx] with the accepted measurements")
        return EvidenceVerifier(loaded.policy, capsules=loaded.capsules)


def _measurement(m: str) -> str:
    from ..attestation import normalize_measurement
    from ..enclave.errors import AttestationError

    if m == "local":  # development convenience: the enclave measurement of this installation
        from ..enclave.measurement import measurement

        return measurement().hex()
    try:
        return normalize_measurement(m)
    except AttestationError as e:
        raise UsageError(f"allowed measurement {m[:80]!r} is not 64 hex digits") from e


def _from_toml(config_file: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> dict[str, Any]:
    explicit = config_file or environ.get(ENV_PREFIX + "CONFIG")
    path = Path(explicit) if explicit else default_config_path()
    if not explicit and not path.is_file():
        return {}
    from ..attestation.policy_file import read_toml

    data = read_toml(path, "server config file")
    if isinstance(data.get("server"), dict):
        data = data["server"]
    known = {f.name for f in fields(ServerSettings)} | {"passphrase_file"}
    bad = set(data) - known
    if bad:
        raise UsageError(f"unknown key(s) in {path}: {', '.join(sorted(bad))}",
                         hint=f"known keys: {', '.join(sorted(known))}")
    if "passphrase_file" in data:  # relative to the config file
        data["passphrase_file"] = str(path.parent / data["passphrase_file"])
    for k in ("provider_key_path", "tpm_pcr_policy", "policy_file"):
        if k in data and isinstance(data[k], str):
            data[k] = str(path.parent / Path(data[k]).expanduser())
    for k in ("tpm_ek_roots", "tpm_ek_intermediates"):
        if k in data and isinstance(data[k], list):
            data[k] = [str(path.parent / Path(str(v)).expanduser()) for v in data[k]]
    return data


def _from_env(environ: Mapping[str, str], known: set[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in known:
        v = environ.get(ENV_PREFIX + name.upper())
        if v is not None:
            out[name] = v
    return out


def _coerce(name: str, value: Any) -> Any:
    """Turn strings from the environment (and TOML values) into the field's type."""
    try:
        if name in ("nonce_ttl_seconds", "max_open_challenges", "port"):
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        if name == "allow_software_evidence":
            if isinstance(value, bool):
                return value
            v = str(value).strip().lower()
            if v in _TRUE:
                return True
            if v in _FALSE:
                return False
            raise ValueError
        if name == "allowed_measurements":
            if isinstance(value, str):
                return frozenset(value.replace(",", " ").split())
            return frozenset(str(v) for v in value)
        if name in ("provider_key_path", "tpm_pcr_policy", "policy_file"):
            return Path(value).expanduser()
        if name in ("tpm_ek_roots", "tpm_ek_intermediates"):
            items = value.split(os.pathsep) if isinstance(value, str) else list(value)
            return tuple(Path(str(v)).expanduser() for v in items if str(v))
        if name == "passphrase":
            return value.encode() if isinstance(value, str) else bytes(value)
        return str(value)
    except (ValueError, TypeError) as e:
        raise UsageError(f"server setting {name} has an invalid value {str(value)[:80]!r}") from e
