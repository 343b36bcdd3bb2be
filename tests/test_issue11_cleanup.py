"""Issue 11, items 8 and 18: the whole measurement in `status`; leftovers of killed sessions."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from mlcapsule._cleanup import LOCK_NAME, clean_stale_run_dirs, hold_run_dir
from mlcapsule.enclave.measurement import measurement
from mlcapsule.enclave.format.trust import TrustProviderKey, UnsafeTrustManifestKey  # noqa: F401


def test_status_prints_the_whole_measurement(capsys):
    from mlcapsule.cli.main import main

    assert main(["status"]) == 0
    assert measurement().hex() in capsys.readouterr().out


def test_stale_run_dirs_are_removed_but_a_live_sessions_is_kept(tmp_path):
    state = tmp_path / "state"
    dead = state / "run-dead"
    dead.mkdir(parents=True)
    (dead / "worker.log").write_text("x")
    fd = hold_run_dir(dead)
    os.close(fd)  # its session died: the lock is free
    legacy = state / "run-legacy"  # an older mlcapsule's, no lock file, untouched for a while
    legacy.mkdir()
    old = time.time() - 3600
    os.utime(legacy, (old, old))
    live = state / "run-live"
    live.mkdir()
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from mlcapsule._cleanup import hold_run_dir; "
                               f"hold_run_dir({str(live)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        removed = clean_stale_run_dirs(state)
        assert sorted(p.name for p in removed) == ["run-dead", "run-legacy"]
        assert live.is_dir() and (live / LOCK_NAME).exists()
    finally:
        holder.kill()
        holder.wait()
    assert [p.name for p in clean_stale_run_dirs(state)] == ["run-live"]


def test_a_killed_predict_leaves_no_run_dir_after_the_next_start(tmp_path):
    """The real thing: a session is SIGKILLed (its run-* folder stays), the next start removes it."""
    import numpy as np

    import mlcapsule
    from conftest import copy_packed  # noqa: F401

    from _server_support import _tiny_model
    from mlcapsule.enclave.crypto.keys import generate_provider_key

    generate_provider_key(tmp_path / "k.pem")
    res = mlcapsule.pack(_tiny_model(), tmp_path / "t.capsule", provider_key=tmp_path / "k.pem", tune_runtime=False)
    state = tmp_path / "state"
    code = ("import os, signal, numpy as np, mlcapsule\n"
            "from mlcapsule.enclave.format.trust import UnsafeTrustManifestKey\n"
            f"cap = mlcapsule.open_capsule({str(res.capsule_path)!r}, trust=UnsafeTrustManifestKey(), unsafe_dev_key={str(res.key_path)!r}, "
            f"state_dir={str(state)!r})\n"
            "cap.predict(np.ones((1, 4), np.float32))\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    subprocess.run([sys.executable, "-c", code], timeout=60)
    assert list(state.glob("run-*")), "the killed session left its run folder"
    with mlcapsule.open_capsule(res.capsule_path, trust=UnsafeTrustManifestKey(), unsafe_dev_key=res.key_path, state_dir=state) as cap:
        cap.predict(np.ones((1, 4), np.float32))
        assert len(list(state.glob("run-*"))) == 1  # only this session's own
    assert list(state.glob("run-*")) == []
