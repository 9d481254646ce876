-- Releases with several independent secret triggers: how many a watermark carries, and which one
-- each verification spent (1-based; NULL: the watermark's only trigger, which every verification
-- uses). A trigger is spent at most once.
ALTER TABLE watermarks ADD COLUMN triggers BIGINT NOT NULL DEFAULT 1;
ALTER TABLE verifications ADD COLUMN spent_trigger BIGINT;
CREATE UNIQUE INDEX verifications_spent_trigger ON verifications (watermark_id, spent_trigger);
