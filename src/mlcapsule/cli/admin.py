"""Provider-side commands: ``mlcapsule serve`` and the ``mlcapsule admin`` group.

Every command reads the server settings the same way (flags > ``MLCAPSULE_SERVER_*`` > the TOML
file given with ``--config``), so ``admin`` commands work on the database ``serve`` uses.
Errors are raised as mlcapsule exceptions; the main CLI prints them on one line.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from ..enclave._util import atomic_write
from ..enclave.errors import UsageError
from ._console import CliConsole

console = CliConsole(highlight=False)
err_console = CliConsole(stderr=True, highlight=False)


def _settings(database_url: str | None, config: str | None, **flags: Any) -> Any:
    from ..server.settings import ServerSettings

    if _remote() is not None:
        if database_url or config:
            raise UsageError("--server talks to a server's admin API: --database-url and --config are for a local "
                             "database", hint="give one or the other")
        return None
    return ServerSettings.load(config_file=config, database_url=database_url, **flags)


_REMOTE = "mlcapsule.admin.remote"  # click context meta: the admin API client, when --server is given


def _remote() -> Any:
    """The :class:`~mlcapsule.server.admin_api.AdminClient` of ``admin --server URL``, or None (a
    local database)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None or ctx.meta.get(_REMOTE) is None:
        return None
    client = ctx.meta[_REMOTE]
    if isinstance(client, tuple):
        from ..server.admin_api import AdminClient

        url, token = client
        client = ctx.meta[_REMOTE] = AdminClient(url, token)
        ctx.call_on_close(client.close)
    return client


def _service(settings: Any, *, with_key: bool = False) -> Any:
    remote = _remote()
    if remote is not None:  # the server's admin API: the same methods, on the server's service
        return remote
    from ..attestation import AttestationPolicy
    from ..server.db import create_schema, make_engine, session_factory
    from ..server.service import ProviderService

    key = load_server_key(settings) if with_key else None
    engine = make_engine(settings.database_url)
    create_schema(engine)
    return ProviderService(session_factory(engine), policy=AttestationPolicy(), provider_key=key,
                           nonce_ttl_seconds=settings.nonce_ttl_seconds)


#: The passphrase sources the provider-side commands (serve, admin) read: not MLCAPSULE_PASSPHRASE,
#: which only `provider init` and `pack` read.
SERVER_PASSPHRASE_SOURCES = ("--passphrase-file FILE, MLCAPSULE_SERVER_PASSPHRASE, MLCAPSULE_SERVER_PASSPHRASE_FILE "
                             "or passphrase_file in the server config")


def load_server_key(settings: Any) -> Any:
    """The provider's signing key, as ``serve`` and ``admin`` read it: every hint names the
    passphrase sources these commands really read (issue 11, item 7)."""
    from ..enclave.crypto.keys import load_provider_key
    from ..enclave.errors import KeyFileError

    try:
        return load_provider_key(settings.provider_key_path, passphrase=settings.passphrase)
    except KeyFileError as e:
        if "protected by a passphrase" in e.message and "not protected" not in e.message:
            hint = f"give its passphrase with {SERVER_PASSPHRASE_SOURCES}"
        elif "not protected by a passphrase" in e.message:
            hint = ("drop the passphrase: unset MLCAPSULE_SERVER_PASSPHRASE and MLCAPSULE_SERVER_PASSPHRASE_FILE, "
                    "and leave out --passphrase-file and passphrase_file in the server config")
        elif "wrong passphrase" in e.message:
            hint = f"check the passphrase given with {SERVER_PASSPHRASE_SOURCES}, and the key path (--provider-key)"
        elif "no provider key" in e.message:
            hint = ("create one with `mlcapsule provider init`, or point --provider-key (provider_key_path in the "
                    "server config, MLCAPSULE_SERVER_PROVIDER_KEY_PATH) at it")
        else:
            raise
        raise KeyFileError(e.message, hint=hint) from None


