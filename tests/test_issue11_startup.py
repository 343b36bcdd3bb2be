"""Issue 11, items 6 and 10, through real processes: `serve` on a busy port says so in one line
with the right exit code, and Ctrl-C while the command line starts shows no traceback."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest

from mlcapsule.enclave.errors import TransportError

from conftest import cli_env, mlcapsule_exe


# -- item 6 ----------------------------------------------------------------------------------------
def test_serve_on_a_busy_port_prints_one_line_and_exits_with_the_network_code(tmp_path):
    from mlcapsule.enclave.crypto.keys import generate_provider_key

    generate_provider_key(tmp_path / "k.pem")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        p = subprocess.run([mlcapsule_exe(), "serve", "--port", str(port), "--allow-measurement", "local",
                            "--database-url", f"sqlite:///{tmp_path / 's.db'}", "--provider-key",
                            str(tmp_path / "k.pem")],
                           capture_output=True, text=True, timeout=120, env=cli_env(tmp_path / "home"),
                           stdin=subprocess.DEVNULL)
    assert p.returncode == TransportError.exit_code == 10, p.stderr
    assert "serving on" not in p.stdout + p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr and "Errno" not in p.stderr, p.stderr
    assert lines[0].startswith(f"error: port {port} is in use:") and "choose another with --port" in lines[0]


def test_serve_prints_serving_on_once_the_port_is_bound(tmp_path):
    """`serving on` comes with the real port (here --port 0), and a connection to it is accepted."""
    from mlcapsule.enclave.crypto.keys import generate_provider_key

    generate_provider_key(tmp_path / "k.pem")
    proc = subprocess.Popen([mlcapsule_exe(), "serve", "--port", "0", "--allow-measurement", "local",
                             "--database-url", f"sqlite:///{tmp_path / 's.db'}", "--provider-key",
                             str(tmp_path / "k.pem")],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=cli_env(tmp_path / "home"), stdin=subprocess.DEVNULL)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.startswith("serving on http://127.0.0.1:"), line
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        assert port != 0
        socket.create_connection(("127.0.0.1", port), timeout=10).close()  # bound and listening already
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- item 10 ---------------------------------------------------------------------------------------
def _mlcapsule_frames(stderr: str) -> list[str]:
    """Traceback frames in mlcapsule's own files (not the interpreter's start-up: site, runpy,
    the import system finding the package, which run before any mlcapsule code can act)."""
    src = os.path.dirname(os.path.dirname(os.path.abspath(__import__("mlcapsule").__file__)))
    return [ln for ln in stderr.splitlines() if ln.strip().startswith("File") and src in ln]


@pytest.mark.parametrize("entry", ["console-script", "python -m"])
def test_ctrl_c_at_start_up_shows_no_traceback(entry, tmp_path):
    """SIGINT at seeded delays over the first 0.35 s of `mlcapsule status` (which imports the CLI,
    then starts an enclave worker). Every run that got as far as mlcapsule's code ends with
    "aborted" (exit 130), or was killed by SIGINT before Python's handler existed (which a shell
    reports as 130 too), never with a traceback."""
    cmd = [mlcapsule_exe()] if entry == "console-script" else [sys.executable, "-m", "mlcapsule"]
    rng = random.Random(11)
    reached, tracebacks = 0, []
    for _ in range(16):
        delay = rng.uniform(0.0, 0.35)
        p = subprocess.Popen([*cmd, "status"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env=cli_env(tmp_path / "home"), stdin=subprocess.DEVNULL)
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        if "Traceback" in err or "KeyboardInterrupt" in err:
            if _mlcapsule_frames(err):
                tracebacks.append((round(delay, 3), err))
            # else: the interpreter's own start-up (site, runpy, finding the package), before
            # mlcapsule's first line runs: out of its reach (a frame of mlcapsule's would show).
            continue
        reached += 1
        assert p.returncode in (130, -signal.SIGINT, 0), (delay, p.returncode, err)
        assert err.strip() in ("", "aborted"), (delay, err)
    assert not tracebacks, tracebacks
    assert reached >= 8
