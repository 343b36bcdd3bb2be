#!/usr/bin/env bash
# The main job: install mlcapsule in its own venv and run the end-to-end demo on built-in data.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
make_venv "sklearn,server"
exec "$VENV/bin/mlcapsule" demo "$@"