def _provider_public(settings: Any) -> bytes | None:
    """The server's provider public key, from KEY.pub or the key itself; None if there is neither."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from ..enclave.crypto.keys import raw_public

    pub_path = Path(str(settings.provider_key_path) + ".pub")
    if pub_path.is_file():
        try:
            pub = serialization.load_pem_public_key(pub_path.read_bytes())
        except ValueError as e:
            raise UsageError(f"{pub_path} is not a PEM public key") from e
        if isinstance(pub, Ed25519PublicKey):
            return raw_public(pub)
    if settings.provider_key_path.is_file():
        return raw_public(load_server_key(settings).public_key())
    return None


def parse_expires(text: str | None, *, now: dt.datetime | None = None) -> dt.datetime | None:
    """``30d``, ``12h``, ``never``, or an ISO 8601 time (UTC if it has no zone)."""
    if not text or text == "never":
        return None
    now = now or dt.datetime.now(dt.UTC)
    if text[-1] in "dh" and text[:-1].isdigit():
        n = int(text[:-1])
        return (now + (dt.timedelta(days=n) if text[-1] == "d" else dt.timedelta(hours=n))).replace(microsecond=0)
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError as e:
        raise UsageError(f"--expires {text!r} is neither an ISO 8601 time nor a duration like 30d or 12h") from e
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def _when(t: dt.datetime | None) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC") if t else "-"


def db_options(f: Any) -> Any:
    f = click.option("--config", type=click.Path(dir_okay=False), default=None,
                     help="Server config file (TOML) [default: $MLCAPSULE_SERVER_CONFIG or "
                          "$MLCAPSULE_HOME/server/server.toml if it exists].")(f)
    f = click.option("--database-url", default=None, metavar="URL",
                     help="sqlite:///PATH or postgresql+psycopg://USER@HOST/DB "
                          "[default: sqlite:///$MLCAPSULE_HOME/server/server.db].")(f)
    return f


def key_options(f: Any) -> Any:
    f = click.option("--passphrase-file", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="File holding the provider key's passphrase (or MLCAPSULE_SERVER_PASSPHRASE).")(f)
    f = click.option("--provider-key", type=click.Path(dir_okay=False), default=None,
                     help="Provider signing key [default: $MLCAPSULE_HOME/provider/provider-key.pem].")(f)
    return f


# -- serve ------------------------------------------------------------------------------------
@click.command()
@click.option("--host", default=None, help="Address to listen on [default: 127.0.0.1].")
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="Port [default: 8700].")
@db_options
@key_options
@click.option("--UNSAFE-allow-software-evidence", "allow_software", is_flag=True, default=None,
              help="UNSAFE: accept evidence from the 'software' backend, which does not protect the model "
                   "against the client machine's owner. For development and demos only.")
@click.option("--allow-measurement", "measurements", multiple=True, metavar="HEX",
              help="Accept enclaves with this measurement (repeatable; `local` = this installation's). "
                   "Without any, every provisioning request is refused.")
@click.option("--tpm-ek-root", "tpm_roots", multiple=True, type=click.Path(exists=True), metavar="PATH",
              help="Accept `tpm` evidence whose EK certificate chains to this CA (PEM/DER file or folder; "
                   "repeatable). Without any, TPM evidence is refused.")
@click.option("--tpm-ek-intermediate", "tpm_intermediates", multiple=True, type=click.Path(exists=True),
              metavar="PATH", help="Intermediate EK CA certificates (repeatable).")
@click.option("--tpm-pcr-policy", type=click.Path(exists=True, dir_okay=False), default=None,
              help='JSON {"sha256": {"7": ["hex", ...]}}: PCR values accepted in TPM quotes.')
@click.option("--policy", "policy_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Evidence policy (TOML): accepted evidence types (tpm, sgx, tdx, snp, nitro), their "
                   "measurements, minimum TCB, debug, per-capsule rules. See docs/attestation.md.")
@click.option("--nonce-ttl", type=click.IntRange(0, 86400), default=None,
              help="Challenge lifetime in seconds [default: 120].")
@click.option("--workers", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Server processes sharing the port (all state is in the database, so any number of "
                   "instances can also share one PostgreSQL). See docs/deployment.md.")
@click.option("--log-format", type=click.Choice(["text", "json"]), envvar="MLCAPSULE_LOG_FORMAT", default="text",
              show_default=True, help="Log lines as text, or one JSON object per line [env: MLCAPSULE_LOG_FORMAT; "
                                      "level: MLCAPSULE_LOG_LEVEL, default info].")
def serve(host: str | None, port: int | None, database_url: str | None, config: str | None,
          provider_key: str | None, passphrase_file: str | None, allow_software: bool | None,
          measurements: tuple[str, ...], tpm_roots: tuple[str, ...], tpm_intermediates: tuple[str, ...],
          tpm_pcr_policy: str | None, policy_file: str | None, nonce_ttl: int | None, workers: int,
          log_format: str) -> None:
    """Run the provider's provisioning server."""
    import logging.config

    from ..server.app import create_app
    from ..server.observability import log_config, prepare_multiprocess
    from ..server.prefork import serve as serve_workers

    settings = _settings(database_url, config, host=host, port=port, provider_key_path=provider_key,
                         passphrase_file=passphrase_file, allow_software_evidence=allow_software,
                         allowed_measurements=frozenset(measurements) if measurements else None,
                         tpm_ek_roots=tuple(tpm_roots) or None, tpm_ek_intermediates=tuple(tpm_intermediates) or None,
                         tpm_pcr_policy=tpm_pcr_policy, policy_file=policy_file, nonce_ttl_seconds=nonce_ttl)
    sock = listen_socket(settings.host, settings.port)  # first: a busy port is one line, before any other
    if settings.allow_software_evidence:
        err_console.print("[bold red]UNSAFE:[/] accepting 'software' evidence: it is signed by a key on the client's "
                          "own disk and does not protect the model against the client machine's owner.")
    if not settings.allowed_measurements and settings.policy_file is None:
        err_console.print("[yellow]warning:[/] no --allow-measurement given: "
                          "every provisioning request will be refused")
    logs = log_config(log_format)
    logging.config.dictConfig(logs)
    # Before the app (and prometheus-client) exist: the workers then share one metrics folder.
    end_metrics = prepare_multiprocess(workers)
    try:
        app = create_app(settings, provider_key=load_server_key(settings))
        sock.listen(2048)  # connections queue from here on, so "serving on" is true when printed
        port = sock.getsockname()[1]
        shown = f"[{settings.host}]" if ":" in settings.host else settings.host
        console.print(f"serving on http://{shown}:{port}/v1/ (database {_safe_url(settings.database_url)})"
                      + (f", {workers} workers" if workers > 1 else ""), soft_wrap=True)
        serve_workers(app, sock, workers=workers, log_level=str(logs["root"]["level"]).lower(), log_config=logs)
    finally:
        sock.close()
        end_metrics()


