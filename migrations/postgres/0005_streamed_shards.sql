-- Streamed datasets and releases written as one job per shard.
-- A dataset registered as streamed is read shard by shard (Parquet or WebDataset shards, or an
-- ImageFolder's class folders) and hashed by its images' stored bytes (hallmark-stream-v1).
ALTER TABLE datasets ADD COLUMN streamed BIGINT NOT NULL DEFAULT 0;
-- A streamed release's shards: each is written by its own job, on any worker; its output (the
-- poisoned keys among it: secret) is stored sealed once the job succeeds. The watermark's own
-- job waits in the queue until every shard job has ended, then assembles the release.
CREATE TABLE watermark_shards (
    watermark_id   TEXT NOT NULL REFERENCES watermarks (id),
    shard          BIGINT NOT NULL,
    job_id         TEXT NOT NULL REFERENCES jobs (id),
    output_sealed  TEXT,
    PRIMARY KEY (watermark_id, shard)
);
CREATE INDEX watermark_shards_job ON watermark_shards (job_id);
