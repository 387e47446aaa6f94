-- A campaign ends, and a cancelled order gives its coupon back (issue #28
-- items 3 and 5).

-- `expired`: the coupon's campaign ended; it left the pool for good (an
-- available coupon at the end, a hold that ended unbought after it, a
-- cancelled order's coupon after it). It keeps no holder and no deadline.
ALTER TABLE coupons DROP CONSTRAINT IF EXISTS coupons_status_check;
ALTER TABLE coupons ADD CONSTRAINT coupons_status_check
    CHECK (status IN ('available', 'held', 'redeemed', 'expired'));
ALTER TABLE coupons ADD CONSTRAINT expired_has_no_holder CHECK (
    status <> 'expired' OR (holder_user_id IS NULL AND hold_id IS NULL AND held_until IS NULL));

-- An early end (`DELETE /api/v1/campaigns/<batch id>`, `couponctl campaign
-- end`): when, on the database's clock, and by whom. Written once: a second
-- end answers the first. The campaign ends at the earlier of valid_until and
-- ended_at (`coupon_domain::lifecycle::campaign_end`).
ALTER TABLE campaigns
    ADD COLUMN IF NOT EXISTS ended_at timestamptz,
    ADD COLUMN IF NOT EXISTS ended_by text,
    -- When the expiry sweeper published the early end (`CampaignEnded`) and
    -- the broker confirmed it; NULL: still to publish.
    ADD COLUMN IF NOT EXISTS end_published_at timestamptz;
-- The expiry sweeper looks for campaigns that have ended.
CREATE INDEX IF NOT EXISTS campaigns_end ON campaigns ((LEAST(valid_until, ended_at)))
    WHERE valid_until IS NOT NULL OR ended_at IS NOT NULL;

-- A cancelled order (`POST /api/v1/purchase/<order id>/cancel`): stored with
-- its purchase's decision, so a repeat answers the same and republishes the
-- same event.
ALTER TABLE purchase_decisions
    ADD COLUMN IF NOT EXISTS cancelled_at      timestamptz,
    ADD COLUMN IF NOT EXISTS cancel_request_id text,
    ADD COLUMN IF NOT EXISTS cancel_event_id   uuid,
    ADD COLUMN IF NOT EXISTS cancelled_to      text
        CHECK (cancelled_to IN ('available', 'expired'));
