# Sourced by scripts/demo.sh and scripts/test.sh: create (or reuse) the project's virtual
# environment and install mlcapsule into it with the given extras.
#   MLCAPSULE_VENV  where the venv lives (default: .venv in the checkout)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MLCAPSULE_VENV:-$ROOT/.venv}"

pick_python() {
  for p in python3.11 python3.12 python3.13 python3; do
    if command -v "$p" >/dev/null 2>&1 && "$p" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$p"; return 0
    fi
  done
  return 1
}

ensure_python() {
  if ! PY="$(pick_python)"; then
    echo "[setup] no Python >= 3.11 with venv found; installing Debian's python3 and python3-venv" >&2
    apt_install python3 python3-venv python3-dev
    PY="$(pick_python)"
  fi
  if ! "$PY" -c 'import ensurepip' >/dev/null 2>&1; then
    apt_install python3-venv
  fi
}

APT_UPDATED=0
apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ]; then
    echo "[setup] need Debian packages: ${missing[*]} (run as root, or install them and re-run)" >&2
    return 1
  fi
  if [ $APT_UPDATED = 0 ]; then apt-get update -qq >/dev/null; APT_UPDATED=1; fi
  echo "[setup] apt-get install ${missing[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

make_venv() {
  local extras="$1"
  ensure_python
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment $VENV" >&2
    "$PY" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  if [ "${MLCAPSULE_WITH_TORCH:-0}" = 1 ]; then
    # The CPU build is pinned on purpose: an unpinned 'torch' pulls GBs of CUDA packages.
    "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  fi
  echo "[setup] installing mlcapsule[$extras] into $VENV" >&2
  "$VENV/bin/python" -m pip install -q -e "$ROOT[$extras]"
}
