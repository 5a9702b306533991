-- Tenants and their API keys; every job, idempotency key, upload and cache entry belongs to a
-- tenant. Rows made before tenants existed go to 'local', the tenant of the embedded default's
-- own key, so that a `make run` user keeps their history.
CREATE TABLE tenants (
    name           text PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    -- Spending cap over the tenant's jobs (queued, running and completed), in cents; NULL: none.
    budget_cents   bigint CHECK (budget_cents >= 0),
    -- Share of the generators when tenants compete (weighted round-robin).
    weight         integer NOT NULL DEFAULT 1 CHECK (weight BETWEEN 1 AND 100),
    -- The default webhook of the tenant's jobs, and the secret every delivery is signed with.
    webhook_url    text NOT NULL DEFAULT '',
    webhook_events text[] NOT NULL DEFAULT '{}',
    webhook_secret text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id             uuid PRIMARY KEY,
    tenant         text NOT NULL REFERENCES tenants (name),
    name           text NOT NULL DEFAULT '',
    -- SHA-256 of the whole key: the key itself is shown once, at creation, and never stored.
    key_sha256     bytea NOT NULL UNIQUE,
    -- The key's first characters, to tell keys apart in listings.
    prefix         text NOT NULL,
    scopes         text[] NOT NULL,
    rate_per_minute integer CHECK (rate_per_minute > 0),
    max_concurrent integer CHECK (max_concurrent > 0),
    created_at     timestamptz NOT NULL DEFAULT now(),
    last_used_at   timestamptz,
    revoked_at     timestamptz
);
CREATE INDEX api_keys_tenant ON api_keys (tenant, created_at);

ALTER TABLE jobs
    ADD COLUMN tenant text NOT NULL DEFAULT 'local',
    ADD COLUMN api_key_id uuid,
    ADD COLUMN priority text NOT NULL DEFAULT 'normal' CHECK (priority IN ('high', 'normal', 'low')),
    ADD COLUMN cache_namespace text NOT NULL DEFAULT '',
    ADD COLUMN webhook_url text NOT NULL DEFAULT '',
    ADD COLUMN webhook_events text[] NOT NULL DEFAULT '{}';
ALTER TABLE jobs ALTER COLUMN tenant DROP DEFAULT;
CREATE INDEX jobs_tenant_created_at ON jobs (tenant, created_at DESC, id DESC);
CREATE INDEX jobs_key_active ON jobs (api_key_id) WHERE status IN ('queued', 'running');
CREATE INDEX jobs_tenant_spend ON jobs (tenant) WHERE status IN ('queued', 'running', 'completed');

-- Idempotency keys are the tenant's own: another tenant's key of the same text is another key.
ALTER TABLE idempotency_keys ADD COLUMN tenant text NOT NULL DEFAULT 'local';
ALTER TABLE idempotency_keys ALTER COLUMN tenant DROP DEFAULT;
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_pkey;
ALTER TABLE idempotency_keys ADD PRIMARY KEY (tenant, key);

-- Presigned uploads: what was asked (tenant, type, size bound), checked again when used.
CREATE TABLE uploads (
    key          text PRIMARY KEY,
    tenant       text NOT NULL,
    content_type text NOT NULL,
    max_bytes    bigint NOT NULL,
    sha256       text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);
CREATE INDEX uploads_created_at ON uploads (created_at);

-- Webhook deliveries: one per job and event, written in the transaction that ends the job;
-- sent (and retried with backoff) by the gateways' dispatchers.
CREATE TABLE webhook_deliveries (
    id              uuid PRIMARY KEY,
    tenant          text NOT NULL,
    job_id          uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    event_type      text NOT NULL,
    url             text NOT NULL,
    -- The body as first sent: every retry sends the same bytes under the same webhook-id.
    payload         text,
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    UNIQUE (job_id, event_type)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';

CREATE TABLE webhook_attempts (
    delivery_id  uuid NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt      integer NOT NULL,
    attempted_at timestamptz NOT NULL DEFAULT now(),
    status_code  integer,
    error        text NOT NULL DEFAULT '',
    duration_ms  real NOT NULL DEFAULT 0,
    PRIMARY KEY (delivery_id, attempt)
);

-- The prompt cache is per tenant unless the operator shares it: '' is the shared namespace.
ALTER TABLE cache_entries ADD COLUMN namespace text NOT NULL DEFAULT '';

-- Which jobs own an object (file downloads by key, retention's "still referenced" check), and
-- the expired cache rows retention removes.
CREATE INDEX artifacts_key ON artifacts (key);
CREATE INDEX cache_entries_expires_at ON cache_entries (expires_at);