def listen_socket(host: str, port: int) -> Any:
    """A TCP socket bound to (host, port), or one line saying why not (a busy port, a port that
    needs root, an address this machine does not have)."""
    import errno
    import socket

    from ..enclave.errors import TransportError

    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise UsageError(f"cannot listen on {host!r}: not an address or host name of this machine "
                         f"({getattr(e, 'strerror', None) or e})",
                         hint="check --host (e.g. 127.0.0.1 or 0.0.0.0)") from None
    family, socktype, proto, _, addr = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(addr)
        sock.set_inheritable(True)
    except OSError as e:
        sock.close()
        reason = e.strerror or str(e)
        if e.errno == errno.EADDRINUSE:
            raise TransportError(f"port {port} is in use: {reason} ({host}:{port})",
                                 hint="stop the program using it, or choose another with --port") from None
        if e.errno == errno.EACCES:
            raise TransportError(f"cannot listen on port {port}: {reason}",
                                 hint="ports below 1024 need privileges; choose another with --port") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise TransportError(
                f"cannot listen on {host}: {reason}",
                hint="use an address of this machine with --host (e.g. 127.0.0.1 or 0.0.0.0)") from None
        raise TransportError(f"cannot listen on {host}:{port}: {reason}", hint="check --host and --port") from None
    return sock


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "?"


