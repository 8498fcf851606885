"""Mutation testing as a measure of the tests (issue 11, point 1). Not part of CI.

Usage (from the repo root; `bench/mutation.sh` is the same with the venv's python):

    bench/mutation.sh                          # every target module, one after another
    bench/mutation.sh --module signing         # one module (repeat --module for more)
    bench/mutation.sh --module auth --report /tmp/auth-survivors.md
    bench/mutation.sh --list                   # the module -> tests map and mutant counts
    bench/mutation.sh --module store --sample 200 --seed 1   # a random sample of mutants

It copies the work tree (or, with `--ref REV`, a `git archive` of that commit) into a temp
dir and mutates only that copy with cosmic-ray (installed into the venv if missing), so the
live tree is never touched and no session files land in the repo. Each mutant of a module
is judged by that module's own test files only (MAP below), run as
`pytest -x -q -p no:randomly --hypothesis-seed=0`, with a per-mutant timeout of
`max(--min-timeout, --timeout-factor x the unmutated run)` unless `--timeout` is given.

Mutants inside annotations are skipped: every module has `from __future__ import
annotations`, so `int | None` -> `int + None` is never evaluated (cosmic-ray makes 11 such
mutants per `|`). A line marked `# pragma: no mutate` is skipped too.

It prints, per module: mutants (judged), killed, survived, timeout (counted as killed),
error (the mutant could not be run), skipped, score % = (killed + timeout) / mutants, and
wall time. Surviving mutants (file, line, operator, diff) go to the report file, by default
/tmp/minibatch-mutation-survivors.md, to write tests against.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
TOOL = "cosmic-ray==8.7.0"

# module -> (path to mutate, test files that judge it), fast files first since -x stops
# at the first failure.
MAP: dict[str, tuple[str, list[str]]] = {
    "signing": ("minibatch/signing.py", [
        "tests/unit/test_signing.py",
        "tests/unit/test_auth.py",  # create_tenant_key -> new_secret
        "tests/integration/test_webhooks.py",  # headers verified by standardwebhooks
    ]),
    "readcache": ("minibatch/readcache.py", [
        "tests/unit/test_readcache_survivors.py",
        "tests/unit/test_readcache.py",
        "tests/unit/test_auth.py",
    ]),
    "auth": ("minibatch/auth.py", [
        "tests/unit/test_auth_survivors.py",  # the token bucket, the kept keys: fast
        "tests/unit/test_auth.py",  # the HTTP tests that reach auth.py, not whole files:
        "tests/integration/test_api.py::test_missing_or_unknown_key_is_401_and_both_headers_work",
        "tests/integration/test_api.py::test_idempotency_key_replays_the_first_response",
        "tests/integration/test_api.py::test_other_tenants_see_404_for_everything",
        "tests/integration/test_hardening.py::"
        "test_two_different_keys_in_one_request_are_401_and_every_401_asks_for_bearer",
        "tests/integration/test_hardening.py::test_every_route_but_the_public_three_needs_a_key",
        "tests/integration/test_hardening.py::test_multipart_idempotency_covers_the_file_name_too",
        "tests/integration/test_hardening.py::"
        "test_a_key_is_in_flight_while_the_first_body_is_still_arriving",
    ]),
    "handlers": ("minibatch/handlers.py", [
        "tests/unit/test_handlers.py",
        "tests/unit/test_groups.py",  # group handlers: one call, one outcome per item
        "tests/unit/test_runner.py",
        "tests/unit/test_loops_once.py",
        "tests/unit/test_poison_and_stall.py",
    ]),
    "runner": ("minibatch/runner.py", [
        "tests/unit/test_runner_survivors.py",  # the loops' pieces one at a time: fast
        "tests/unit/test_runner.py",
        "tests/unit/test_groups.py",  # the runner's side of group handlers
        "tests/unit/test_loops_once.py",
        "tests/unit/test_poison_and_stall.py",
    ]),
    "delivery": ("minibatch/delivery.py", [
        "tests/unit/test_delivery_survivors.py",  # the guard, one attempt, a pass at a time
        "tests/unit/test_delivery.py",
        "tests/unit/test_loops_once.py",
        "tests/integration/test_webhooks.py",
        "tests/integration/test_ssrf.py",
        "tests/integration/test_hostile_receivers.py",
        "tests/integration/test_webhook_endpoints.py",
    ]),
    "store": ("minibatch/store", [
        "tests/unit/test_store_pg_translation.py",  # postgres.py's pure parts: instant
        "tests/unit/test_store_maintenance.py",  # backup, check, deletion, pruning: fast
        "tests/unit/test_store_survivors.py",  # pinned where a partial run found survivors
        "tests/unit/test_store_views.py",  # the dashboard's reads (views.py)
        "tests/unit/test_store.py",
        "tests/unit/test_claims.py",
        "tests/unit/test_auth.py",
        "tests/unit/test_poison_and_stall.py",
        "tests/unit/test_store_properties.py",
        "tests/integration/test_storage_faults.py",
    ]),
    # postgres.py's mutants can only be judged on PostgreSQL: run this one with
    # MINIBATCH_TEST_STORE=postgres and MINIBATCH_TEST_POSTGRES_URL set (a server of
    # `python -m tests.postgres start DIR`); its score stands for that file of store/.
    "store-postgres": ("minibatch/store/postgres.py", [
        "tests/unit/test_store_pg_survivors.py",  # its clock, migrations, LISTEN: fast
        "tests/unit/test_readcache.py",  # read_version never repeats
        "tests/unit/test_loops_once.py",  # reads a row with fetchone
        "tests/unit/test_store_pg_translation.py",
        "tests/unit/test_store_survivors.py",
        "tests/unit/test_store.py",
        "tests/unit/test_claims.py",
        "tests/unit/test_store_maintenance.py",
        "tests/unit/test_store_views.py",
    ]),
    "api": ("minibatch/api.py", [
        "tests/integration/test_api_edges.py",  # the survivors of 2026-12-01
        "tests/integration/test_api_survivors.py",  # the DELETE routes' bodies
        "tests/integration/test_api_details.py",
        "tests/integration/test_api.py",
        "tests/integration/test_hardening.py",
        "tests/integration/test_server_limits.py",
        "tests/integration/test_contract.py",
        "tests/integration/test_webhook_endpoints.py",
    ]),
}
# Files of a module judged by another map entry, where their tests can reach them.
JUDGED_ELSEWHERE: dict[str, list[str]] = {"store": ["minibatch/store/postgres.py"]}
PYTEST_ARGS = "-x -q -p no:randomly -p no:cacheprovider --hypothesis-seed=0"
COPY_IGNORE = shutil.ignore_patterns(".venv", ".git", "__pycache__", ".pytest_cache",
                                     ".hypothesis", ".mypy_cache", ".ruff_cache", "mutants",
                                     "*.egg-info")


def ensure_tool() -> None:
    if importlib.util.find_spec("cosmic_ray") is None:
        print(f"installing {TOOL} into {sys.prefix}", flush=True)
        subprocess.run([PY, "-m", "pip", "install", "-q", TOOL], check=True)


def make_copy(ref: str | None) -> Path:
    root = Path(tempfile.mkdtemp(prefix="minibatch-mutation-"))
    tree = root / "tree"
    if ref is None:
        shutil.copytree(REPO, tree, ignore=COPY_IGNORE)
    else:
        tree.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", ref],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return root


def test_env(tree: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTEST_ADDOPTS", None)
    return env


def annotation_lines(path: Path) -> list[tuple[int, int, int, int]]:
    """(start row, start col, end row, end col) of every annotation in one file."""
    tree = ast.parse(path.read_text())
    spans = []
    for node in ast.walk(tree):
        found: list[ast.expr | None] = []
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            found.append(node.returns)
        elif isinstance(node, ast.arg | ast.AnnAssign):
            found.append(node.annotation)
        spans += [(a.lineno, a.col_offset, a.end_lineno or a.lineno, a.end_col_offset or 0)
                  for a in found if a is not None]
    return spans


def inside(pos: tuple[int, int], span: tuple[int, int, int, int]) -> bool:
    return (span[0], span[1]) <= pos < (span[2], span[3]) or (span[0], span[1]) == pos


def skip_mutants(db_path: Path, tree: Path, exclude_ops: str | None) -> None:
    """Mark as skipped: mutants in annotations, on `# pragma: no mutate` lines, or of an
    excluded operator."""
    from cosmic_ray.work_db import use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    spans: dict[str, list] = {}
    lines: dict[str, list[str]] = {}
    pragma = re.compile(r"#.*pragma:.*no mutate")
    with use_db(str(db_path)) as db:
        for item in list(db.pending_work_items):
            for m in item.mutations:
                key = str(m.module_path)
                if key not in spans:
                    spans[key] = annotation_lines(tree / key)
                    lines[key] = (tree / key).read_text().splitlines()
                start = (m.start_pos[0], m.start_pos[1])
                why = None
                if any(inside(start, s) for s in spans[key]):
                    why = "annotation"
                elif pragma.search(lines[key][m.start_pos[0] - 1]):
                    why = "pragma"
                elif exclude_ops and re.search(exclude_ops, m.operator_name):
                    why = "excluded operator"
                if why:
                    db.set_result(item.job_id, WorkResult(
                        output=why, worker_outcome=WorkerOutcome.SKIPPED))
                    break


def sample_mutants(db_path: Path, n: int, seed: int) -> None:
    """Leave `n` of the pending mutants, drawn at random with `seed`, and mark the rest
    skipped: a score from a uniform sample estimates the module's (about +-4 points at
    n=300 and 85 %), for modules whose full run takes hours."""
    import random

    from cosmic_ray.work_db import use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    with use_db(str(db_path)) as db:
        pending = sorted(item.job_id for item in db.pending_work_items)
        keep = set(random.Random(seed).sample(pending, min(n, len(pending))))
        for job_id in pending:
            if job_id not in keep:
                db.set_result(job_id, WorkResult(output="not in the sample",
                                                 worker_outcome=WorkerOutcome.SKIPPED))


def run_module(name: str, tree: Path, work: Path, args: argparse.Namespace) -> dict:
    target, tests = MAP[name]
    env = test_env(tree)
    command = f"{PY} -m pytest {PYTEST_ARGS} {' '.join(tests)}"
    started = time.monotonic()
    # The copy, not the live tree (nor the editable install), must be what is imported.
    where = subprocess.run([PY, "-c", "import minibatch; print(minibatch.__file__)"],
                           cwd=tree, env=env, capture_output=True, text=True).stdout.strip()
    if not where.startswith(str(tree)):
        sys.exit(f"minibatch imports from {where!r}, not the copy {tree}")
    print(f"[{name}] baseline: {command}", flush=True)
    t0 = time.monotonic()
    base = subprocess.run(command.split(), cwd=tree, env=env, capture_output=True, text=True)
    baseline_s = time.monotonic() - t0
    if base.returncode != 0:
        print(base.stdout[-3000:], base.stderr[-2000:])
        return {"module": name, "error": f"unmutated tests fail (rc {base.returncode})"}
    timeout = args.timeout or max(args.min_timeout, args.timeout_factor * baseline_s)
    print(f"[{name}] baseline {baseline_s:.1f} s, per-mutant timeout {timeout:.0f} s",
          flush=True)

    config = work / f"{name}.toml"
    db = work / f"{name}.sqlite"
    db.unlink(missing_ok=True)
    config.write_text(
        "[cosmic-ray]\n"
        f'module-path = "{target}"\n'
        f"timeout = {timeout:.1f}\n"
        f"excluded-modules = {json.dumps(JUDGED_ELSEWHERE.get(name, []))}\n"
        f'test-command = "{command}"\n'
        '[cosmic-ray.distributor]\nname = "local"\n')
    cr = [PY, "-m", "cosmic_ray.cli"]
    subprocess.run([*cr, "init", str(config), str(db)], cwd=tree, env=env, check=True)
    skip_mutants(db, tree, args.exclude_operators)
    if args.sample:
        sample_mutants(db, args.sample, args.seed)
        print(f"[{name}] a random sample of {args.sample} (seed {args.seed})", flush=True)
    total, pending = counts(db)
    print(f"[{name}] {total} mutants, {pending} to run", flush=True)
    if args.list:
        return {"module": name, "mutants": pending, "baseline_s": baseline_s}

    done = threading.Event()
    watcher = threading.Thread(target=progress, args=(name, db, pending, done), daemon=True)
    watcher.start()
    proc = subprocess.Popen([*cr, "exec", str(config), str(db)], cwd=tree, env=env,
                            start_new_session=True)
    try:
        proc.wait()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop, and report what was judged
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        print(f"[{name}] interrupted: the figures below are partial", flush=True)
        args.interrupted = True
    done.set()
    watcher.join()
    ran = proc
    row = tally(name, db, tree)
    row["wall_s"] = time.monotonic() - started
    row["baseline_s"] = baseline_s
    row["timeout_s"] = timeout
    if ran.returncode != 0:
        row["error_note"] = f"cosmic-ray exec exited {ran.returncode}"
    return row


def counts(db: Path) -> tuple[int, int]:
    with sqlite3.connect(db) as c:
        total = c.execute("SELECT count(*) FROM work_items").fetchone()[0]
        results = c.execute("SELECT count(*) FROM work_results").fetchone()[0]
    return total, total - results


def progress(name: str, db: Path, pending: int, done: threading.Event) -> None:
    _, start_pending = counts(db)
    t0 = time.monotonic()
    while not done.wait(30):
        left = counts(db)[1]
        ran = start_pending - left
        eta = (time.monotonic() - t0) / ran * left if ran else float("nan")
        print(f"[{name}] {ran}/{pending} mutants run, about {eta / 60:.1f} min left",
              flush=True)


def tally(name: str, db: Path, tree: Path) -> dict:
    row = {"module": name, "mutants": 0, "killed": 0, "survived": 0, "timeout": 0,
           "error": 0, "skipped": 0, "survivors": []}
    query = ("SELECT r.worker_outcome, r.test_outcome, r.output, r.diff, m.module_path,"
             " m.start_pos_row, m.operator_name, m.occurrence FROM work_results r"
             " JOIN mutation_specs m ON m.job_id = r.job_id ORDER BY m.module_path,"
             " m.start_pos_row, m.start_pos_col")
    with sqlite3.connect(db) as c:
        for worker, test, output, diff, path, line, op, occ in c.execute(query):
            worker, test = (worker or "").lower(), (test or "").lower()
            if worker == "skipped":
                row["skipped"] += 1
                continue
            row["mutants"] += 1
            if worker != "normal" or test == "incompetent":
                row["error"] += 1
            elif test == "survived":
                row["survived"] += 1
                row["survivors"].append((path, line, op, occ, diff or ""))
            elif output == "timeout":
                row["timeout"] += 1
            else:
                row["killed"] += 1
    judged = row["killed"] + row["timeout"] + row["survived"]
    row["score"] = 100.0 * (row["killed"] + row["timeout"]) / judged if judged else 0.0
    return row


def print_table(rows: list[dict]) -> None:
    head = ("module", "mutants", "killed", "survived", "timeout", "error", "skipped",
            "score %", "wall")
    print("\n" + " ".join(f"{h:>9}" for h in head))
    for r in rows:
        if "error" in r and isinstance(r["error"], str):
            print(f"{r['module']:>9} {r['error']}")
            continue
        if "killed" not in r:
            print(f"{r['module']:>9} {r['mutants']:>9}  (listed only; baseline"
                  f" {r['baseline_s']:.1f} s)")
            continue
        print(f"{r['module']:>9} {r['mutants']:>9} {r['killed']:>9} {r['survived']:>9}"
              f" {r['timeout']:>9} {r['error']:>9} {r['skipped']:>9} {r['score']:>9.1f}"
              f" {r['wall_s'] / 60:>7.1f}m")


def write_report(rows: list[dict], path: Path) -> None:
    out = ["# Surviving mutants\n"]
    for r in rows:
        if "survivors" not in r:
            continue
        out.append(f"## {r['module']}: {r['survived']} survived of {r['mutants']}"
                   f" (score {r['score']:.1f} %)\n")
        out.append(f"tests: {' '.join(MAP[r['module']][1])}\n")
        for path_, line, op, occ, diff in r["survivors"]:
            out.append(f"### {path_}:{line} {op} #{occ}\n\n```diff\n{diff.strip()}\n```\n")
    path.write_text("\n".join(out))
    print(f"survivors written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--module", action="append", choices=sorted(MAP),
                        help="a module to mutate (repeatable); default all")
    parser.add_argument("--report", type=Path,
                        default=Path("/tmp/minibatch-mutation-survivors.md"))
    parser.add_argument("--ref", help="mutate a git archive of this commit, not the work tree")
    parser.add_argument("--timeout", type=float, help="per-mutant timeout in seconds")
    parser.add_argument("--min-timeout", type=float, default=20.0)
    parser.add_argument("--timeout-factor", type=float, default=3.0)
    parser.add_argument("--exclude-operators", metavar="REGEX",
                        help="skip cosmic-ray operators matching this, e.g. 'Binary.*Shift'")
    parser.add_argument("--sample", type=int, metavar="N",
                        help="judge a random sample of N mutants (the score estimates the"
                             " module's)")
    parser.add_argument("--seed", type=int, default=0, help="the sample's seed (default 0)")
    parser.add_argument("--list", action="store_true",
                        help="count the mutants and time the tests, run no mutant")
    parser.add_argument("--keep", action="store_true", help="keep the temp copy")
    args = parser.parse_args()
    ensure_tool()
    work = make_copy(args.ref)
    tree = work / "tree"
    print(f"mutating a copy in {tree}", flush=True)
    rows = []
    try:
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
        args.interrupted = False
        for name in args.module or list(MAP):
            rows.append(run_module(name, tree, work, args))
            if args.interrupted:
                break
            print_table(rows[-1:])
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    if not args.list:
        write_report(rows, args.report)


if __name__ == "__main__":
    main()
