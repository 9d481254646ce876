-- hallmark's schema (PostgreSQL). Kept in step with migrations/sqlite: same tables, columns and
-- meanings. Times are Unix milliseconds; identifiers are UUID strings; JSON is stored as text.

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    role        TEXT NOT NULL CHECK (role IN ('admin', 'publisher', 'auditor')),
    key_hash    TEXT NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT
);

CREATE TABLE datasets (
    id           TEXT PRIMARY KEY,
    owner_id     TEXT NOT NULL REFERENCES api_keys (id),
    name         TEXT NOT NULL,
    path         TEXT NOT NULL,
    format       TEXT NOT NULL,
    split        TEXT,
    count        BIGINT NOT NULL,
    num_classes  BIGINT NOT NULL,
    shape        TEXT NOT NULL,
    sha256       TEXT NOT NULL,
    uploaded     BIGINT NOT NULL,
    created_at   BIGINT NOT NULL
);
CREATE INDEX datasets_owner ON datasets (owner_id, created_at);

CREATE TABLE jobs (
    id                TEXT PRIMARY KEY,
    kind              TEXT NOT NULL,
    owner_id          TEXT NOT NULL REFERENCES api_keys (id),
    resource_id       TEXT NOT NULL,
    state             TEXT NOT NULL,
    progress_done     BIGINT NOT NULL DEFAULT 0,
    progress_total    BIGINT NOT NULL DEFAULT 0,
    attempts          BIGINT NOT NULL DEFAULT 0,
    max_attempts      BIGINT NOT NULL,
    worker            TEXT,
    heartbeat_at      BIGINT,
    cancel_requested  BIGINT NOT NULL DEFAULT 0,
    error_code        TEXT,
    error             TEXT,
    created_at        BIGINT NOT NULL,
    started_at        BIGINT,
    finished_at       BIGINT
);
CREATE INDEX jobs_queue ON jobs (state, created_at);
CREATE INDEX jobs_owner ON jobs (owner_id, created_at);

-- One row each time a worker starts a job: the record that a job ran once (or why it ran again).
CREATE TABLE job_runs (
    job_id      TEXT NOT NULL REFERENCES jobs (id),
    attempt     BIGINT NOT NULL,
    worker      TEXT NOT NULL,
    started_at  BIGINT NOT NULL,
    PRIMARY KEY (job_id, attempt)
);

CREATE TABLE watermarks (
    id                  TEXT PRIMARY KEY,
    owner_id            TEXT NOT NULL REFERENCES api_keys (id),
    name                TEXT NOT NULL,
    dataset_id          TEXT REFERENCES datasets (id),
    holdout_dataset_id  TEXT REFERENCES datasets (id),
    job_id              TEXT REFERENCES jobs (id),
    -- The spec and nonce to apply (sealed), then the secret record (sealed): never in clear.
    spec_sealed         TEXT,
    secret_sealed       TEXT,
    commitment          TEXT,
    dataset_sha256      TEXT,
    release_path        TEXT,
    poisoned            BIGINT,
    created_at          BIGINT NOT NULL
);
CREATE INDEX watermarks_owner ON watermarks (owner_id, created_at);

CREATE TABLE grants (
    watermark_id  TEXT NOT NULL REFERENCES watermarks (id),
    auditor_id    TEXT NOT NULL REFERENCES api_keys (id),
    created_at    BIGINT NOT NULL,
    PRIMARY KEY (watermark_id, auditor_id)
);

CREATE TABLE verifications (
    id                  TEXT PRIMARY KEY,
    owner_id            TEXT NOT NULL REFERENCES api_keys (id),
    watermark_id        TEXT NOT NULL REFERENCES watermarks (id),
    holdout_dataset_id  TEXT NOT NULL REFERENCES datasets (id),
    job_id              TEXT NOT NULL REFERENCES jobs (id),
    request             TEXT NOT NULL,
    decision            TEXT,
    p_value             DOUBLE PRECISION,
    verdict             TEXT,
    created_at          BIGINT NOT NULL
);
CREATE INDEX verifications_owner ON verifications (owner_id, created_at);
