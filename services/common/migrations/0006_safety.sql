-- Which models produced an artifact's scores, and whether they were calibrated (real weights).
ALTER TABLE artifacts
    ADD COLUMN clip_model text NOT NULL DEFAULT '',
    ADD COLUMN clip_calibrated boolean NOT NULL DEFAULT false,
    ADD COLUMN lpips_model text NOT NULL DEFAULT '',
    ADD COLUMN lpips_calibrated boolean NOT NULL DEFAULT false;

-- Variants the image safety check kept back: never stored, never rendered again on a retry.
CREATE TABLE withheld_variants (
    job_id        uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    variant_index integer NOT NULL,
    category      text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, variant_index)
);

-- Refused prompts (kind 'prompt') and withheld images (kind 'image') per category and day.
CREATE TABLE safety_counts (
    day      date NOT NULL,
    kind     text NOT NULL CHECK (kind IN ('prompt', 'image')),
    category text NOT NULL,
    count    bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (day, kind, category)
);
