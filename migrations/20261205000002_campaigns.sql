-- Campaigns (issue #28): what a batch's coupons are worth, when they may be
-- claimed and by whom. One row per batch that has a campaign, written by the
-- coupon projector from the batch's `coupons.created` events before its
-- coupons (so a coupon is never claimable without its window); a batch
-- without a campaign has no row. Never one row per coupon: the coupons find
-- theirs by `batch_id`.
CREATE TABLE IF NOT EXISTS campaigns (
    batch_id           uuid        PRIMARY KEY,
    name               text,
    percent_off        smallint    CHECK (percent_off BETWEEN 1 AND 100),
    amount_off         bigint      CHECK (amount_off > 0),
    amount_currency    text,
    min_order_amount   bigint      CHECK (min_order_amount > 0),
    min_order_currency text,
    valid_from         timestamptz,
    valid_until        timestamptz,
    -- Eligibility, stored and shown; not enforced yet (no user profiles).
    locations          text[]      NOT NULL DEFAULT '{}',
    min_age            integer     CHECK (min_age BETWEEN 1 AND 120),
    created_at         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT one_discount CHECK (percent_off IS NULL OR amount_off IS NULL),
    CONSTRAINT amount_has_currency CHECK ((amount_off IS NULL) = (amount_currency IS NULL)),
    CONSTRAINT minimum_has_currency CHECK ((min_order_amount IS NULL) = (min_order_currency IS NULL)),
    CONSTRAINT window_ends_after_start CHECK (
        valid_from IS NULL OR valid_until IS NULL OR valid_until > valid_from)
);
-- The claim processor caps its sold-out marks at the next opening
-- (`coupon_domain::sold_out::mark_ttl`): the earliest future valid_from.
CREATE INDEX IF NOT EXISTS campaigns_opening ON campaigns (valid_from) WHERE valid_from IS NOT NULL;

-- An idempotent release's campaign (the encoded `coupons.v1.Campaign`; NULL:
-- none): part of the body a repeat with the same key must match.
ALTER TABLE releases ADD COLUMN IF NOT EXISTS campaign bytea;

-- A purchase's order total and the discount its campaign gave, stored with
-- the decision so that a repeat of the order answers the same.
ALTER TABLE purchase_decisions
    ADD COLUMN IF NOT EXISTS order_total_amount   bigint,
    ADD COLUMN IF NOT EXISTS order_total_currency text,
    ADD COLUMN IF NOT EXISTS discount_amount      bigint,
    ADD COLUMN IF NOT EXISTS discount_currency    text;
