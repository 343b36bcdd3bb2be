"""Issue 11, the smaller defects that need no server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlcapsule.enclave.errors import InputError
from mlcapsule.io import Preprocessing, load_inputs



# -- item 10: Ctrl-C while the command line starts ---------------------------------------------
def test_ctrl_c_while_the_cli_imports_prints_no_traceback():
    """Deterministic: SIGINT lands while the CLI module is being imported."""
    code = ("import mlcapsule.cli, os, signal\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "import mlcapsule.cli.main\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in p.stderr and "KeyboardInterrupt" not in p.stderr, p.stderr
    assert p.returncode == 130 and p.stderr.strip() == "aborted"


# -- item 11: one scaling rule, no non-finite inputs --------------------------------------------
def test_uint8_arrays_are_scaled_like_images(tmp_path):
    prep = Preprocessing(kind="image", image_size=(2, 2), channels=1, layout="flat", scale=0.5)
    np.save(tmp_path / "pixels.npy", np.array([[0, 2, 4, 255]], np.uint8))
    got = load_inputs([tmp_path / "pixels.npy"], prep, ["N", 4])
    assert np.array_equal(got, np.array([[0, 1, 2, 127.5]], np.float32))
    # The same pixels as a PNG give the same batch.
    from PIL import Image

    Image.fromarray(np.array([[0, 2], [4, 255]], np.uint8), mode="L").save(tmp_path / "pixels.png")
    assert np.array_equal(load_inputs([tmp_path / "pixels.png"], prep, ["N", 4]), got)
    # Float arrays are model-ready values: not scaled.
    np.save(tmp_path / "values.npy", np.array([[0, 2, 4, 255]], np.float32))
    assert np.array_equal(load_inputs([tmp_path / "values.npy"], prep, ["N", 4]), [[0, 2, 4, 255]])


@pytest.mark.parametrize("suffix", [".npy", ".csv", ".json"])
def test_non_finite_inputs_are_refused_in_every_format(tmp_path, suffix):
    path = tmp_path / f"bad{suffix}"
    if suffix == ".npy":
        np.save(path, np.array([[1, np.nan, 2, 3]], np.float32))
    elif suffix == ".csv":
        path.write_text("1,inf,2,3\n")
    else:
        path.write_text("[[1, 2, 3, 1e999]]")
    with pytest.raises(InputError, match="non-finite"):
        load_inputs([path], Preprocessing(), ["N", 4])
