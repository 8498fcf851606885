"""No coroutine outside the store calls a store method directly: each goes through
`await store.call(...)`, which takes a PostgreSQL round trip off the event loop (SQLite
runs it at once). A direct call would hold the loop, and every request and item on it,
for the round trip; on SQLite nothing would show it, so this reads the source."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import minibatch
from minibatch.store.interface import Store

# Store methods that do no I/O on the loop: a counter or a pragma, a thread of their own,
# no-ops on PostgreSQL, or the seam itself.
NOT_IO = {"call", "read_version", "subscribe", "clock", "autocheckpoint", "checkpoint",
          "wait_for_lock", "another", "close"}
STORE_IO = {name for name, _ in inspect.getmembers(Store, inspect.isfunction)
            if not name.startswith("_")} - NOT_IO
PACKAGE = Path(minibatch.__file__).parent


def direct_store_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, method) of each `<...>store.<method>(...)` made in a coroutine's own body:
    not in a function or lambda defined inside it, which `call` runs in its thread."""
    found = []

    def visit_body(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            if (isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute)
                    and child.func.attr in STORE_IO and _is_store(child.func.value)):
                found.append((child.lineno, child.func.attr))
            visit_body(child)

    for node in ast.walk(tree):
        if isinstance(node, ast.AsyncFunctionDef):
            visit_body(node)
    return found


def _is_store(node: ast.expr) -> bool:
    return (isinstance(node, ast.Name) and node.id == "store") or (
        isinstance(node, ast.Attribute) and node.attr == "store")


def test_the_guard_finds_a_direct_call_and_passes_one_through_call():
    source = """
async def route(self):
    row = self.mb.store.batch_get(batch_id)
    row = await self.store.call(self.store.batch_get, batch_id)
    await store.call(lambda: store.batch_cancel(batch_id, None, 0))
    def in_thread():
        return store.items_page(batch_id)
    version = self.store.read_version()
"""
    assert direct_store_calls(ast.parse(source)) == [(3, "batch_get")]


def test_no_coroutine_outside_the_store_calls_the_store_directly():
    assert len(STORE_IO) > 50  # the Protocol was read
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "store":
            continue
        for line, method in direct_store_calls(ast.parse(path.read_text())):
            offenders.append(f"{path.relative_to(PACKAGE)}:{line} store.{method}")
    assert offenders == []
