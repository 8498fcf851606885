"""The PostgreSQL schema, as numbered migrations; `minibatch_schema` records how many ran.

The same tables, columns (in the same order) and indexes as the SQLite schema after all
of its migrations, so the queries are the same; where SQLite gives a table an implicit
`rowid` that a query orders by, the table here has a `rowid` column, filled in insertion
order. Times are seconds since the epoch (double precision), JSON documents are bytea,
as in SQLite.
"""

PG_MIGRATIONS: list[str] = [
    # 1: everything SQLite's migrations 1-8 made
    """
    CREATE SEQUENCE batch_seq;
    CREATE TABLE batches (
        seq bigint PRIMARY KEY DEFAULT nextval('batch_seq'),
        id text NOT NULL UNIQUE,
        tenant text NOT NULL,
        kind text NOT NULL,
        status text NOT NULL,
        total bigint NOT NULL,
        queued bigint NOT NULL,
        running bigint NOT NULL DEFAULT 0,
        succeeded bigint NOT NULL DEFAULT 0,
        failed bigint NOT NULL DEFAULT 0,
        cancelled bigint NOT NULL DEFAULT 0,
        created_at double precision NOT NULL,
        started_at double precision,
        completed_at double precision,
        metadata bytea,
        max_attempts bigint NOT NULL,
        item_timeout_s double precision,
        concurrency bigint,
        webhook_url text,
        webhook_events text,
        webhook_gone bigint NOT NULL DEFAULT 0,
        claim_turn bigint,
        expired bigint NOT NULL DEFAULT 0,
        expires_at double precision,
        expiring bigint NOT NULL DEFAULT 0,
        cancel_requested_at double precision,
        dialect text NOT NULL DEFAULT 'native',
        dialect_data bytea
    );
    CREATE INDEX batches_tenant ON batches(tenant, seq);
    CREATE INDEX batches_open ON batches(kind) WHERE completed_at IS NULL;
    CREATE INDEX batches_expiry ON batches(expires_at)
        WHERE completed_at IS NULL AND expires_at IS NOT NULL;
    CREATE INDEX batches_tenant_open ON batches(tenant) WHERE completed_at IS NULL;
    CREATE INDEX batches_ended ON batches(completed_at) WHERE completed_at IS NOT NULL;
    CREATE TABLE items (
        seq bigserial PRIMARY KEY,
        batch bigint NOT NULL,
        idx bigint NOT NULL,
        kind text NOT NULL,
        entry_id text,
        status text NOT NULL,
        input bytea NOT NULL,
        metadata bytea,
        output bytea,
        error bytea,
        attempts bigint NOT NULL DEFAULT 0,
        run_at double precision NOT NULL,
        lease_until double precision,
        lease_owner text,
        lease_token bigint
    );
    CREATE UNIQUE INDEX items_batch_idx ON items(batch, idx);
    CREATE UNIQUE INDEX items_entry ON items(batch, entry_id) WHERE entry_id IS NOT NULL;
    CREATE INDEX items_running ON items(lease_until) WHERE status = 'running';
    CREATE INDEX items_due ON items(batch, run_at) WHERE status = 'queued';
    CREATE INDEX items_failed ON items(batch, idx) WHERE status = 'failed';
    CREATE INDEX items_cancelled ON items(batch, idx) WHERE status = 'cancelled';
    CREATE INDEX items_expired ON items(batch, idx) WHERE status = 'expired';
    CREATE TABLE tenants (name text PRIMARY KEY, created_at double precision NOT NULL);
    CREATE TABLE api_keys (
        key_hash bytea PRIMARY KEY, tenant text NOT NULL, created_at double precision NOT NULL,
        id text, name text, last_used_at double precision, revoked_at double precision,
        rowid bigserial
    );
    CREATE UNIQUE INDEX api_keys_id ON api_keys(id);
    CREATE INDEX api_keys_tenant ON api_keys(tenant, created_at);
    CREATE TABLE secrets (
        id text PRIMARY KEY, tenant text NOT NULL, secret text NOT NULL,
        created_at double precision NOT NULL, expires_at double precision, endpoint text,
        rowid bigserial
    );
    CREATE INDEX secrets_tenant ON secrets(tenant, created_at);
    CREATE TABLE deliveries (
        seq bigserial PRIMARY KEY,
        id text NOT NULL UNIQUE,
        batch bigint NOT NULL,
        tenant text NOT NULL,
        event text NOT NULL,
        url text NOT NULL,
        payload bytea NOT NULL,
        status text NOT NULL,
        is_automatic bigint NOT NULL DEFAULT 1,
        signing_secret_id text,
        attempt_count bigint NOT NULL DEFAULT 0,
        max_attempts bigint NOT NULL,
        next_attempt_at double precision,
        failure_reason_code text,
        failure_detail text,
        last_status_code bigint,
        last_error text,
        last_attempt_at double precision,
        created_at double precision NOT NULL,
        completed_at double precision,
        endpoint text
    );
    CREATE INDEX deliveries_due ON deliveries(next_attempt_at)
        WHERE status IN ('pending', 'sending');
    CREATE INDEX deliveries_batch ON deliveries(batch);
    CREATE INDEX deliveries_endpoint ON deliveries(endpoint, seq) WHERE endpoint IS NOT NULL;
    CREATE TABLE attempts (
        delivery bigint NOT NULL,
        attempt_number bigint NOT NULL,
        status_code bigint,
        response_body text,
        response_time_ms bigint NOT NULL,
        error_message text,
        is_automatic bigint NOT NULL,
        created_at double precision NOT NULL,
        rowid bigserial PRIMARY KEY
    );
    CREATE INDEX attempts_delivery ON attempts(delivery);
    CREATE TABLE files (
        id text PRIMARY KEY, tenant text NOT NULL, filename text,
        bytes bigint NOT NULL, lines bigint NOT NULL, created_at double precision NOT NULL,
        purpose text, batch bigint, expires_at double precision, rowid bigserial
    );
    CREATE INDEX files_tenant ON files(tenant, created_at);
    CREATE INDEX files_batch ON files(batch) WHERE batch IS NOT NULL;
    CREATE TABLE file_lines (
        file text NOT NULL, line bigint NOT NULL, entry_id text, input bytea NOT NULL,
        metadata bytea, url text, problem bytea, PRIMARY KEY (file, line)
    );
    CREATE TABLE file_parts (
        file text NOT NULL, part bigint NOT NULL, data bytea NOT NULL,
        PRIMARY KEY (file, part)
    );
    CREATE TABLE idempotency (
        tenant text NOT NULL, key text NOT NULL, body_hash bytea NOT NULL,
        status bigint NOT NULL, response bytea NOT NULL, created_at double precision NOT NULL,
        PRIMARY KEY (tenant, key)
    );
    CREATE INDEX idempotency_age ON idempotency(created_at);
    CREATE TABLE webhook_endpoints (
        seq bigserial PRIMARY KEY,
        id text NOT NULL UNIQUE,
        tenant text NOT NULL,
        name text NOT NULL,
        url text NOT NULL,
        event_types text NOT NULL,
        created_at double precision NOT NULL,
        updated_at double precision NOT NULL
    );
    CREATE INDEX webhook_endpoints_tenant ON webhook_endpoints(tenant, seq);
    CREATE TABLE doomed (batch bigint PRIMARY KEY);
    CREATE TABLE doomed_files (file text PRIMARY KEY);
    CREATE TABLE delivery_counts (status text PRIMARY KEY, n bigint NOT NULL);
    CREATE FUNCTION delivery_count() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP <> 'INSERT' THEN
            UPDATE delivery_counts SET n = n - 1 WHERE status = OLD.status;
        END IF;
        IF TG_OP <> 'DELETE' THEN
            INSERT INTO delivery_counts VALUES (NEW.status, 1)
                ON CONFLICT (status) DO UPDATE SET n = delivery_counts.n + 1;
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER delivery_counted AFTER INSERT OR DELETE ON deliveries
        FOR EACH ROW EXECUTE FUNCTION delivery_count();
    CREATE TRIGGER delivery_recounted AFTER UPDATE OF status ON deliveries
        FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
        EXECUTE FUNCTION delivery_count();
    CREATE TABLE ui_sessions (
        token_hash bytea PRIMARY KEY, key_hash bytea NOT NULL, csrf text NOT NULL,
        created_at double precision NOT NULL, expires_at double precision NOT NULL
    );
    CREATE TABLE batch_ticks (
        batch bigint NOT NULL, second bigint NOT NULL, n bigint NOT NULL,
        PRIMARY KEY (batch, second)
    );
    """,
    # 2: SQLite's 9, the kinds each process serves
    """
    CREATE TABLE kind_leases (
        kind text NOT NULL, owner text NOT NULL, lease_until double precision NOT NULL,
        PRIMARY KEY (kind, owner)
    );
    """,
]
