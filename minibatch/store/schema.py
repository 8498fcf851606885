"""The schema, as numbered migrations; `PRAGMA user_version` records how many ran."""

MIGRATIONS: list[str] = [
    # 1: the queue
    """
    CREATE TABLE batches (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        tenant TEXT NOT NULL,
        kind TEXT NOT NULL,
        status TEXT NOT NULL,
        total INTEGER NOT NULL,
        queued INTEGER NOT NULL,
        running INTEGER NOT NULL DEFAULT 0,
        succeeded INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0,
        cancelled INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        started_at REAL,
        completed_at REAL,
        metadata BLOB,
        max_attempts INTEGER NOT NULL,
        item_timeout_s REAL,
        concurrency INTEGER
    );
    CREATE INDEX batches_tenant ON batches(tenant, seq);
    CREATE INDEX batches_open ON batches(kind) WHERE completed_at IS NULL;
    CREATE TABLE items (
        seq INTEGER PRIMARY KEY,
        batch INTEGER NOT NULL,
        idx INTEGER NOT NULL,
        kind TEXT NOT NULL,
        entry_id TEXT,
        status TEXT NOT NULL,
        input BLOB NOT NULL,
        metadata BLOB,
        output BLOB,
        error BLOB,
        attempts INTEGER NOT NULL DEFAULT 0,
        run_at REAL NOT NULL,
        lease_until REAL,
        lease_owner TEXT
    );
    CREATE UNIQUE INDEX items_batch_idx ON items(batch, idx);
    CREATE UNIQUE INDEX items_entry ON items(batch, entry_id) WHERE entry_id IS NOT NULL;
    -- Partial indexes: the claim and the rescue each scan only the rows they want
    -- (measured 1.3x a composite index and 7.5x no index, shared/MEASURED.md).
    CREATE INDEX items_queued ON items(kind, run_at) WHERE status = 'queued';
    CREATE INDEX items_running ON items(lease_until) WHERE status = 'running';
    """,
    # 2: webhooks, tenants, files, idempotency
    """
    ALTER TABLE batches ADD COLUMN webhook_url TEXT;
    ALTER TABLE batches ADD COLUMN webhook_events TEXT;
    ALTER TABLE batches ADD COLUMN webhook_gone INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE tenants (name TEXT PRIMARY KEY, created_at REAL NOT NULL);
    CREATE TABLE api_keys (
        key_hash BLOB PRIMARY KEY, tenant TEXT NOT NULL, created_at REAL NOT NULL
    );
    CREATE TABLE secrets (
        id TEXT PRIMARY KEY, tenant TEXT NOT NULL, secret TEXT NOT NULL,
        created_at REAL NOT NULL, expires_at REAL
    );
    CREATE INDEX secrets_tenant ON secrets(tenant, created_at);
    CREATE TABLE deliveries (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        batch INTEGER NOT NULL,
        tenant TEXT NOT NULL,
        event TEXT NOT NULL,
        url TEXT NOT NULL,
        payload BLOB NOT NULL,
        status TEXT NOT NULL,
        is_automatic INTEGER NOT NULL DEFAULT 1,
        signing_secret_id TEXT,
        attempt_count INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER NOT NULL,
        next_attempt_at REAL,
        failure_reason_code TEXT,
        failure_detail TEXT,
        last_status_code INTEGER,
        last_error TEXT,
        last_attempt_at REAL,
        created_at REAL NOT NULL,
        completed_at REAL
    );
    CREATE INDEX deliveries_due ON deliveries(next_attempt_at) WHERE status = 'pending';
    CREATE INDEX deliveries_batch ON deliveries(batch);
    CREATE TABLE attempts (
        delivery INTEGER NOT NULL,
        attempt_number INTEGER NOT NULL,
        status_code INTEGER,
        response_body TEXT,
        response_time_ms INTEGER NOT NULL,
        error_message TEXT,
        is_automatic INTEGER NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX attempts_delivery ON attempts(delivery);
    CREATE TABLE files (
        id TEXT PRIMARY KEY, tenant TEXT NOT NULL, filename TEXT,
        bytes INTEGER NOT NULL, lines INTEGER NOT NULL, created_at REAL NOT NULL
    );
    CREATE TABLE file_lines (
        file TEXT NOT NULL, line INTEGER NOT NULL, entry_id TEXT, input BLOB NOT NULL,
        metadata BLOB, PRIMARY KEY (file, line)
    ) WITHOUT ROWID;
    CREATE TABLE idempotency (
        tenant TEXT NOT NULL, key TEXT NOT NULL, body_hash BLOB NOT NULL,
        status INTEGER NOT NULL, response BLOB NOT NULL, created_at REAL NOT NULL,
        PRIMARY KEY (tenant, key)
    );
    """,
    # 3: a token per claim, so an outcome can only land on the claim that ran it
    """
    ALTER TABLE items ADD COLUMN lease_token INTEGER;
    """,
    # 4: a delivery being sent is 'sending' (shown as pending), so a manual retry can tell
    # an attempt in flight from one waiting for its time
    """
    DROP INDEX deliveries_due;
    CREATE INDEX deliveries_due ON deliveries(next_attempt_at)
        WHERE status IN ('pending', 'sending');
    """,
    # 5: fair claims. A claim goes round the open batches of a kind, so due items are
    # looked up per batch (`items_due` replaces the per-kind `items_queued`, so a queued
    # item still costs one index entry), and `claim_turn` orders the batches: the least
    # recently served goes first, a batch never served (NULL) before any other.
    """
    DROP INDEX items_queued;
    CREATE INDEX items_due ON items(batch, run_at) WHERE status = 'queued';
    ALTER TABLE batches ADD COLUMN claim_turn INTEGER;
    """,
    # 6: expiry, dialects, purposes of files, tenant-level webhook endpoints.
    # `expired` counts items that ended expired; `expires_at` is when a batch's items not
    # yet started expire; `expiring` marks a batch past it whose running items finish
    # first. `dialect` is the API that made the batch and `dialect_data` what only that
    # dialect shows (JSON). A file's `purpose` is a dialect's word (NULL for native files);
    # `batch` names the batch a generated (output or error) file belongs to. A line of an
    # OpenAI batch file keeps its `url` and, when it is not a valid request line, its
    # `problem` ({code, message, param}), found at upload and reported when a batch uses
    # the file; the file's bytes as uploaded are kept in `file_parts`, for its download.
    # Endpoint secrets are rows of `secrets` with their `endpoint`.
    """
    ALTER TABLE batches ADD COLUMN expired INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE batches ADD COLUMN expires_at REAL;
    ALTER TABLE batches ADD COLUMN expiring INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE batches ADD COLUMN cancel_requested_at REAL;
    ALTER TABLE batches ADD COLUMN dialect TEXT NOT NULL DEFAULT 'native';
    ALTER TABLE batches ADD COLUMN dialect_data BLOB;
    CREATE INDEX batches_expiry ON batches(expires_at)
        WHERE completed_at IS NULL AND expires_at IS NOT NULL;
    ALTER TABLE files ADD COLUMN purpose TEXT;
    ALTER TABLE files ADD COLUMN batch INTEGER;
    ALTER TABLE files ADD COLUMN expires_at REAL;
    CREATE INDEX files_tenant ON files(tenant, created_at);
    ALTER TABLE file_lines ADD COLUMN url TEXT;
    ALTER TABLE file_lines ADD COLUMN problem BLOB;
    CREATE TABLE file_parts (
        file TEXT NOT NULL, part INTEGER NOT NULL, data BLOB NOT NULL,
        PRIMARY KEY (file, part)
    ) WITHOUT ROWID;
    CREATE TABLE webhook_endpoints (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        tenant TEXT NOT NULL,
        name TEXT NOT NULL,
        url TEXT NOT NULL,
        event_types TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX webhook_endpoints_tenant ON webhook_endpoints(tenant, seq);
    ALTER TABLE secrets ADD COLUMN endpoint TEXT;
    ALTER TABLE deliveries ADD COLUMN endpoint TEXT;
    """,
    # 7: keys are named, listed and revoked by an id (never by the key itself).
    """
    ALTER TABLE api_keys ADD COLUMN id TEXT;
    ALTER TABLE api_keys ADD COLUMN name TEXT;
    ALTER TABLE api_keys ADD COLUMN last_used_at REAL;
    ALTER TABLE api_keys ADD COLUMN revoked_at REAL;
    UPDATE api_keys SET id = 'key_' || lower(hex(randomblob(12)));
    CREATE UNIQUE INDEX api_keys_id ON api_keys(id);
    CREATE INDEX api_keys_tenant ON api_keys(tenant, created_at);
    CREATE INDEX batches_tenant_open ON batches(tenant) WHERE completed_at IS NULL;
    -- Deleted batches whose items and deliveries are still being removed, a chunk per
    -- transaction (retention.py): the batch row is gone, so nothing shows them.
    CREATE TABLE doomed (batch INTEGER PRIMARY KEY);
    CREATE TABLE doomed_files (file TEXT PRIMARY KEY);
    CREATE INDEX files_batch ON files(batch) WHERE batch IS NOT NULL;
    CREATE INDEX idempotency_age ON idempotency(created_at);
    CREATE INDEX batches_ended ON batches(completed_at) WHERE completed_at IS NOT NULL;
    -- Deliveries by status for /metrics, kept by triggers in the same transaction as
    -- every change, so a scrape reads a few rows, not a GROUP BY over all deliveries.
    CREATE TABLE delivery_counts (status TEXT PRIMARY KEY, n INTEGER NOT NULL)
        WITHOUT ROWID;
    INSERT INTO delivery_counts SELECT status, count(*) FROM deliveries GROUP BY status;
    CREATE TRIGGER delivery_counted AFTER INSERT ON deliveries BEGIN
        INSERT INTO delivery_counts VALUES (new.status, 1)
            ON CONFLICT (status) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER delivery_recounted AFTER UPDATE OF status ON deliveries
        WHEN old.status IS NOT new.status BEGIN
        UPDATE delivery_counts SET n = n - 1 WHERE status = old.status;
        INSERT INTO delivery_counts VALUES (new.status, 1)
            ON CONFLICT (status) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER delivery_uncounted AFTER DELETE ON deliveries BEGIN
        UPDATE delivery_counts SET n = n - 1 WHERE status = old.status;
    END;
    """,
    # 8: the dashboard. A session holds a key's digest (never the key) and its form token;
    # `batch_ticks` counts a batch's items ended per second (its throughput picture, a row
    # per second of its life however many items it has). Items that ended failed,
    # cancelled or expired, and an endpoint's deliveries, get indexes of their own, so a
    # page of them (errors grouped, `items?status=`, an endpoint's health) reads only the
    # rows it shows; no item that succeeds pays for them.
    """
    CREATE TABLE ui_sessions (
        token_hash BLOB PRIMARY KEY, key_hash BLOB NOT NULL, csrf TEXT NOT NULL,
        created_at REAL NOT NULL, expires_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE batch_ticks (
        batch INTEGER NOT NULL, second INTEGER NOT NULL, n INTEGER NOT NULL,
        PRIMARY KEY (batch, second)
    ) WITHOUT ROWID;
    CREATE INDEX items_failed ON items(batch, idx) WHERE status = 'failed';
    CREATE INDEX items_cancelled ON items(batch, idx) WHERE status = 'cancelled';
    CREATE INDEX items_expired ON items(batch, idx) WHERE status = 'expired';
    CREATE INDEX deliveries_endpoint ON deliveries(endpoint, seq) WHERE endpoint IS NOT NULL;
    """,
    # 9: the kinds each process serves, leased as its items are (until its lease runs
    # out), so a process starting without a kind's handler leaves that kind's batches to
    # the processes that have one rather than failing them.
    """
    CREATE TABLE kind_leases (
        kind TEXT NOT NULL, owner TEXT NOT NULL, lease_until REAL NOT NULL,
        PRIMARY KEY (kind, owner)
    ) WITHOUT ROWID;
    """,
]