# -- admin ------------------------------------------------------------------------------------
@click.group()
@click.option("--server", "server_url", envvar="MLCAPSULE_ADMIN_SERVER", default=None, metavar="URL",
              help="Administer the server at URL over its admin API (/v1/admin/) instead of a local database "
                   "[env: MLCAPSULE_ADMIN_SERVER].")
@click.option("--admin-token", envvar="MLCAPSULE_ADMIN_TOKEN", default=None, metavar="TOKEN",
              help="The admin token for --server (`admin token create`) [env: MLCAPSULE_ADMIN_TOKEN, which keeps it "
                   "out of the process list].")
@click.pass_context
def admin(ctx: click.Context, server_url: str | None, admin_token: str | None) -> None:
    """Administer the provider server: accounts, capsules, grants, vouchers, usage, alarms.

    On a local database by default (--database-url, --config), or on a running server with
    --server URL and an admin token: the same commands, the same output.
    """
    if server_url:
        if not admin_token:
            raise UsageError("--server needs an admin token",
                             hint="give --admin-token or set MLCAPSULE_ADMIN_TOKEN (`mlcapsule admin token create "
                                  "--role read|operator --name NAME` on the server's database makes one)")
        ctx.meta[_REMOTE] = (server_url, admin_token)


@admin.group()
def account() -> None:
    """Client accounts and their access tokens."""


@account.command("add")
@click.argument("name")
@db_options
def account_add(name: str, database_url: str | None, config: str | None) -> None:
    """Create account NAME and print its access token (shown only this once)."""
    svc = _service(_settings(database_url, config))
    ref, token = svc.add_account(name)
    console.print(f"account {ref.name} created. Its access token (shown once, only a hash is stored):")
    console.print(token, soft_wrap=True)


def _print_json(rows: Any) -> None:
    """JSON for machines: indented on a terminal, one unwrapped line elsewhere; times in ISO 8601."""
    import sys

    text = json.dumps(rows, default=lambda o: o.isoformat() if isinstance(o, dt.datetime) else str(o))
    if console.is_terminal:
        console.print_json(text)
    else:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


@account.command("list")
@db_options
@_json_option
def account_list(database_url: str | None, config: str | None, as_json: bool) -> None:
    """List accounts."""
    rows = _service(_settings(database_url, config)).list_accounts()
    if as_json:
        _print_json(rows)
        return
    t = Table("account", "created", "grants")
    for r in rows:
        t.add_row(r["name"], _when(r["created"]), str(r["grants"]))
    console.print(t)


@admin.group()
def capsule() -> None:
    """Capsules the server can provision."""


@capsule.command("add")
@click.argument("capsule_path", metavar="CAPSULE", type=click.Path(exists=True, dir_okay=False))
@click.option("--key", "key_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The capsule's content key file (written by `mlcapsule pack` as CAPSULE.key).")
@db_options
@key_options
def capsule_add(capsule_path: str, key_path: str, database_url: str | None, config: str | None,
                provider_key: str | None, passphrase_file: str | None) -> None:
    """Register CAPSULE and its content key. The database then holds the key: protect it like the key file."""
    settings = _settings(database_url, config, provider_key_path=provider_key, passphrase_file=passphrase_file)
    pub = _provider_public(settings) if settings is not None else b""  # remote: the server pins its own key
    if pub is None:
        err_console.print(f"[yellow]warning:[/] no provider key at {settings.provider_key_path}: not checking that "
                          "the capsule is signed by the key this server signs licenses with")
    info, new = _service(settings).register_capsule(capsule_path, key_path, provider_public=pub or None)
    state = "registered" if new else "already registered"
    console.print(f"{state}: {info['name']} (capsule {info['capsule_id']} v{info['version']}, "
                  f"lease size {info['lease_size']})")


