"""What of the PostgreSQL store needs no server: each statement of the query files in
psycopg's placeholders, the values as its schema holds them, and URLs in messages
(minibatch/store/postgres.py). The store itself is judged under MINIBATCH_TEST_STORE=
postgres, where every store test runs against a real server."""

from __future__ import annotations

from minibatch.store.postgres import _param, _params, is_url, redact, translate


def test_plain_placeholders_become_psycopgs_and_percent_signs_are_escaped():
    assert translate("SELECT a FROM t WHERE b=? AND c LIKE 'x%' AND d IN (?,?)") == (
        "SELECT a FROM t WHERE b=%s AND c LIKE 'x%%' AND d IN (%s,%s)", False)


def test_numbered_placeholders_go_by_name():
    assert translate("UPDATE t SET a=?1, b=?2 WHERE c=?1 AND d=?10") == (
        "UPDATE t SET a=%(p1)s, b=%(p2)s WHERE c=%(p1)s AND d=%(p10)s", True)


def test_is_and_is_not_a_placeholder_compare_nulls_as_sqlite_does():
    assert translate("SELECT 1 FROM t WHERE a IS ? AND b IS NOT ?")[0] == (
        "SELECT 1 FROM t WHERE a IS NOT DISTINCT FROM %s AND b IS DISTINCT FROM %s")
    assert translate("SELECT 1 FROM t WHERE a IS ?2 AND b IS  NOT ?1")[0] == (
        "SELECT 1 FROM t WHERE a IS NOT DISTINCT FROM %(p2)s AND b IS DISTINCT FROM"
        " %(p1)s")
    assert translate("SELECT 1 FROM t WHERE a IS NULL AND b IS NOT NULL") == (
        "SELECT 1 FROM t WHERE a IS NULL AND b IS NOT NULL", False)


def test_sqlites_index_hint_is_dropped():
    assert translate("SELECT seq FROM items INDEXED BY items_due WHERE a=?") == (
        "SELECT seq FROM items WHERE a=%s", False)


def test_values_are_stored_as_the_schema_holds_them():
    assert [_param(v) for v in (True, False, 0, 2.5, None, b"\x00")] == [1, 0, 0, 2.5, None,
                                                                       b"\x00"]
    assert type(_param(True)) is int
    assert _param("a\x00b\x00") == "a\ufffdb\ufffd" and _param("ab") == "ab"
    assert _params(["x", True, None], True) == {"p1": "x", "p2": 1, "p3": None}
    assert _params(["x", True, None], False) == ["x", 1, None]
    assert _params([], True) == {} and _params([], False) == []


def test_a_url_in_a_message_has_no_password_and_only_postgres_urls_are_urls():
    assert redact("postgresql://me:s3cret@db.example:5432/jobs") == (
        "postgresql://me:***@db.example:5432/jobs")
    assert redact("postgresql://me@db.example/jobs") == "postgresql://me@db.example/jobs"
    assert [is_url(u) for u in ("postgresql://h/db", "postgres://h/db", "/tmp/jobs.db",
                                 "jobs.db", "sqlite://x")] == [True, True, False, False,
                                                               False]
