"""``mlcapsule enclaved``: run, install and query the enclave service (its own system user)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..enclaved import DEFAULT_BASE, DEFAULT_SOCKET, DEFAULT_USER, UNIT_NAME


@click.group()
def enclaved() -> None:
    """The enclave service: enclaves under their own system user, so that the client's user
    account cannot read the model or refill the budget (only root can)."""


_socket = click.option("--socket", "socket_path", default=DEFAULT_SOCKET, show_default=True,
                       type=click.Path(dir_okay=False, path_type=Path), help="The Unix socket clients connect to.")
_state = click.option("--state-dir", default=DEFAULT_BASE, show_default=True,
                      type=click.Path(file_okay=False, path_type=Path),
                      help="Where the service keeps the platform secret and every user's sealed states.")
_backend = click.option("--backend", type=click.Choice(["software", "tpm"]), default="software", show_default=True)
_tcti = click.option("--tcti", help="tpm backend: how to reach the TPM (default: device:/dev/tpmrm0).")


@enclaved.command("run")
@_socket
@_state
@_backend
@_tcti
@click.option("--max-sessions-per-user", default=8, show_default=True, type=click.IntRange(1, 1024))
@click.option("--require-hardening", is_flag=True, help="Refuse to start workers the kernel cannot fully harden.")
def run_cmd(socket_path: Path, state_dir: Path, backend: str, tcti: str | None, max_sessions_per_user: int,
            require_hardening: bool) -> None:
    """Serve enclaves (run it as the service's user: systemd does, see `enclaved install`)."""
    import os

    from ..enclave.errors import UsageError
    from ..enclaved import ServiceConfig, run_service

    if os.geteuid() == 0:
        raise UsageError("the enclave service must not run as root",
                         hint="run it as its own user: `mlcapsule enclaved install` creates one and a systemd unit")
    run_service(ServiceConfig(socket_path=socket_path, base_dir=state_dir, backend=backend, tcti=tcti,
                              max_sessions_per_user=max_sessions_per_user, require_hardening=require_hardening))


@enclaved.command("install")
@click.option("--user", default=DEFAULT_USER, show_default=True, help="The system user the service runs as.")
@_socket
@_state
@_backend
@_tcti
@click.option("--unit-dir", default="/etc/systemd/system", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Where to write the systemd unit.")
def install_cmd(user: str, socket_path: Path, state_dir: Path, backend: str, tcti: str | None, unit_dir: Path) -> None:
    """Create the service's system user, its folders (0700) and a systemd unit (as root)."""
    from ..enclaved import install

    info = install(user=user, base_dir=state_dir, socket_path=socket_path, unit_dir=unit_dir, backend=backend,
                   tcti=tcti)
    click.echo(f"user {info['user']} (uid {info['uid']}){' created' if info['user_created'] else ''}; "
               f"state in {info['state_dir']} (0700); unit {info['unit']}")
    click.echo(f"next: systemctl daemon-reload && systemctl enable --now {UNIT_NAME}")


@enclaved.command("status")
@_socket
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status_cmd(socket_path: Path, as_json: bool) -> None:
    """Whether the service answers, as which user, and what it protects against."""
    from ..enclaved import service_info

    info = service_info(socket_path)
    if as_json:
        click.echo(json.dumps(info))
        return
    click.echo(f"enclave service on {socket_path}: user {info['service_user']}, backend {info['backend']}")
    click.echo(f"protects against: {info['protects_against']}")
    click.echo(f"does NOT protect against: {info['does_not_protect_against']}")