@capsule.command("list")
@db_options
@_json_option
def capsule_list(database_url: str | None, config: str | None, as_json: bool) -> None:
    """List registered capsules (every version), with their grants and provisioned devices."""
    rows = _service(_settings(database_url, config)).list_capsules()
    if as_json:
        _print_json(rows)
        return
    t = Table("capsule", "id", "version", "lease", "grants", "devices", "registered")
    for r in rows:
        t.add_row(r["name"], r["capsule_id"], str(r["version"]), str(r["lease_size"]), str(r["grants"]),
                  str(r["devices"]), _when(r["registered"]))
    console.print(t)


@admin.command()
@click.argument("account_name", metavar="ACCOUNT")
@click.argument("capsule_ref", metavar="CAPSULE")
@click.option("--budget", type=click.IntRange(0), default=None,
              help="Queries in each device's license [default: unlimited].")
@click.option("--devices", type=click.IntRange(1), default=1, show_default=True,
              help="How many devices the account may provision (each once).")
@click.option("--expires", default=None, help="30d, 12h, an ISO 8601 time, or never [default: never].")
@click.option("--defense", "defenses", multiple=True, metavar="SPEC",
              help="Tighten the capsule's defense policy in this grant's licenses, e.g. prada:delta=0.95, "
                   "prada:action=lock, round:2 (repeatable; see docs/defenses.md). A spec that would loosen "
                   "the capsule's policy is refused.")
@db_options
def grant(account_name: str, capsule_ref: str, budget: int | None, devices: int, expires: str | None,
          defenses: tuple[str, ...], database_url: str | None, config: str | None) -> None:
    """Let ACCOUNT provision CAPSULE (a capsule file, or CAPSULE_ID[:VERSION]).

    Granting again replaces the terms, defenses included (and lifts a revocation); licenses already
    issued keep theirs.
    """
    when = parse_expires(expires)
    if when is not None and when <= dt.datetime.now(dt.UTC):
        err_console.print(f"[yellow]warning:[/] --expires {when.isoformat()} is in the past: licenses with it are "
                          "expired from the start", soft_wrap=True)
    r = _service(_settings(database_url, config)).grant(account_name, capsule_ref, budget=budget, devices=devices,
                                                        expires=when, defenses=list(defenses))
    console.print(f"{'granted' if r['created'] else 'updated grant'}: {r['account']} may provision "
                  f"{r['devices']} device(s) for {r['capsule']}, budget "
                  f"{'unlimited' if budget is None else budget} per device, expires {_when(r['expires'])} "
                  f"({r['devices_provisioned']} device(s) already provisioned)")
    if r["defenses"] and not r["checked"]:
        err_console.print("[yellow]warning:[/] this capsule was registered before the server kept defense policies: "
                          "the --defense specs were parsed but not checked against the capsule's own policy (give "
                          "CAPSULE as the capsule file, or run `admin capsule add` again, to check them); the "
                          "enclave refuses a loosening license at setup", soft_wrap=True)
    if r["policy"]:
        console.print("defenses in its licenses" + (" (the capsule's, tightened by this grant)" if r["defenses"]
                                                    else " (the capsule's)") + ":")
        for line in r["policy"]:
            console.print(f"  - {line}", soft_wrap=True)


