-- A verification may test one model with several triggers of its release at once, each at
-- alpha / k, the model accused when any says used (Bonferroni): it spends the triggers
-- spent_trigger .. spent_trigger + spent_count - 1. NULL: the one trigger spent_trigger.
ALTER TABLE verifications ADD COLUMN spent_count BIGINT;
