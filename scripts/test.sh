#!/usr/bin/env bash
# The whole test suite: system packages, its own venv, then pytest.
#   bash scripts/test.sh [pytest args]
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
# PostgreSQL: the server's tests run against a real throwaway server as well as SQLite.
apt_install postgresql
MLCAPSULE_WITH_TORCH=1 make_venv "sklearn,server,torch,test"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest "$@"