@admin.command()
@click.argument("account_name", metavar="ACCOUNT")
@click.argument("capsule_ref", metavar="CAPSULE")
@db_options
def revoke(account_name: str, capsule_ref: str, database_url: str | None, config: str | None) -> None:
    """Refuse ACCOUNT's later challenges and provisions for CAPSULE.

    Devices already provisioned run offline: the server cannot reach them. They keep working
    until their license expires or their budget runs out; stop issuing them vouchers.
    """
    r = _service(_settings(database_url, config)).revoke(account_name, capsule_ref)
    console.print(f"revoked: {r['account']} can no longer provision {r['capsule']}")
    if r["devices_provisioned"]:
        err_console.print(f"[yellow]note:[/] {r['devices_provisioned']} device(s) already provisioned run offline and "
                          "cannot be reached; they keep working until their license expires or their budget is spent")


@admin.command()
@click.argument("license_id")
@click.option("--queries", type=click.IntRange(1, 10**12), required=True, help="Queries the voucher adds.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Voucher file to write (JSON).")
@db_options
@key_options
def voucher(license_id: str, queries: int, output: str, database_url: str | None, config: str | None,
            provider_key: str | None, passphrase_file: str | None) -> None:
    """Issue a provider-signed top-up of QUERIES for LICENSE_ID (the next in its sequence).

    LICENSE_ID may be a unique prefix of at least 8 characters, as `admin usage` shows it.
    """
    settings = _settings(database_url, config, provider_key_path=provider_key, passphrase_file=passphrase_file)
    env = _service(settings, with_key=True).issue_voucher(license_id, queries)
    atomic_write(output, json.dumps(env, indent=1).encode(), mode=0o644)
    console.print(f"voucher {env['body']['seq']} for license {env['body']['license_id']}: +{queries} queries, "
                  f"written to {output} "
                  f"(redeem with `mlcapsule topup`)")


@admin.command()
@click.option("--license", "license_id", required=True, metavar="LICENSE_ID",
              help="The license to unlock (a unique prefix of at least 8 characters, as `admin usage` shows it).")
@click.option("--device", "device_id", default=None, metavar="DEVICE_ID",
              help="Check that the license is this device's (a prefix of at least 8 characters will do).")
@click.option("--reset-detectors", is_flag=True,
              help="Also empty the detectors' state (PRADA's query sets, the out-of-distribution window).")
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False),
              help="Unlock voucher file to write (JSON) [default: print it].")
@db_options
@key_options
def unlock(license_id: str, device_id: str | None, reset_detectors: bool, output: str | None,
           database_url: str | None, config: str | None, provider_key: str | None, passphrase_file: str | None) -> None:
    """Issue a provider-signed unlock voucher for LICENSE_ID (the next in its device's sequence).

    It lifts a defense lock (or a degradation to labels) once, when the client applies it with
    `mlcapsule topup CAPSULE FILE`. See the alarms first: `mlcapsule admin alarms --license ID`.
    """
    settings = _settings(database_url, config, provider_key_path=provider_key, passphrase_file=passphrase_file)
    env = _service(settings, with_key=True).issue_unlock(license_id, device_id=device_id,
                                                           reset_detectors=reset_detectors)
    text = json.dumps(env, indent=1)
    b = env["body"]
    what = (f"unlock voucher {b['seq']} for license {b['license_id']} (device {b['device_id']})"
            + (", detectors reset" if b["reset"] else ""))
    if output is None:
        import sys

        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        err_console.print(f"{what} (apply with `mlcapsule topup CAPSULE FILE`)", soft_wrap=True)
        return
    atomic_write(output, text.encode(), mode=0o644)
    console.print(f"{what}, written to {output} (apply with `mlcapsule topup`)", soft_wrap=True)


@admin.command()
@click.option("--license", "license_id", default=None, metavar="LICENSE_ID",
              help="Only this license's alarms (a unique prefix of at least 8 characters will do).")
