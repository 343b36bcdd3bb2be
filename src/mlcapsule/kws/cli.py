"""``mlcapsule listen CAPSULE (--wav FILE | --mic)``: keyword spotting on an audio stream."""

from __future__ import annotations

import json
from typing import Any

import click


@click.command("listen")
@click.argument("capsule", type=click.Path(exists=True, dir_okay=False))
@click.option("--wav", type=click.Path(exists=True, dir_okay=False),
              help="Listen to a PCM WAV file (any rate, mixed to mono).")
@click.option("--mic", is_flag=True, help="Listen to the default microphone (needs the sounddevice package).")
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True), help="--mic: stop after this long.")
@click.option("--hop", type=click.FloatRange(0.01, 10.0), default=0.25, show_default=True,
              help="Seconds between two one-second windows.")
@click.option("--smoothing", type=click.IntRange(1, 1000), default=3, show_default=True,
              help="Windows whose posteriors are averaged.")
@click.option("--threshold", type=click.FloatRange(0.0, 1.0, min_open=True), default=0.6, show_default=True,
              help="Smoothed posterior at which a keyword is detected.")
@click.option("--refractory", type=click.FloatRange(min=0), default=0.75, show_default=True,
              help="Seconds after a detection in which no other is reported.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per detection, then a summary.")
@click.option("--unsafe-dev-key", type=click.Path(exists=True, dir_okay=False),
              help="UNSAFE, for development: load the capsule with the provider's content key file.")
@click.option("--state-dir", type=click.Path(file_okay=False),
              help="Where the sealed state lives [default: $MLCAPSULE_HOME/state/ID-vN].")
@click.option("--memory-limit", type=click.FloatRange(min=8), metavar="MB",
              help="Streaming mode: the enclave process stays within MB MiB above its memory at start.")
@click.option("--trust", "trust_file", type=click.Path(exists=True, dir_okay=False), metavar="KEY.pub",
              help="The provider's public key (PEM) [default: the key remembered for this capsule].")
@click.option("--unsafe-trust-manifest-key", "unsafe_trust", is_flag=True,
              help="UNSAFE: trust whatever provider key the capsule names (integrity only, not origin).")
def listen(capsule: str, wav: str | None, mic: bool, seconds: float | None, hop: float, smoothing: int,
           threshold: float, refractory: float, as_json: bool, unsafe_dev_key: str | None, state_dir: str | None,
           memory_limit: float | None, trust_file: str | None, unsafe_trust: bool) -> None:
    """Spot keywords in an audio stream with a keyword-spotting CAPSULE, offline.

    Every HOP seconds the last second of audio goes into the enclave, which computes the
    features and runs the model there (the audio never leaves this device). Detections are
    printed with their time. Each window is charged one query, unless the provider's policy
    charges per detection: then the enclave runs the smoothing, threshold and refractory
    period itself, on the provider's parameters (the options above are not used), and charges
    only its detections.
    """
    from ..cli.main import _client_trust, _load_trusted, _remember_pin, console, err_console
    from ..client import open_capsule
    from ..enclave.errors import NotProvisionedError, UsageError
    from ..enclave.format.trust import TrustProviderKey, UnsafeTrustManifestKey
    from .stream import charge_policy, chunks, detect, microphone, read_wav

    if bool(wav) == bool(mic):
        raise UsageError("give exactly one audio source", hint="--wav FILE or --mic")
    if seconds is not None and not mic:
        raise UsageError("--seconds goes with --mic")
    pin = None
    if unsafe_dev_key:
        raw = _load_trusted(trust_file)
        trust: Any = TrustProviderKey(raw) if raw is not None else UnsafeTrustManifestKey()
        err_console.print("[yellow]warning:[/] --unsafe-dev-key bypasses the license: for development and tests only",
                          soft_wrap=True)
    else:
        trust, pin = _client_trust(capsule, trust_file, unsafe_trust, state_dir, first_use=True)
    audio = read_wav(wav) if wav else None
    source = chunks(audio) if audio is not None else microphone(seconds)
    counts: dict[str, int] = {}
    with open_capsule(capsule, trust=trust, unsafe_dev_key=unsafe_dev_key, state_dir=state_dir,
                      memory_limit_mb=memory_limit) as cap:
        if not cap.is_set_up:
            raise NotProvisionedError(f"{capsule} is not set up on this device")
        if pin is not None:
            _remember_pin(pin, trust)
        per_detection = charge_policy(cap.manifest) is not None
        if not as_json:
            what = (f"{audio.shape[0] / 16000:.1f} s of {wav}" if audio is not None
                    else "the microphone (Ctrl-C stops)")
            err_console.print(f"listening to {what}: one-second windows every {hop:g} s, charged per "
                              + ("detection (the provider's detector runs in the enclave)" if per_detection
                                 else "window"), soft_wrap=True)
        try:
            for d in detect(cap, source, hop=hop, smoothing=smoothing, threshold=threshold, refractory=refractory,
                            counter=counts):
                if as_json:
                    console.print(json.dumps(d.to_dict()), soft_wrap=True, highlight=False)
                else:
                    score = "" if d.score is None else f"  ({d.score:.2f})"
                    console.print(f"{d.time:9.2f} s  {d.label}{score}", highlight=False)
        except KeyboardInterrupt:
            err_console.print("stopped", highlight=False)
        status = cap.status().get("license_status") or {}
    summary = {"windows": counts.get("windows", 0), "detections": counts.get("detections", 0),
               "charged_per": "detection" if per_detection else "window",
               "remaining": status.get("remaining")}
    if as_json:
        console.print(json.dumps({"summary": summary}), soft_wrap=True, highlight=False)
    else:
        left = "" if not status else (", budget unlimited" if status.get("remaining") is None
                                      else f", {status.get('remaining')} queries left")
        err_console.print(f"{summary['detections']} detection(s) in {summary['windows']} windows{left}",
                          highlight=False)
