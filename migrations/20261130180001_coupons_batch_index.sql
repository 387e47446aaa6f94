-- The console follows a release by its batch id (GET /api/v1/batches?batch_id=,
-- polled until every coupon of the batch is projected): an index keeps each poll
-- to the batch's rows instead of a scan of every coupon ever issued.
CREATE INDEX IF NOT EXISTS coupons_batch ON coupons (batch_id);
