"""The `mlcapsule` command line. Errors are caught in exactly one place: :func:`main`."""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from .. import __version__
from ..enclave._util import data_home
from ..enclave.errors import EXIT_CODES, MlcapsuleError, UsageError
from ._console import CliConsole

console = CliConsole(stderr=False, highlight=False)
err_console = CliConsole(stderr=True, highlight=False)

SOFTWARE_WARNING = ("The 'software' backend does NOT protect against the machine's owner or root: "
                    "they can read the model's weights and restore old state. It protects against "
                    "other unprivileged users and keeps data from leaving through the enclave.")


def default_provider_key() -> Path:
    return data_home() / "provider" / "provider-key.pem"


def _passphrase(passphrase_file: str | None) -> bytes | None:
    if passphrase_file:
        return Path(passphrase_file).read_bytes().rstrip(b"\r\n")
    env = os.environ.get("MLCAPSULE_PASSPHRASE")
    return env.encode() if env else None


@click.group(context_settings={"help_option_names": ["-h", "--help"]},
             epilog="Exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()))
@click.version_option(__version__, prog_name="mlcapsule")
def cli() -> None:
    """mlcapsule: run a provider's model on your machine, inside an enclave, under the provider's terms."""


# -- provider ----------------------------------------------------------------------------------
@cli.group()
def provider() -> None:
    """Provider keys."""


@provider.command("init")
@click.option("--key", "key_path", type=click.Path(dir_okay=False), default=None,
              help="Where to write the Ed25519 signing key [default: $MLCAPSULE_HOME/provider/provider-key.pem].")
@click.option("--passphrase-file", type=click.Path(exists=True, dir_okay=False),
              help="Encrypt the key with the passphrase in this file (or set MLCAPSULE_PASSPHRASE).")
@click.option("--force", is_flag=True,
              help="Replace an existing key (capsules signed with it can no longer be re-signed).")
def provider_init(key_path: str | None, passphrase_file: str | None, force: bool) -> None:
    """Create the provider's signing key (mode 0600)."""
    from ..enclave.crypto.keys import generate_provider_key, key_id

    path = Path(key_path) if key_path else default_provider_key()
    pub = generate_provider_key(path, passphrase=_passphrase(passphrase_file), overwrite=force)
    console.print(f"provider key written to {path} (mode 0600), public key {path}.pub, key id {key_id(pub)}")


# -- pack, inspect, verify ---------------------------------------------------------------------
def _preprocessing(image_size: str | None, channels: int, layout: str, scale: float | None,
                   mean: str | None, std: str | None) -> dict[str, Any] | None:
    if image_size is None and scale is None:
        return None
    size = None
    if image_size:
        try:
            h, _, w = image_size.lower().partition("x")
            size = [int(h), int(w or h)]
        except ValueError as e:
            raise UsageError(f"--image-size {image_size!r} must look like 224x224") from e

    def floats(s: str | None) -> list[float] | None:
        if s is None:
            return None
        try:
            return [float(v) for v in s.split(",")]
        except ValueError as e:
            raise UsageError(f"{s!r} must be comma-separated numbers") from e

    return {"kind": "image" if size else "tensor", "image_size": size, "channels": channels, "layout": layout,
            "scale": 1.0 if scale is None else scale, "mean": floats(mean), "std": floats(std), "dtype": "float32"}


def _class_names(spec: str | None) -> list[str] | None:
    if not spec:
        return None
    p = Path(spec)
    if p.is_file():
        return [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
    return [c.strip() for c in spec.split(",")]


@cli.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The capsule file to write.")
@click.option("--key", "key_path", type=click.Path(dir_okay=False), default=None, help="Provider signing key.")
@click.option("--passphrase-file", type=click.Path(exists=True, dir_okay=False))
@click.option("--name", help="Capsule name [default: output file stem].")
@click.option("--capsule-id", help="Keep the id of an earlier version (a UUID) [default: new].")
@click.option("--version", "cversion", type=click.IntRange(0, 2**31 - 1), default=1, show_default=True)
@click.option("--description", default="")
@click.option("--provider-name", default="")
@click.option("--server-url", help="The provider's provisioning server, recorded in the manifest.")
@click.option("--image-size", help="Images are resized to HxW, e.g. 224x224.")
@click.option("--channels", type=click.Choice(["1", "3"]), default="3", show_default=True)
@click.option("--layout", type=click.Choice(["NCHW", "NHWC", "flat"]), default="NCHW", show_default=True)
@click.option("--scale", type=float, help="Multiply pixel values (0-255) by this, e.g. 0.00392156862745098.")
@click.option("--mean", help="Per-channel mean to subtract after scaling, comma-separated.")
@click.option("--std", help="Per-channel std to divide by, comma-separated.")
@click.option("--class-names", help="Comma-separated class names, or a file with one per line.")
@click.option("--budget", type=click.IntRange(0), help="Default query budget [default: unlimited].")
@click.option("--expires", help="Default expiry: ISO 8601 time or a duration like 30d.")
@click.option("--lease-size", type=click.IntRange(1, 1_000_000), default=100, show_default=True)
@click.option("--public-architecture", is_flag=True, help="Leave the graph in the clear (weights stay encrypted).")
@click.option("--key-output", type=click.Path(dir_okay=False), help="Content key file [default: OUTPUT.key].")
@click.option("--force", is_flag=True, help="Replace an existing capsule and its key file (clients set up with "
                                          "the old capsule then cannot be provisioned again).")
@click.option("--no-tune", is_flag=True,
              help="Take the first ONNX Runtime configuration that reproduces the plain model's outputs, "
                   "without timing the others (packs large models faster; may run slower).")
@click.option("--defense", "defenses", multiple=True, metavar="SPEC",
              help="A defense the enclave enforces, e.g. prada:delta=0.9,action=lock, ood, mi-noise:c=0.5, "
                   "top-k:3, round:2, label-only, kennen:threshold=0.5 (repeatable; docs/defenses.md).")
@click.option("--defense-data", type=click.Path(exists=True, dir_okay=False), metavar="FILE.npy",
              help="Training inputs for the ood defense's statistics (only statistics go in the capsule).")
@click.option("--kennen-detector", type=click.Path(exists=True, dir_okay=False), metavar="FILE.onnx",
              help="The kennen-io detector model for the kennen defense (docs/defense-training.md).")
def pack(model: str, output: str, key_path: str | None, passphrase_file: str | None, name: str | None,
         capsule_id: str | None, cversion: int, description: str, provider_name: str, server_url: str | None,
         image_size: str | None, channels: str, layout: str, scale: float | None, mean: str | None, std: str | None,
         class_names: str | None, budget: int | None, expires: str | None, lease_size: int,
         public_architecture: bool, key_output: str | None, no_tune: bool, force: bool,
         defenses: tuple[str, ...], defense_data: str | None, kennen_detector: str | None) -> None:
    """Pack an ONNX MODEL into an encrypted, signed capsule."""
    from rich.progress import BarColumn, Progress, TextColumn

    from ..enclave.format.manifest import Policy
    from ..packer import pack as do_pack
    from .admin import parse_expires

    policy = Policy(budget=budget, expires=parse_expires(expires), lease_size=lease_size)
    warn_if_past(policy.expires, "--expires")
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[detail]}"),
                  console=err_console, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def progress(stage: str, done: int, total: int) -> None:
            label = "verify (checking ONNX Runtime configurations)" if stage == "verify" else stage
            if stage not in tasks:
                tasks[stage] = bar.add_task(label, total=total, detail="")
            bar.update(tasks[stage], completed=done, total=total, detail=_progress_detail(stage, done, total))

        res = do_pack(model, output, provider_key=key_path or default_provider_key(),
                      passphrase=_passphrase(passphrase_file), name=name, version=cversion, capsule_id=capsule_id,
                      description=description, provider_name=provider_name, server_url=server_url,
                      preprocessing=_preprocessing(image_size, int(channels), layout, scale, mean, std),
                      class_names=_class_names(class_names), policy=policy,
                      public_architecture=public_architecture, key_output=key_output, progress=progress,
                      tune_runtime=not no_tune, force=force, defenses=list(defenses) or None,
                      defense_data=_load_npy(defense_data) if defense_data else None,
                      kennen_detector=kennen_detector)
    m = res.manifest
    rt = m.runtime
    console.print(f"packed {res.capsule_path} (capsule {m.capsule_id} v{m.version}; ONNX Runtime: initializers "
                  f"'{rt.initializers}', optimization '{rt.optimization}', "
                  f"prepacking {'on' if rt.prepacking else 'off'}, "
                  f"{'fastest correct' if not no_tune else 'first correct'} configuration, verified against plain "
                  "ONNX Runtime)")
    console.print(f"content key: {res.key_path} (mode 0600; keep it at the provider, never ship it)")
    for line in _defense_lines(m):
        console.print(f"defense: {line}")


def _load_npy(path: str) -> Any:
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is not a .npy array file: {e}") from e


def _defense_lines(m: Any) -> list[str]:
    """The capsule's defense policy in words (what a client should know about its answers)."""
    if not m.policy.defenses:
        return []
    from ..enclave.defenses.policy import DefensePolicy

    return DefensePolicy.from_dict(m.policy.defenses).describe()


def _progress_detail(stage: str, done: int, total: int) -> str:
    """The text beside a pack progress bar: sizes for the stages that move bytes, nothing for verify."""
    if stage == "verify":
        return "done" if total and done >= total else ""
    return f"{done / 1e6:.1f}/{total / 1e6:.1f} MB"


def warn_if_past(when: Any, what: str) -> None:
    if when is not None and when <= dt.datetime.now(dt.UTC):
        err_console.print(f"[yellow]warning:[/] {what} {when.isoformat()} is in the past: licenses with it are "
                          "expired from the start", soft_wrap=True)


def _load_trusted(trust: str | None) -> bytes | None:
    if not trust:
        return None
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        pub = serialization.load_pem_public_key(Path(trust).read_bytes())
    except (ValueError, OSError) as e:
        raise UsageError(f"{trust} is not a PEM public key") from e
    if not isinstance(pub, Ed25519PublicKey):
        raise UsageError(f"{trust} is not an Ed25519 public key")
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


#: The provider key a client trusts for one capsule version, next to its state (trust on first
#: use: recorded by the first setup, or the first command that loads the license, unless --trust
#: gave it).
PIN_FILE = "provider-key.pem.pub"

UNSAFE_TRUST_WARNING = ("--unsafe-trust-manifest-key: trusting whatever provider key the capsule names. "
                        "This checks integrity only: anyone can re-sign a modified capsule with a key of "
                        "their own. Pin the provider's key with --trust KEY.pub instead.")

_trust_option = click.option(
    "--trust", "trust_file", type=click.Path(exists=True, dir_okay=False), metavar="KEY.pub",
    help="The provider's public key (PEM): open the capsule only if it is signed by this key "
         "[default: the key remembered for this capsule at its first setup].")
_unsafe_trust_option = click.option(
    "--unsafe-trust-manifest-key", "unsafe_trust", is_flag=True,
    help="UNSAFE: trust whatever provider key the capsule names (integrity only, not origin).")


def _pin_path(capsule: str, state_dir: str | None) -> tuple[Path, Any]:
    """Where the pin for CAPSULE lives, and its manifest. The manifest is read under its own key
    here only to find the capsule's state folder; the capsule is opened again under the pin."""
    from ..client import default_state_dir
    from ..enclave.format.container import CapsuleFile
    from ..enclave.format.trust import UnsafeTrustManifestKey

    with CapsuleFile(capsule, trust=UnsafeTrustManifestKey()) as cf:
        m = cf.manifest
    return (Path(state_dir) if state_dir else default_state_dir(m)) / PIN_FILE, m


def _client_trust(capsule: str, trust_file: str | None, unsafe: bool, state_dir: str | None, *,
                  first_use: bool) -> tuple[Any, Path | None]:
    """The trust decision of a client command: (decision, pin file to write once the provider's
    license confirmed the key, or None).

    ``--trust KEY.pub`` pins that key; else the remembered pin; else, with ``first_use``, trust on
    first use: the key the capsule names, remembered only after the enclave accepted a license
    signed by it. ``--unsafe-trust-manifest-key`` trusts the manifest's key, with a warning.
    """
    from ..enclave.crypto.keys import ed25519_public_from_raw, key_id
    from ..enclave.format.trust import TrustProviderKey, UnsafeTrustManifestKey

    if trust_file and unsafe:
        raise UsageError("--trust and --unsafe-trust-manifest-key exclude each other")
    if unsafe:
        err_console.print(f"[bold yellow]warning:[/] {UNSAFE_TRUST_WARNING}", soft_wrap=True)
        return UnsafeTrustManifestKey(), None
    pin, m = _pin_path(capsule, state_dir)
    if trust_file:
        raw = _load_trusted(trust_file)
        assert raw is not None
        return TrustProviderKey(raw), pin
    if pin.is_file():
        raw = _load_trusted(str(pin))
        assert raw is not None
        return TrustProviderKey(raw), None
    if not first_use:
        raise UsageError(f"no provider key is pinned for {capsule}",
                         hint="pass the provider's public key with --trust KEY.pub (or, to check integrity only, "
                              "--unsafe-trust-manifest-key)")
    err_console.print(f"[yellow]note:[/] no provider key pinned for {Path(capsule).name}: trusting the key it names "
                      f"(key id {key_id(ed25519_public_from_raw(m.provider_key))}) on first use; it is remembered "
                      f"once the provider's license confirms it. Pass --trust KEY.pub to pin the key yourself.",
                      soft_wrap=True)
    return TrustProviderKey(m.provider_key), pin


def _remember_pin(pin: Path | None, trust: Any) -> None:
    """Write the pin (mode 0644, beside the state) once a license signed by the key was accepted."""
    from ..enclave._util import atomic_write
    from ..enclave.crypto.keys import ed25519_public_from_raw, public_key_pem

    if pin is None or not pin.parent.is_dir():
        return
    atomic_write(pin, public_key_pem(ed25519_public_from_raw(trust.key)), mode=0o644)


@cli.command()
@click.argument("capsule", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
@_trust_option
@_unsafe_trust_option
def inspect(capsule: str, as_json: bool, trust_file: str | None, unsafe_trust: bool) -> None:
    """Show a capsule's public manifest (checks its signature under the pinned provider key; needs no content key)."""
    from ..enclave.crypto.keys import ed25519_public_from_raw, key_id
    from ..enclave.format.container import CapsuleFile

    trust, _ = _client_trust(capsule, trust_file, unsafe_trust, None, first_use=False)
    with CapsuleFile(capsule, trust=trust) as cf:
        m = cf.manifest
    if as_json:
        _print_json(m.to_dict())
        return
    t = Table(show_header=False, box=None)
    t.add_row("capsule", f"{m.name}  id {m.capsule_id}  version {m.version}")
    t.add_row("created", m.created.isoformat())
    t.add_row("provider", f"{m.provider_name or '(unnamed)'}  key id {key_id(ed25519_public_from_raw(m.provider_key))}")
    t.add_row("server", m.server_url or "-")
    for s in m.inputs:
        t.add_row("input", f"{s.name}: {s.dtype} {list(s.shape)}")
    for s in m.outputs:
        t.add_row("output", f"{s.name}: {s.dtype} {list(s.shape)}")
    if m.preprocessing:
        t.add_row("preprocessing", json.dumps(m.preprocessing))
    if m.class_names:
        more = f", ... ({len(m.class_names)} classes)" if len(m.class_names) > 10 else ""
        shown = ", ".join(m.class_names[:10]) + more
        t.add_row("classes", shown)
    t.add_row("architecture", "public (graph in the clear)" if m.public_architecture else "encrypted")
    p = m.policy
    t.add_row("default policy", f"budget {'unlimited' if p.budget is None else p.budget}, "
              f"expires {p.expires.isoformat() if p.expires else 'never'}, lease {p.lease_size}")
    t.add_row("runtime", f"optimization {m.runtime.optimization}, "
              f"prepacking {'on' if m.runtime.prepacking else 'off'}, initializers {m.runtime.initializers}")
    for line in _defense_lines(m) or ["none: answers are the model's own outputs"]:
        t.add_row("defenses", line)
    for seg in m.segments:
        t.add_row(f"segment {seg.index}",
                  f"{seg.name}: {seg.length} bytes, {'encrypted' if seg.encrypted else 'plaintext'}")
    console.print(t)


@cli.command()
@click.argument("capsule", type=click.Path(dir_okay=False))
@_trust_option
@_unsafe_trust_option
def verify(capsule: str, trust_file: str | None, unsafe_trust: bool) -> None:
    """Check a capsule's signature, structure and segment hashes, without the content key."""
    from ..enclave.format.container import CapsuleFile

    trust, _ = _client_trust(capsule, trust_file, unsafe_trust, None, first_use=False)
    with CapsuleFile(capsule, trust=trust) as cf:
        cf.verify_segments()
        m = cf.manifest
    origin = ("signed by the trusted provider key" if cf.origin_verified
              else "self-consistent only: the provider key was NOT checked (--unsafe-trust-manifest-key)")
    console.print(f"OK: {capsule} is intact: capsule {m.capsule_id} v{m.version}, {len(m.segments)} segments, {origin}")


# -- run and status ----------------------------------------------------------------------------
class Interrupted(MlcapsuleError):
    """Ctrl-C during a predict: the answered sub-batches were written, the rest not charged."""

    exit_code = 130
    default_hint = "run predict again on the inputs that were not answered"


def _print_predictions(first: Any, manifest: Any, out: str | None, top_k: int,
                       sources: list[tuple[str, int]] | None = None) -> None:
    """Write or print the model's first output. ``sources``: (input file, samples) in batch order,
    so every JSON row says which input it answers."""
    from ..io import format_outputs, write_outputs

    if out:
        write_outputs(first, Path(out))
        console.print(f"wrote {first.shape[0]} predictions to {out}", soft_wrap=True)
        return
    rows = format_outputs(first, manifest.class_names, top_k=top_k)
    if sources:
        labels = [(name, i) for name, n in sources for i in range(n)]
        if len(labels) == len(rows):
            rows = [{"input": name, "row": i, **r} for (name, i), r in zip(labels, rows, strict=True)]
    _print_json(rows)


def _print_json(obj: Any) -> None:
    """Indented JSON on a terminal; one unwrapped line elsewhere (pipes, files)."""
    text = json.dumps(obj, default=str)
    if console.is_terminal:
        console.print_json(text)
    else:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def _answer_in_leases(cap: Any, x: Any, lease: int | None) -> tuple[Any, int]:
    """Answer ``x`` in sub-batches of about one lease, so each is charged as it is answered and
    Ctrl-C loses at most the sub-batch in flight. Returns (answers so far, samples in x). A first
    Ctrl-C stops after the sub-batch in flight; a second one stops at once."""
    import signal

    import numpy as np

    name = cap.manifest.inputs[0].name
    first_dim = cap.manifest.inputs[0].shape[0] if cap.manifest.inputs[0].shape else None
    n = int(x.shape[0]) if getattr(x, "ndim", 0) else 1
    if not lease or isinstance(first_dim, int) and first_dim > 0 or x.ndim == 0:
        step = max(n, 1)  # a fixed batch size (or a scalar): one call
    else:
        step = max(1, int(lease))
    stop = {"asked": False}
    previous = None

    def on_sigint(signum: int, frame: Any) -> None:
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread: no handler, a KeyboardInterrupt cannot happen here
        previous = None
    done: list[Any] = []
    answered = 0
    try:
        for start in range(0, max(n, 1), step):
            if stop["asked"]:
                break
            out = cap.run({name: x[start:start + step] if x.ndim else x})
            done.append(out[cap.manifest.outputs[0].name])
            answered = min(n, start + step)
    except KeyboardInterrupt:
        stop["asked"] = True
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if not done:
        result = None
    elif len(done) == 1:
        result = done[0]
    else:
        result = np.concatenate(done, axis=0)
    if stop["asked"] and answered < n:
        return result, -answered  # negative: interrupted after that many
    return result, n


def _predict(cap: Any, inputs: tuple[str, ...], output: str | None, top_k: int) -> None:
    """Load, answer sub-batch by sub-batch, write. On Ctrl-C the answered part is written."""
    x, sources = _load_inputs_with_sources(inputs, cap.manifest)
    lease = None
    if cap.load_info and cap.load_info.get("license") == "license":
        lease = (cap.status().get("license_status") or {}).get("lease_size") or cap.manifest.policy.lease_size
    first, count = _answer_in_leases(cap, x, lease)
    if count < 0:
        answered = -count
        where = "nothing"
        if first is not None and answered:
            if output:
                _print_predictions(first, cap.manifest, output, top_k)
                where = output
            else:
                _print_predictions(first, cap.manifest, None, top_k, _truncate_sources(sources, answered))
                where = "stdout"
        raise Interrupted(f"interrupted: {answered} of {x.shape[0]} inputs answered and written to {where}; "
                          "the rest was not charged")
    _print_predictions(first, cap.manifest, output, top_k, sources)


def _truncate_sources(sources: list[tuple[str, int]], n: int) -> list[tuple[str, int]]:
    out = []
    for name, k in sources:
        if n <= 0:
            break
        out.append((name, min(k, n)))
        n -= k
    return out


_memory_limit_option = click.option(
    "--memory-limit", type=click.FloatRange(min=8), metavar="MB",
    help="Streaming mode for enclaves with little memory: the enclave process stays within MB MiB above its "
         "memory at start, decrypting the weights segment by segment for every query (slower).")


@cli.command()
@click.argument("capsule", type=click.Path(exists=True, dir_okay=False))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--unsafe-dev-key", required=True, type=click.Path(exists=True, dir_okay=False),
              help="UNSAFE, for development: load the capsule with the provider's content key file.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write outputs to .npy, .json or .csv.")
@click.option("--top-k", type=click.IntRange(1), default=5, show_default=True)
@click.option("--state-dir", type=click.Path(file_okay=False))
@_memory_limit_option
@_trust_option
def run(capsule: str, inputs: tuple[str, ...], unsafe_dev_key: str, output: str | None, top_k: int,
        state_dir: str | None, memory_limit: float | None, trust_file: str | None) -> None:
    """Run CAPSULE on INPUTS with the provider's key file (development only)."""
    from ..client import open_capsule
    from ..enclave.format.trust import TrustProviderKey, UnsafeTrustManifestKey
    from ..io import check_output_path

    if output:
        check_output_path(output)
    # The content key file is the provider's own secret: it is this command's trust anchor. Without
    # --trust, the capsule's own key is trusted, and the warning says so.
    raw = _load_trusted(trust_file)
    trust = TrustProviderKey(raw) if raw is not None else UnsafeTrustManifestKey()
    err_console.print("[yellow]warning:[/] --unsafe-dev-key bypasses the license: for development and tests only"
                      + ("" if raw is not None
                         else "; the capsule's provider key is not checked (pass --trust KEY.pub)"),
                      soft_wrap=True)
    with open_capsule(capsule, trust=trust, unsafe_dev_key=unsafe_dev_key, state_dir=state_dir,
                      memory_limit_mb=memory_limit) as cap:
        _predict(cap, inputs, output, top_k)


def _load_inputs(inputs: tuple[str, ...], manifest: Any) -> Any:
    return _load_inputs_with_sources(inputs, manifest)[0]


def _load_inputs_with_sources(inputs: tuple[str, ...], manifest: Any) -> tuple[Any, list[tuple[str, int]]]:
    """The batch, and (input file, samples) for each file in batch order."""
    import numpy as np

    from ..io import Preprocessing, load_inputs

    if len(manifest.inputs) != 1:
        raise UsageError("the CLI runs models with one input; use the Python API for several")
    spec = manifest.inputs[0]
    # Without preprocessing in the manifest, inputs are model-ready arrays (kind "tensor").
    prep = Preprocessing.from_dict(manifest.preprocessing) if manifest.preprocessing else Preprocessing()
    paths = [Path(p) for p in inputs]
    fixed = bool(spec.shape) and isinstance(spec.shape[0], int) and spec.shape[0] > 0
    if len(paths) == 1 or fixed:
        x = load_inputs(paths, prep, spec.shape)
        sources = [(str(paths[0]), int(x.shape[0]))] if len(paths) == 1 and x.ndim else []
        return x.astype(spec.dtype, copy=False), sources
    parts = [load_inputs([p], prep, spec.shape) for p in paths]
    if len({p.shape[1:] for p in parts}) > 1:
        load_inputs(paths, prep, spec.shape)  # raises the error that names each file's shape
    x = np.concatenate(parts, axis=0)
    return x.astype(spec.dtype, copy=False), [(str(p), int(a.shape[0])) for p, a in zip(paths, parts, strict=True)]


_token_option = click.option("--token", envvar="MLCAPSULE_TOKEN", required=True,
                             help="Your account token from the provider (or set MLCAPSULE_TOKEN).")
_server_option = click.option("--server", help="The provider's server URL [default: the one in the capsule].")
_state_option = click.option("--state-dir", type=click.Path(file_okay=False),
                             help="Where the sealed state lives [default: $MLCAPSULE_HOME/state/ID-vN].")


def _backend_options(f: Any) -> Any:
    """--backend, --tcti and --tsm-path (setup remembers them next to the state; later commands reuse them)."""
    f = click.option("--tsm-path", type=click.Path(file_okay=False), default=None,
                     help="cvm backend: the configfs-tsm report folder [default: $MLCAPSULE_TSM_PATH, else "
                          "/sys/kernel/config/tsm/report].")(f)
    f = click.option("--tcti", help="tpm and cvm backends: how to reach the (v)TPM, e.g. device:/dev/tpmrm0 or "
                                    "swtpm:path=SOCKET [tpm default: $MLCAPSULE_TPM_TCTI, else device:/dev/tpmrm0]; "
                                    "cvm: none for no vTPM (then NO rollback protection) [cvm default: "
                                    "device:/dev/tpmrm0 if it exists, else none].")(f)
    return click.option("--backend", type=click.Choice(["software", "tpm", "cvm"]), default=None,
                        help="Enclave backend [default: the one that set the capsule up, else software].")(f)


@cli.command()
@click.argument("capsule", type=click.Path(exists=True, dir_okay=False))
@_token_option
@_server_option
@_state_option
@_backend_options
@click.option("--replace", is_flag=True,
              help="Replace the license of a device that is already set up (its receipts are synced first; "
                   "the new license inherits nothing from the old one).")
@click.option("--export-receipts", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="With --replace: write the old license's unsynced receipts to FILE instead of syncing them.")
@_trust_option
@_unsafe_trust_option
def setup(capsule: str, token: str, server: str | None, state_dir: str | None, backend: str | None,
          tcti: str | None, tsm_path: str | None, replace: bool, export_receipts: str | None, trust_file: str | None,
          unsafe_trust: bool) -> None:
    """Set up CAPSULE on this device: attest the enclave to the provider and receive the license (online, once).

    The provider key is pinned with --trust KEY.pub, else the key the capsule names is trusted on
    first use and remembered once the provider's license, signed by it, was accepted."""
    from ..client import open_capsule

    if export_receipts and not replace:
        raise UsageError("--export-receipts goes with --replace", hint="add --replace, or leave --export-receipts out")
    trust, pin = _client_trust(capsule, trust_file, unsafe_trust, state_dir, first_use=True)
    with open_capsule(capsule, trust=trust, state_dir=state_dir, backend=backend, tcti=tcti,
                      tsm_path=tsm_path) as cap:
        info = cap.setup(token=token, server=server, replace=replace, export_receipts=export_receipts)
        _remember_pin(pin, trust)
    budget = "unlimited" if info["budget"] is None else info["budget"]
    console.print(f"set up: license {info['license_id']} for device {info['device_id']}, budget {budget} queries, "
                  f"expires {info['expires'] or 'never'}. Predictions now run offline.")


@cli.command()
@click.argument("capsule", type=click.Path(exists=True, dir_okay=False))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write outputs to .npy, .json or .csv.")
@click.option("--top-k", type=click.IntRange(1), default=5, show_default=True)
@_state_option
@_backend_options
@_memory_limit_option
@_trust_option
@_unsafe_trust_option
def predict(capsule: str, inputs: tuple[str, ...], output: str | None, top_k: int, state_dir: str | None,
            backend: str | None, tcti: str | None, tsm_path: str | None, memory_limit: float | None,
            trust_file: str | None,
            unsafe_trust: bool) -> None:
    """Predict offline with a set-up CAPSULE. Each input row is charged to the budget before it is answered.

    Inputs are answered in sub-batches of one lease, each charged as it is answered: Ctrl-C
    writes what was answered and loses at most the sub-batch in flight.
    """
    from ..client import open_capsule
    from ..enclave.errors import NotProvisionedError
    from ..io import check_output_path

    if output:
        check_output_path(output)  # every argument is checked before anything is charged
    trust, pin = _client_trust(capsule, trust_file, unsafe_trust, state_dir, first_use=True)
    with open_capsule(capsule, trust=trust, state_dir=state_dir, backend=backend, tcti=tcti, tsm_path=tsm_path,
                      memory_limit_mb=memory_limit) as cap:
        if not cap.is_set_up:
            raise NotProvisionedError(f"{capsule} is not set up on this device")
        _remember_pin(pin, trust)  # the enclave loaded a license signed by this key
        _predict(cap, inputs, output, top_k)


@cli.command()
@click.argument("capsule", type=click.Path(exists=True, dir_okay=False))
@click.argument("voucher", type=click.Path(exists=True, dir_okay=False))
@_state_option
@_trust_option
@_unsafe_trust_option
def topup(capsule: str, voucher: str, state_dir: str | None, trust_file: str | None, unsafe_trust: bool) -> None:
    """Redeem a provider's VOUCHER file for CAPSULE, offline."""
    from ..client import open_capsule
    from ..enclave.errors import NotProvisionedError

    try:
        envelope = json.loads(Path(voucher).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{voucher} is not a voucher file (JSON)") from e
    trust, pin = _client_trust(capsule, trust_file, unsafe_trust, state_dir, first_use=True)
    with open_capsule(capsule, trust=trust, state_dir=state_dir) as cap:
        if not cap.is_set_up:
            raise NotProvisionedError(f"{capsule} is not set up on this device")
        _remember_pin(pin, trust)
        _check_voucher_license(envelope, cap, voucher)
        info = cap.topup(envelope)
    console.print(f"voucher {info['vouchers_redeemed']} redeemed: {info['remaining']} queries left of {info['budget']}")


def _check_voucher_license(envelope: Any, cap: Any, voucher: str) -> None:
    """A voucher issued for another license is refused with that cause (not as a damaged file)."""
    body = envelope.get("body") if isinstance(envelope, dict) else None
    theirs = body.get("license_id") if isinstance(body, dict) else None
    ours = (cap.status().get("license_status") or {}).get("license_id")
    if isinstance(theirs, str) and ours and theirs != ours:
        raise UsageError(f"{voucher} is a voucher for license {theirs[:64]}, not for this device's license {ours}",
                         hint="nothing was redeemed; ask the provider for a voucher for license "
                              f"{ours} (`mlcapsule status CAPSULE` shows it)")


@cli.command()
@click.argument("capsule", type=click.Path(exists=True, dir_okay=False))
@_token_option
@_server_option
@_state_option
@_trust_option
@_unsafe_trust_option
def sync(capsule: str, token: str, server: str | None, state_dir: str | None, trust_file: str | None,
         unsafe_trust: bool) -> None:
    """Upload the enclave's signed usage receipts to the provider (online)."""
    from ..client import open_capsule
    from ..enclave.errors import NotProvisionedError

    trust, pin = _client_trust(capsule, trust_file, unsafe_trust, state_dir, first_use=True)
    with open_capsule(capsule, trust=trust, state_dir=state_dir) as cap:
        if not cap.is_set_up:
            raise NotProvisionedError(f"{capsule} is not set up on this device")
        _remember_pin(pin, trust)
        ack = cap.sync(token=token, server=server)
    console.print(f"usage uploaded: receipts up to {ack['seq']}, {ack['answered']} queries answered, "
                  f"{ack['charged']} charged")


@cli.command()
@click.argument("capsule", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("--unsafe-dev-key", type=click.Path(exists=True, dir_okay=False))
@_state_option
@_backend_options
@click.option("--json", "as_json", is_flag=True)
@_trust_option
@_unsafe_trust_option
def status(capsule: str | None, unsafe_dev_key: str | None, state_dir: str | None, backend: str | None,
           tcti: str | None, tsm_path: str | None, as_json: bool, trust_file: str | None,
           unsafe_trust: bool) -> None:
    """What the enclave backend protects against, its hardening, and (with CAPSULE) the capsule's license."""
    from ..client import open_capsule
    from ..host import EnclaveProcess

    if capsule:
        trust, pin = _client_trust(capsule, trust_file, unsafe_trust, state_dir, first_use=True)
        with open_capsule(capsule, trust=trust, unsafe_dev_key=unsafe_dev_key, state_dir=state_dir, backend=backend,
                          tcti=tcti, tsm_path=tsm_path) as cap:
            info = cap.status()
            if cap.load_info and cap.load_info.get("license") == "license":
                _remember_pin(pin, trust)  # the enclave loaded a license signed by this key
    else:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="mlcapsule-status-") as tmp:
            dummy = Path(tmp) / "none"
            dummy.touch()
            with EnclaveProcess(capsule or dummy, state_dir=Path(tmp) / "state", backend=backend or "software",
                                tcti=tcti if backend in ("tpm", "cvm") else None,
                                tsm_path=(tsm_path or os.environ.get("MLCAPSULE_TSM_PATH")) if backend == "cvm"
                                else None) as enc:
                info = enc.call("status")
    if as_json:
        _print_json(info)
        return
    tm = info["threat_model"]
    # Whole: providers paste it into `serve --allow-measurement`.
    console.print(f"[bold]backend:[/] {info['backend']}    measurement {info['measurement']}", soft_wrap=True)
    console.print("[green]protects against:[/]")
    for s in tm["protects_against"]:
        console.print(f"  + {s}")
    console.print("[red]does NOT protect against:[/]")
    for s in tm["does_not_protect_against"]:
        console.print(f"  - {s}")
    if info["backend"] == "software":
        console.print(f"[bold red]warning:[/] {SOFTWARE_WARNING}")
    _print_platform(tm.get("platform"))
    h = info.get("hardening", {})
    console.print("[bold]worker hardening:[/] " + "; ".join(f"{k}: {v}" for k, v in h.items()))
    if info.get("capsule"):
        c = info["capsule"]
        console.print(f"[bold]capsule:[/] {c['name']} {c['capsule_id']} v{c['version']}, license: {info['license']}")
    lic = info.get("license_status")
    if lic:
        t = Table(show_header=False, box=None)
        for k in ("license_id", "device_id", "budget", "charged", "answered", "remaining", "lease_size", "expires",
                  "vouchers_redeemed", "receipts_pending", "rollbacks_detected"):
            shown = "unlimited" if lic[k] is None and k in ("budget", "remaining") else str(lic[k])
            t.add_row(k.replace("_", " "), shown)
        console.print(t)
        if not lic["rollback_protected"]:
            console.print("[yellow]note:[/] on this backend, restoring an old copy of the sealed state is NOT detected")
    d = info.get("defenses")
    if d:
        console.print("[bold]defenses[/] (enforced in the enclave; a license may tighten them):")
        for line in d["policy"]:
            console.print(f"  * {line}", soft_wrap=True)
        st = d.get("state")
        if st:
            alarms = ("" if "alarms" not in st else
                      ", alarms: " + (", ".join(f"{k} {v}" for k, v in st["alarms"].items() if v) or "none"))
            console.print(f"  state: {st['queries']} queries seen, {st['refused']} refused{alarms}"
                          + (", LOCKED (apply the provider's unlock voucher with `mlcapsule topup`)"
                             if st["locked"] else "") + (", answering labels only" if st["degraded"] else ""))
    elif capsule and not info.get("loaded"):
        console.print("[yellow]not set up:[/] run `mlcapsule setup CAPSULE --token TOKEN`")


def _print_platform(p: Any) -> None:
    """What a backend detected (cvm: the TEE, the vTPM, rollback protection)."""
    if not isinstance(p, dict) or "tee" not in p:
        return
    tee = {"tdx": "Intel TDX", "snp": "AMD SEV-SNP"}.get(str(p["tee"]), str(p["tee"]))
    vtpm = f"yes ({p.get('vtpm_tcti')})" if p.get("vtpm") else "no"
    rollback = "yes" if p.get("rollback_protected") else "[bold red]NO[/]"
    console.print(f"[bold]platform:[/] {tee} guest (configfs-tsm provider {p.get('provider')} at {p.get('tsm_path')}); "
                  f"vTPM: {vtpm}; rollback protection: {rollback}", soft_wrap=True)


@cli.command()
@click.option("--workdir", type=click.Path(file_okay=False),
              help="Keep the demo's files here [default: a temp folder].")
def demo(workdir: str | None) -> None:
    """The end-to-end demo on scikit-learn's digits."""
    from .demo import run_demo

    run_demo(Path(workdir) if workdir else None, console)


@cli.command()
@click.option("--suite", "suites", multiple=True,
              type=click.Choice(["dense", "conv", "networks", "fixed", "tpm", "defenses", "server", "kws"]),
              help="Run only this suite (repeatable) [default: all].")
@click.option("--quick", is_flag=True,
              help="Small models, few repetitions: a smoke run (results go to benchmarks/results/quick).")
@click.option("--threads", type=click.IntRange(1),
              help="Intra-op threads for plain ORT and the capsule [default: CPUs].")
@click.option("--results", "results_dir", type=click.Path(file_okay=False),
              help="Where the JSON results go [default: benchmarks/results].")
@click.option("--markdown", type=click.Path(dir_okay=False), help="The report to write [default: BENCHMARKS.md].")
@click.option("--workdir", type=click.Path(file_okay=False),
              help="Keep the models and capsules here [default: a temp folder].")
@click.option("--database-url", envvar="MLCAPSULE_BENCH_DATABASE_URL", default=None, metavar="URL",
              help="The server suite: run the server on this PostgreSQL database [default: start a throwaway one].")
def bench(suites: tuple[str, ...], quick: bool, threads: int | None, results_dir: str | None, markdown: str | None,
          workdir: str | None, database_url: str | None) -> None:
    """Benchmark capsules against plain ONNX Runtime and the MLCapsule paper; writes BENCHMARKS.md.

    Run it from the repository root. The full run takes about 5 minutes on 2 cores.
    """
    from ..bench import run as run_bench

    if database_url:
        os.environ["MLCAPSULE_BENCH_DATABASE_URL"] = database_url
    run_bench(list(suites) or None, quick=quick, results_dir=results_dir, markdown=markdown, threads=threads,
              workdir=workdir, log=lambda msg: err_console.print(msg, highlight=False))


from .admin import register as _register_provider_commands  # noqa: E402

_register_provider_commands(cli)


def _restore_sigint() -> None:
    """The imports are done: Ctrl-C raises KeyboardInterrupt again, which :func:`main` handles."""
    import signal

    # Installed by mlcapsule.cli, or first by mlcapsule/__main__.py (python -m mlcapsule).
    if getattr(signal.getsignal(signal.SIGINT), "_mlcapsule_startup", False):
        try:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        except ValueError:  # not the main thread (then it could not have been installed either)
            pass


from .enclaved import enclaved as _enclaved  # noqa: E402

cli.add_command(_enclaved)

from .audit import audit as _audit  # noqa: E402

cli.add_command(_audit)

from .evaluate import evaluate as _evaluate  # noqa: E402

cli.add_command(_evaluate)

from ..kws.cli import listen as _listen  # noqa: E402

cli.add_command(_listen)

_restore_sigint()  # last: every import above is covered by the start-up handler (add commands above it)


def _safe_next_step(e: MlcapsuleError) -> None:
    """Hints that name the real cause and a step that costs nothing. The backends say "run setup
    again" when a sealed state does not open; but a new setup uses one of the grant's device slots,
    and the usual cause on a device that was set up is a damaged or truncated state.sealed."""
    from ..enclave.errors import IntegrityError

    if isinstance(e, IntegrityError) and e.message.startswith("sealed state"):
        e.message = (f"{e.message}: the sealed license state (state.sealed under {data_home() / 'state'}, or "
                     "--state-dir) is damaged, truncated, or from another installation")
        e.hint = ("restore state.sealed from a backup, or contact the provider; nothing was charged. "
                  "`mlcapsule setup --replace` would issue a new license and use one more device slot of your grant")


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, prog_name="mlcapsule", standalone_mode=False)
    except MlcapsuleError as e:
        _safe_next_step(e)
        err_console.print(f"[bold red]error:[/] {e.diagnostics()}", soft_wrap=True)
        return e.exit_code
    except click.exceptions.Abort:
        err_console.print("aborted")
        return 130
    except click.ClickException as e:
        e.show()
        return 2
    except KeyboardInterrupt:
        err_console.print("aborted")
        return 130
    except Exception as e:  # a bug: one line, unless the user asks for the traceback
        if os.environ.get("MLCAPSULE_DEBUG"):
            raise
        err_console.print(f"[bold red]internal error:[/] {type(e).__name__}: {e} "
                          "(this is a bug; re-run with MLCAPSULE_DEBUG=1 for a traceback and report it)",
                          soft_wrap=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