@db_options
@_json_option
def alarms(license_id: str | None, database_url: str | None, config: str | None, as_json: bool) -> None:
    """Defense alarms the devices reported in their receipts (after their `sync`), oldest first."""
    rows = _service(_settings(database_url, config)).alarms(license_id)
    if as_json:
        _print_json(rows)
        return
    if not rows:
        console.print("no alarms reported" + (f" for license {license_id}" if license_id else ""))
        return
    short = console.is_terminal
    cut = (lambda v: v[:8]) if short else (lambda v: v)
    t = Table(box=None, pad_edge=False, header_style="bold underline",
              caption="received in UTC; statistic vs threshold: prada W < delta, ood hits >= critical count, "
                      "kennen score >= threshold" + ("; ids shortened (full: --json)" if short else ""))
    for col in ("received", "account", "capsule"):
        t.add_column(col, no_wrap=col == "received")
    t.add_column("license", no_wrap=True, min_width=8)
    t.add_column("detector")
    for col in ("query", "statistic", "threshold"):
        t.add_column(col, justify="right", no_wrap=True)
    t.add_column("action")

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.4g}"

    for r in rows:
        t.add_row(r["received"].astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M"), r["account"], r["capsule"],
                  cut(r["license_id"]), r["detector"], str(r["query"]), num(r["statistic"]), num(r["threshold"]),
                  r["action"])
    console.print(t)


@admin.command()
@db_options
@_json_option
def usage(database_url: str | None, config: str | None, as_json: bool) -> None:
    """Usage reported by each device (from uploaded receipts)."""
    rows = _service(_settings(database_url, config)).usage()
    if as_json:
        _print_json(rows)
        return
    # On a terminal ids are shortened to 8 characters (a prefix `admin voucher` takes); piped or
    # redirected output keeps them whole, for scripts.
    short = console.is_terminal
    cut = (lambda v: v[:8]) if short else (lambda v: v)
    t = Table(box=None, pad_edge=False, header_style="bold underline",
              caption="times in UTC; " + ("ids shortened (full: --json); `admin voucher` takes a license-id prefix"
                                          if short else "`admin voucher` takes a license id"))
    t.add_column("account")
    t.add_column("capsule")
    for col in ("device", "license"):
        t.add_column(col, no_wrap=True, min_width=8)
    for col in ("budget", "charged", "answered", "rollbacks", "alarms"):
        t.add_column(col, justify="right", no_wrap=True)
    t.add_column("last sync", no_wrap=True)
    for r in rows:
        budget = "unlimited" if r["budget"] is None else str(r["budget"] + r["vouchers"])
        sync = r["last_sync"].astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M") if r["last_sync"] else "never"
        t.add_row(r["account"], r["capsule"] + (" (revoked)" if r["revoked"] else ""), cut(r["device_id"]),
                  cut(r["license_id"]), budget, str(r["charged"]), str(r["answered"]),
                  # detected by the enclave (rollback receipts) + receipt chains that forked
                  str(r["rollbacks"] + r["forks"]),
                  # alarms reported (`admin alarms`); "+N gap" when defense updates were lost
                  str(r["alarms"]) + (f" +{r['defense_gaps']} gap" if r["defense_gaps"] else ""), sync)
    console.print(t)


@admin.command("import-receipts")
@click.argument("report_file", metavar="FILE", type=click.Path(exists=True, dir_okay=False))
@db_options
def import_receipts(report_file: str, database_url: str | None, config: str | None) -> None:
    """Ingest usage receipts a client exported to FILE (`mlcapsule setup --replace --export-receipts FILE`).

    They are checked as an upload to /v1/usage is: signed by the device's enclave, continuing the
    chain the server holds (receipts already ingested are skipped, so importing twice is harmless).
    """
    try:
        report = json.loads(Path(report_file).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{report_file} is not a usage report (JSON)",
                         hint="give the file written by `mlcapsule setup --replace --export-receipts FILE`") from e
    account_name, head = _service(_settings(database_url, config)).import_usage(report)
    console.print(f"receipts imported for account {account_name}, license {report['license_id']}: chain at "
                  f"{head.seq}, {head.answered} queries answered, {head.charged} charged", soft_wrap=True)


