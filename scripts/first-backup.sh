#!/usr/bin/env bash
# The main job on a fresh machine: build pg_hardstorage, create an embedded
# repository in a local directory, and take a first backup of a directory
# (default: this source tree), then verify and list it.
#
#   scripts/first-backup.sh [SOURCE_DIR] [REPO_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$(realpath "${1:-.}")
REPO=$(realpath -m "${2:-./demo-repo}")
export PG_HARDSTORAGE_PASSPHRASE="${PG_HARDSTORAGE_PASSPHRASE:-change me: demo passphrase}"
export PG_HARDSTORAGE_REPO="$REPO"

cargo build --release -p pg_hardstorage_cli
BIN=target/release/pg_hardstorage

if [ ! -f "$REPO/config" ]; then
    "$BIN" repo init -o table
fi
"$BIN" deployment create demo --path "$SRC" -o table
"$BIN" backup run demo -o table
ID=$("$BIN" backup list demo -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["result"]["body"][-1]["backup_id"])')
"$BIN" backup verify "$ID" -o table
"$BIN" backup list -o table
echo
echo "Restore it with:"
echo "  PG_HARDSTORAGE_REPO=$REPO $BIN restore demo --backup latest --target /tmp/demo-restore"
