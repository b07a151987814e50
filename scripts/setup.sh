#!/usr/bin/env bash
# Set-up, idempotent: a venv (./.venv, or $VENV) holding torch, the pinned open_clip release with
# patches/ applied, and this package. Every later README command runs from that venv.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
exec "$VENV/bin/python" scripts/install.py --python "$VENV/bin/python" "$@"
