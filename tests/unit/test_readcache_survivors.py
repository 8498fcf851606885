"""ReadCache's bound, pinned where mutation testing of readcache.py (bench/mutation.py)
found the other tests blind: test_readcache.py fills the cache to the module's own
MAX_ENTRIES, so a changed constant moved the test with it, and it never let the cache
grow past the bound between two refreshes.

Over a real SQLite file: its `read_version()` stays put while nothing is written, so
only the bound can empty the cache. PostgreSQL's version moves at every refresh, which
empties the cache every time and leaves no bound to see (hence `sqlite_only`).

Equivalent:
- readcache.py 20 AddNot, `if TYPE_CHECKING:` -> `if not TYPE_CHECKING:`: `Store` is used
  only in annotations (strings, under `from __future__ import annotations`), and
  importing minibatch.store at runtime makes no cycle (the store imports neither
  readcache nor auth); it only binds a name nothing reads.
"""

from __future__ import annotations

import pytest

from minibatch.readcache import ReadCache
from minibatch.store import open_store

BOUND = 4096  # MAX_ENTRIES, written out: the mutants change the module's

pytestmark = pytest.mark.sqlite_only


def filled(db_path: str, n: int):
    store = open_store(db_path)
    cache = ReadCache(store)
    cache.refresh()
    for i in range(n):
        cache.put(i, i, cache.version)
    return store, cache


def test_one_entry_under_the_bound_is_kept_and_the_bound_itself_is_dropped(db_path):
    store, cache = filled(db_path, BOUND - 1)
    cache.refresh()  # nothing was written: only the bound could empty it
    assert len(cache.kept) == BOUND - 1 and cache.get(0) == 0
    cache.put(BOUND - 1, BOUND - 1, cache.version)
    assert len(cache.kept) == BOUND
    cache.refresh()
    assert cache.kept == {}
    store.close()


def test_a_cache_grown_past_the_bound_between_refreshes_is_dropped(db_path):
    store, cache = filled(db_path, BOUND + 5)
    cache.refresh()
    assert cache.kept == {}
    store.close()
