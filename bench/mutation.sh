#!/usr/bin/env bash
# Mutation testing of minibatch's core modules with cosmic-ray; NOT part of CI (.ci/run).
# Usage: bench/mutation.sh [--module signing|auth|handlers|runner|delivery|store|api]...
#                          [--report FILE] [--list] [--timeout S] [--ref REV] [--keep]
#                          [--sample N [--seed S]]
# Mutates a temp copy of the tree only; prints per module: mutants, killed, survived,
# timeout, score %; writes the survivors (file, line, diff) to /tmp/minibatch-mutation-
# survivors.md or --report. See bench/mutation.py's docstring for the details.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py="$root/.venv/bin/python"
[ -x "$py" ] || py="$(command -v python3)"
exec "$py" "$root/bench/mutation.py" "$@"
