"""Run every fuzz harness for a while, with a fixed seed; exit non-zero on a finding.

    .venv/bin/python fuzz/run.py                      # the short run of the test command: 10 s each
    .venv/bin/python fuzz/run.py --seconds 600 ipc    # one harness, longer
    .venv/bin/python fuzz/run.py --keep out/fuzz      # keep what the fuzzer found (new inputs, crashes)

Each harness runs as its own process: ``fuzz/fuzz_<target>.py -max_total_time=N -seed=S
-timeout=T`` over a scratch corpus folder (new inputs go there) and ``fuzz/corpus/<target>/`` (the
committed seeds, never written). A finding is an exception that is not ours, a 500 from the server,
an input that takes longer than ``--timeout`` seconds, or a crash: libFuzzer stops, writes the input
(``crash-*`` / ``timeout-*``) to the artifacts folder, and the harness exits non-zero. This runner
prints that file and the end of the harness's log, and exits 1 once every harness has run.
Nothing here needs the network or the shared attestation vectors (``fuzz/data/`` holds the context).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
#: Every harness, in the order they run (fuzz_dcap.py is the SGX/TDX harnesses' shared part).
TARGETS = ("container", "manifest", "state", "license", "voucher", "setup", "receipts", "ipc", "software", "tpm", "sgx",
           "tdx", "snp", "nitro", "hardware", "server")


def run_one(target: str, *, seconds: int, seed: int, timeout: int, work: Path, python: str) -> tuple[bool, str]:
    scratch, artifacts, tmp = work / target / "corpus", work / target / "artifacts", work / target / "tmp"
    for d in (scratch, artifacts, tmp):
        d.mkdir(parents=True)
    cmd = [python, str(FUZZ / f"fuzz_{target}.py"), f"-max_total_time={seconds}", f"-seed={seed}",
           f"-timeout={timeout}", "-rss_limit_mb=4096", f"-artifact_prefix={artifacts}/", str(scratch),
           str(FUZZ / "corpus" / target)]
    log = work / target / "log.txt"
    t0 = time.monotonic()
    with open(log, "wb") as out:
        # A hard stop well past the budget: a harness that does not stop on its own is a finding too.
        try:
            rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=FUZZ, timeout=seconds + timeout + 120,
                                # TMPDIR: the harnesses' scratch (databases, sealed files) goes with the run's folder.
                                env={**os.environ, "PYTHONWARNINGS": "ignore", "TMPDIR": str(tmp)},
                                check=False).returncode
        except subprocess.TimeoutExpired:
            rc = -1
    text = log.read_text(errors="replace")
    runs = re.findall(r"Done (\d+) runs", text)
    summary = f"{target:10s} {time.monotonic() - t0:5.1f} s  {runs[-1] if runs else '?':>8s} runs"
    found = sorted(artifacts.iterdir())
    if rc == 0 and not found:
        return True, summary + "  ok"
    lines = [summary + f"  FINDING (exit {rc})"]
    for f in found:
        lines.append(f"  input: {f} ({f.stat().st_size} bytes): {f.read_bytes()[:200]!r}")
    lines.append("  --- end of the harness's log ---")
    lines += ["  " + line for line in text.splitlines()[-40:]]
    return False, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("targets", nargs="*", help=f"harnesses to run (default: all of {', '.join(TARGETS)})")
    ap.add_argument("--seconds", type=int, default=int(os.environ.get("MLCAPSULE_FUZZ_SECONDS", "10")),
                    help="how long each harness runs (default 10, or $MLCAPSULE_FUZZ_SECONDS)")
    ap.add_argument("--seed", type=int, default=1, help="libFuzzer's -seed (default 1)")
    ap.add_argument("--timeout", type=int, default=20, help="seconds one input may take before it is a finding")
    ap.add_argument("--keep", type=Path, help="keep the scratch corpora, artifacts and logs in this folder")
    a = ap.parse_args(argv)
    unknown = set(a.targets) - set(TARGETS)
    if unknown:
        ap.error(f"unknown harness(es) {sorted(unknown)}; the harnesses are {', '.join(TARGETS)}")
    work = Path(tempfile.mkdtemp(prefix="mlcapsule-fuzz-")) if a.keep is None else a.keep
    work.mkdir(parents=True, exist_ok=True)
    ok = True
    try:
        for target in a.targets or TARGETS:
            if (work / target).exists():
                shutil.rmtree(work / target)
            passed, report = run_one(target, seconds=a.seconds, seed=a.seed, timeout=a.timeout, work=work,
                                     python=sys.executable)
            print(f"[fuzz] {report}", file=sys.stderr, flush=True)
            ok &= passed
    finally:
        if a.keep is None and ok:
            shutil.rmtree(work, ignore_errors=True)
    if not ok:
        print(f"[fuzz] findings: see above (inputs and logs kept in {work}); fix the parser, add the input to "
              "fuzz/corpus/<target>/ and a regression test to tests/test_fuzz_regressions.py", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
