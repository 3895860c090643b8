#!/usr/bin/env bash
# The PostgreSQL version matrix: every test that runs a real PostgreSQL,
# against each major (default 13 14 15 16 17 18; MAJORS="15 18" for some),
# then one table: test × major → ok / FAIL. The testkit starts the major in
# PHS_PG_MAJOR; restores find 18's pg_verifybackup through
# PG_HARDSTORAGE_PG_BINDIRS for servers newer than Debian's 15.
# Exit status: 0 when every cell is ok.
set -uo pipefail
cd "$(dirname "$0")/.."

read -r -a majors <<<"${MAJORS:-13 14 15 16 17 18}"
others=()
for m in "${majors[@]}"; do [ "$m" = 15 ] || others+=("$m"); done
# 18's pg_verifybackup checks the restores of 16 and 17.
scripts/pg-majors.sh "${others[@]}" 18 >/dev/null || exit 1
root="${PHS_PG_ROOT:-/var/cache/pg_hardstorage/pg}"
export PG_HARDSTORAGE_PG_BINDIRS="$root/18/bin"

# The tests that start PostgreSQL of the matrix's major (module filters of
# each test binary). The TLS tests pin their own majors (15, and 17 for
# direct TLS) and run in the main suite.
repo_tests=(postgres:: pagededup:: delta:: integrity::a_damaged_page_run)
cli_tests=(pitr::)

cargo test -p pg_hardstorage_repo -p pg_hardstorage_cli --test it --no-run -q 2>&1 | tail -3
logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT
for m in "${majors[@]}"; do
    echo "== PostgreSQL $m" >&2
    {
        PHS_PG_MAJOR=$m cargo test -p pg_hardstorage_repo --test it -- "${repo_tests[@]}" 2>&1
        PHS_PG_MAJOR=$m cargo test -p pg_hardstorage_cli --test it -- "${cli_tests[@]}" 2>&1
    } >"$logs/$m.log"
    grep -E '^test .* \.\.\. (ok|FAILED|ignored)$' "$logs/$m.log" >"$logs/$m.res" || true
done

# The table: one row per test, one column per major.
python3 - "$logs" "${majors[@]}" <<'PY'
import re, sys, os
logs, majors = sys.argv[1], sys.argv[2:]
res, names = {}, []
for m in majors:
    for line in open(os.path.join(logs, m + ".res")):
        t, out = re.match(r"test (\S+) \.\.\. (\S+)", line).groups()
        if t not in names:
            names.append(t)
        res[(t, m)] = "ok" if out == "ok" else out
w = max(len(n) for n in names) if names else 10
print("test".ljust(w) + "".join(f" | {m:>6}" for m in majors))
print("-" * w + "".join(" | ------" for _ in majors))
bad = 0
for n in sorted(names):
    cells = [res.get((n, m), "-") for m in majors]
    bad += sum(c != "ok" for c in cells)
    print(n.ljust(w) + "".join(f" | {c:>6}" for c in cells))
print(f"\n{len(names)} tests x {len(majors)} majors: {bad} not ok")
sys.exit(1 if bad else 0)
PY
