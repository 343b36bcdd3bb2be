#!/usr/bin/env bash
# The whole test suite: system packages, its own venv, then pytest.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
apt_install libseccomp2 || true
MLCAPSULE_WITH_TORCH=1 make_venv "sklearn,server,torch,test"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest "$@"