@admin.command()
@db_options
def migrate(database_url: str | None, config: str | None) -> None:
    """Create or upgrade the database schema (every command and `serve` also do this on start)."""
    from ..server.db import make_engine, migrate as do_migrate, schema_revisions

    if _remote() is not None:
        raise UsageError("admin migrate works on a local database, not over --server",
                         hint="a server migrates its database when it starts; or run `mlcapsule admin migrate "
                              "--database-url URL` where the database is reachable")
    settings = _settings(database_url, config)
    engine = make_engine(settings.database_url)
    try:
        before, head = schema_revisions(engine)
        do_migrate(engine)
    finally:
        engine.dispose()
    where = _safe_url(settings.database_url)
    if before == head:
        console.print(f"{where}: schema at revision {head}, nothing to do")
    else:
        console.print(f"{where}: schema {'set up' if before is None else 'upgraded from ' + before} "
                      f"at revision {head}")


@admin.command("grants")
@db_options
@_json_option
def grants_list(database_url: str | None, config: str | None, as_json: bool) -> None:
    """List grants: account, capsule, terms, devices provisioned."""
    svc = _service(_settings(database_url, config))
    if _remote() is not None:
        rows = svc.list_grants()
    else:
        from ..server.admin_api import list_grants

        rows = list_grants(svc)
    if as_json:
        _print_json(rows)
        return
    t = Table("account", "capsule", "budget", "devices", "expires", "state", "defenses")
    for r in rows:
        t.add_row(r["account"], r["capsule"], "unlimited" if r["budget"] is None else str(r["budget"]),
                  f"{r['devices_provisioned']}/{r['devices']}", _when(r["expires"]),
                  "revoked" if r["revoked"] else "live", ", ".join(r["defenses"]) or "-")
    console.print(t)


@admin.group()
def token() -> None:
    """Admin API tokens (roles: read, operator)."""


def _tokens(database_url: str | None, config: str | None) -> Any:
    svc = _service(_settings(database_url, config))
    if _remote() is not None:
        return svc
    from ..server.admin_api import AdminTokens

    return AdminTokens(svc)


@token.command("create")
@click.option("--role", type=click.Choice(["read", "operator"]), required=True,
              help="read: list accounts, capsules, grants, usage, alarms; operator: everything.")
@click.option("--name", required=True, help="A name for the token (to list and revoke it).")
@db_options
def token_create(role: str, name: str, database_url: str | None, config: str | None) -> None:
    """Create an admin API token and print it (shown only this once; only a hash is stored)."""
    info, secret = _tokens(database_url, config).token_create(name, role)
    console.print(f"admin token {info['name']} ({info['role']}) created. The token (shown once, only a hash is "
                  "stored; give it with MLCAPSULE_ADMIN_TOKEN):")
    console.print(secret, soft_wrap=True)


@token.command("list")
@db_options
@_json_option
def token_list(database_url: str | None, config: str | None, as_json: bool) -> None:
    """List admin tokens (names and roles, never the tokens)."""
    rows = _tokens(database_url, config).token_list()
    if as_json:
        _print_json(rows)
        return
    t = Table("name", "role", "created", "revoked")
    for r in rows:
        t.add_row(r["name"], r["role"], _when(r["created"]), _when(r["revoked_at"]))
    console.print(t)


@token.command("revoke")
@click.argument("name")
@db_options
def token_revoke(name: str, database_url: str | None, config: str | None) -> None:
    """Revoke admin token NAME: refused from the next request on."""
    r = _tokens(database_url, config).token_revoke(name)
    console.print(f"admin token {r['name']} ({r['role']}) revoked")


def register(cli: click.Group) -> None:
    """Add ``serve`` and ``admin`` to the main command group."""
    cli.add_command(serve)
    cli.add_command(admin)
