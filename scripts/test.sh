#!/usr/bin/env bash
# The whole test suite: system packages, its own venv, then ruff and mypy on src/ (the rules are in
# pyproject.toml; either failing fails the run), then a short run of the fuzzers, then pytest.
#   bash scripts/test.sh [pytest args]
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
# PostgreSQL: the server's tests run against a real throwaway server as well as SQLite.
apt_install postgresql
# The tpm backend's tests run against swtpm (with EK certificates from swtpm_setup); tpm2-pytss
# builds from source against libtss2-dev, so these come before the venv.
apt_install swtpm swtpm-tools libtss2-dev pkg-config gcc
# The enclave service tests run the interpreter as two other users: acl grants them passage to it.
apt_install acl
# The keyword-spotting tests synthesise their speech with espeak-ng (issue 16).
apt_install espeak-ng
MLCAPSULE_WITH_TORCH=1 make_venv "sklearn,server,torch,test,tpm,attacks"
cd "$ROOT"
echo "[lint] ruff check src/" >&2
"$VENV/bin/python" -m ruff check src/
echo "[types] mypy src/" >&2
"$VENV/bin/python" -m mypy src/
# The short fuzz run (issue 15): every atheris harness in fuzz/ for 8 s with a fixed seed, under
# 3 minutes in all; a finding (an exception that is not ours, a 500, a hang) fails the run.
echo "[fuzz] fuzz/run.py --seconds 8 (fuzz/README.md runs them longer)" >&2
"$VENV/bin/python" fuzz/run.py --seconds 8
exec "$VENV/bin/python" -m pytest "$@"
