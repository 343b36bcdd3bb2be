"""Issue 11 through the command line: a client set up against a real server on loopback, then
`mlcapsule` commands run in-process (main) or as real subprocesses (for signals)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlcapsule.cli.main import main

from conftest import mlcapsule_exe

from _server_support import (db_url, harness, pg_server, pg_url, platform, provider_files,  # noqa: F401
                             serve_in_thread)


@pytest.fixture
def device(tmp_path, provider_files, platform, mlcapsule_home):  # noqa: F811
    """A device set up with the CLI (default state and platform folders under MLCAPSULE_HOME)."""
    db = f"sqlite:///{tmp_path / 'server.db'}"
    with harness(db, provider_files, platform, budget=10_000_000, devices=2) as h, serve_in_thread(h.app) as url:
        rc = main(["setup", str(provider_files.capsule_path), "--token", h.token, "--server", url])
        assert rc == 0
        yield {"capsule": str(provider_files.capsule_path), "h": h, "url": url, "home": mlcapsule_home,
               "lease": provider_files.lease_size}


def charged(capsule: str, capsys: Any) -> int:
    capsys.readouterr()
    assert main(["status", capsule, "--json"]) == 0
    return int(json.loads(capsys.readouterr().out)["license_status"]["charged"])


def test_unsupported_output_extension_charges_nothing(device, tmp_path, capsys):
    x = np.ones((20, 4), np.float32)
    np.save(tmp_path / "batch.npy", x)
    before = charged(device["capsule"], capsys)
    assert main(["predict", device["capsule"], str(tmp_path / "batch.npy"), "-o", str(tmp_path / "results.txt")]) == 2
    err = capsys.readouterr().err
    assert "nothing was charged" in err
    assert charged(device["capsule"], capsys) == before
    # CSV is an input format, so it is an output format too, and reads back as input.
    assert main(["predict", device["capsule"], str(tmp_path / "batch.npy"), "-o", str(tmp_path / "results.csv")]) == 0
    back = np.loadtxt(tmp_path / "results.csv", delimiter=",", ndmin=2)
    assert back.shape == (20, 3) and np.allclose(back, x @ np.arange(12, dtype=np.float32).reshape(4, 3))


def test_output_into_a_missing_folder_creates_nothing_and_charges_nothing(device, tmp_path, capsys):
    np.save(tmp_path / "batch.npy", np.ones((5, 4), np.float32))
    before = charged(device["capsule"], capsys)
    target = tmp_path / "nonexistent" / "out.npy"
    assert main(["predict", device["capsule"], str(tmp_path / "batch.npy"), "-o", str(target)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not target.parent.exists()
    assert charged(device["capsule"], capsys) == before


def test_json_rows_name_their_input_file(device, tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.ones((2, 4), np.float32))
    np.save(tmp_path / "b.npy", np.zeros((3, 4), np.float32))
    capsys.readouterr()
    assert main(["predict", device["capsule"], str(tmp_path / "a.npy"), str(tmp_path / "b.npy")]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(Path(r["input"]).name, r["row"]) for r in rows] == [("a.npy", 0), ("a.npy", 1), ("b.npy", 0),
                                                                 ("b.npy", 1), ("b.npy", 2)]


def test_non_finite_input_is_refused_before_it_is_charged(device, tmp_path, capsys):
    np.save(tmp_path / "nan.npy", np.full((3, 4), np.nan, np.float32))
    before = charged(device["capsule"], capsys)
    assert main(["predict", device["capsule"], str(tmp_path / "nan.npy")]) == 2
    assert "non-finite" in capsys.readouterr().err
    assert charged(device["capsule"], capsys) == before


def test_interrupted_predict_loses_at_most_one_lease(device, tmp_path, capsys):
    """SIGINT at random (seeded) points through a real `mlcapsule predict` process: what is
    charged beyond what was answered and written is at most one lease."""
    n = 40_000
    np.save(tmp_path / "big.npy", np.random.default_rng(0).standard_normal((n, 4)).astype(np.float32))
    env = {**os.environ, "MLCAPSULE_HOME": str(device["home"])}
    rng = random.Random(11)
    lease = device["lease"]
    outcomes = []
    for trial in range(5):
        out = tmp_path / f"o{trial}.npy"
        before = charged(device["capsule"], capsys)
        p = subprocess.Popen([mlcapsule_exe(), "predict", device["capsule"], str(tmp_path / "big.npy"),
                              "-o", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(0.3, 3.0))
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=120)
        assert "Traceback" not in stderr, stderr
        written = np.load(out).shape[0] if out.exists() else 0
        spent = charged(device["capsule"], capsys) - before
        outcomes.append((p.returncode, written, spent))
        assert p.returncode in (0, 130), (p.returncode, stderr)
        assert spent - written <= lease, (trial, p.returncode, written, spent, stderr)
        if p.returncode == 130 and written:
            assert "interrupted" in stderr and f"{written} of {n}" in stderr
    # Some runs were really cut in the middle of the batch.
    assert any(0 < w < n for _, w, _ in outcomes), outcomes
