#!/usr/bin/env bash
# The main job: run a burst of async and sync inputs through one concurrent worker.
#
# Creates .venv on first use and installs the package with its demo extras, then runs
# `python -m examples.demo` with any arguments given here, e.g.
#   bash scripts/demo.sh --async-inputs 1000 --sync-inputs 100 --concurrency 2
# Uses $REDIS_URL when set; otherwise the demo starts (and stops) a private server.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ ! -d .venv ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install -qq -e '.[demo]'  # -qq: errors only, not build-backend warnings

exec .venv/bin/python -m examples.demo "$@"
