-- Jobs, their artifacts with scores, and the prompt cache's durable rows.
CREATE TABLE jobs (
    id              uuid PRIMARY KEY,
    status          text NOT NULL CHECK (status IN ('queued', 'running', 'completed', 'failed', 'cancelled')),
    stage           text NOT NULL DEFAULT '',
    progress_percent real NOT NULL DEFAULT 0,
    spec            jsonb NOT NULL,
    cache_key       text NOT NULL,
    cost_cents      bigint NOT NULL,
    cache_hit       boolean NOT NULL DEFAULT false,
    error           text NOT NULL DEFAULT '',
    attempts        integer NOT NULL DEFAULT 0,
    idempotency_key text UNIQUE,
    engine_version  text NOT NULL DEFAULT '',
    evaluator_models text[] NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX jobs_created_at ON jobs (created_at DESC, id DESC);
CREATE INDEX jobs_status ON jobs (status, created_at DESC);

CREATE TABLE artifacts (
    id                 uuid PRIMARY KEY,
    job_id             uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    variant_index      integer NOT NULL,
    key                text NOT NULL,
    sha256             text NOT NULL,
    width_px           integer NOT NULL,
    height_px          integer NOT NULL,
    seed               bigint NOT NULL,
    clip_score         real,
    lpips_diversity    real,
    lpips_to_reference real,
    nsfw               boolean NOT NULL DEFAULT false,
    is_primary         boolean NOT NULL DEFAULT false,
    created_at         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (job_id, variant_index)
);

CREATE TABLE cache_entries (
    key          text PRIMARY KEY,
    seedless_key text NOT NULL,
    job_id       uuid NOT NULL,
    seed         bigint NOT NULL,
    artifacts    jsonb NOT NULL,
    hit_count    bigint NOT NULL DEFAULT 0,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);
CREATE INDEX cache_entries_seedless ON cache_entries (seedless_key, expires_at DESC);
