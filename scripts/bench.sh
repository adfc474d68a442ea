#!/usr/bin/env bash
# Benchmarks: celery-concurrent against stock Celery pools (prefork, threads, gevent), arq
# and taskiq. See bench/README.md.
#
#   bash scripts/bench.sh            # the full set (about 12 minutes): bench/results/local/full.*
#   bash scripts/bench.sh --publish  # the same, written to bench/results/full.* (the README's)
#   bash scripts/bench.sh --quick    # a reduced set (about 3 minutes): bench/results/local/quick.*
#   bash scripts/bench.sh --systems celery-concurrent,arq --scenarios async-io --name mine
#   bash scripts/bench.sh --profile  # py-spy profile of a celery-concurrent worker
#
# Every run prints the table (each worker's log level in it) and issue 13's goals, met or not.
# bench/results/local/ is git-ignored: only --publish and --name write to bench/results/.
#
# Creates .venv on first use and installs the package with its bench extras. arq 0.28 pins
# redis<6 while Celery 5.7's kombu needs redis>=6.1, so arq goes to bench/.arq-site (put first
# on PYTHONPATH for the arq worker and producer only); py-spy for --profile to bench/.tools.
# Uses $REDIS_URL when set; otherwise the runner starts (and stops) a private Redis.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ ! -d .venv ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install -qq -e '.[bench]'  # -qq: errors only, not build-backend warnings

install_apart() {  # install_apart DIR REQUIREMENT... : pip install --target, quietly
    local dir=$1 log
    shift
    log=$(mktemp)
    # pip's resolver warns that the target's redis<6 conflicts with the venv: expected.
    if ! .venv/bin/pip install -q --target "$dir" "$@" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        return 1
    fi
    rm -f "$log"
}

if [ ! -d bench/.arq-site/arq ]; then
    install_apart bench/.arq-site 'arq==0.28.0' 'redis[hiredis]>=4.2,<6'
fi

if [ "${1:-}" = "--profile" ]; then
    shift
    if [ ! -x bench/.tools/bin/py-spy ] && ! command -v py-spy >/dev/null 2>&1; then
        install_apart bench/.tools 'py-spy==0.4.3'
    fi
    exec .venv/bin/python -m bench.profile "$@"
fi

exec .venv/bin/python -m bench.run "$@"
