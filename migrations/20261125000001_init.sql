-- Coupon state (the projection), users, quota, decisions and history.
-- Names follow the product spec; extra tables carry what idempotency needs.

CREATE TABLE coupons (
    code              text        PRIMARY KEY,          -- Crockford base32 of id
    id                bigint      NOT NULL UNIQUE,      -- Snowflake id
    batch_id          uuid        NOT NULL,
    employee_id       text        NOT NULL,
    category          text        NOT NULL,
    status            text        NOT NULL DEFAULT 'available'
                      CHECK (status IN ('available', 'held', 'redeemed')),
    generated_at      timestamptz NOT NULL,
    holder_user_id    text,
    hold_id           text,                              -- the claim request that holds it
    held_until        timestamptz,
    redeemed_at       timestamptz,
    redeemed_order_id text,
    CONSTRAINT held_has_holder_and_deadline CHECK (
        status <> 'held' OR (holder_user_id IS NOT NULL AND hold_id IS NOT NULL AND held_until IS NOT NULL)),
    CONSTRAINT available_has_no_holder CHECK (
        status <> 'available' OR (holder_user_id IS NULL AND hold_id IS NULL AND held_until IS NULL)),
    CONSTRAINT redeemed_has_time CHECK (status <> 'redeemed' OR redeemed_at IS NOT NULL)
);

-- Allocation takes the oldest available coupon, optionally of one category.
CREATE INDEX coupons_available_by_category ON coupons (category, id) WHERE status = 'available';
CREATE INDEX coupons_available ON coupons (id) WHERE status = 'available';
-- The sweeper scans holds by deadline; claims look a user's hold up.
CREATE INDEX coupons_held_until ON coupons (held_until) WHERE status = 'held';
CREATE INDEX coupons_holder ON coupons (holder_user_id) WHERE holder_user_id IS NOT NULL;
-- A user holds at most one coupon at a time, whatever the code does.
CREATE UNIQUE INDEX coupons_one_hold_per_user ON coupons (holder_user_id) WHERE status = 'held';

CREATE TABLE users (
    user_id           text        PRIMARY KEY,
    name              text,
    dob               date,
    location          text,
    last_coupon_at    timestamptz,
    blacklisted       boolean     NOT NULL DEFAULT false,
    blacklisted_until timestamptz,                       -- NULL with blacklisted = indefinitely
    blacklist_reason  text,
    blacklisted_at    timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now()
);

-- One row per user per quota window: the primary key *is* the quota, so two
-- processors racing for the same user cannot both grant.
CREATE TABLE quota_grants (
    user_id      text        NOT NULL,
    window_start timestamptz NOT NULL,
    request_id   text        NOT NULL,
    granted_at   timestamptz NOT NULL,
    PRIMARY KEY (user_id, window_start)
);

-- Every claim decision, by request id: a redelivered request gets the stored
-- decision (and the same event id) again instead of a new one.
CREATE TABLE claim_decisions (
    request_id        text        PRIMARY KEY,
    event_id          uuid        NOT NULL,
    user_id           text        NOT NULL,
    outcome           text        NOT NULL,
    coupon_code       text,
    category          text,
    expires_at        timestamptz,
    repeated          boolean     NOT NULL DEFAULT false,
    retry_at          timestamptz,
    blacklisted_until timestamptz,
    reason            text,
    decided_at        timestamptz NOT NULL
);
CREATE INDEX claim_decisions_user ON claim_decisions (user_id, coupon_code);

-- Every purchase decision, by order id: purchases are idempotent on it.
CREATE TABLE purchase_decisions (
    order_id    text        PRIMARY KEY,
    request_id  text        NOT NULL,
    event_id    uuid        NOT NULL,
    user_id     text        NOT NULL,
    coupon_code text        NOT NULL,
    outcome     text        NOT NULL,
    reason      text,
    decided_at  timestamptz NOT NULL
);

-- Snowflake machine-id leases: a generator owns (datacenter, machine) while
-- its lease is fresh; last_ms lets the next owner start after its predecessor.
CREATE TABLE snowflake_leases (
    datacenter_id smallint    NOT NULL,
    machine_id    smallint    NOT NULL CHECK (machine_id BETWEEN 0 AND 31),
    owner         text        NOT NULL,
    expires_at    timestamptz NOT NULL,
    last_ms       bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (datacenter_id, machine_id)
);

-- Append-only history, partitioned by month on occurred_at. The key includes
-- the event id and the item's position in the event, so replays add nothing.
CREATE TABLE coupon_history (
    occurred_at timestamptz NOT NULL,
    event_id    uuid        NOT NULL,
    item        integer     NOT NULL DEFAULT 0,
    coupon_code text,
    user_id     text,
    kind        text        NOT NULL,
    detail      jsonb,
    PRIMARY KEY (occurred_at, event_id, item)
) PARTITION BY RANGE (occurred_at);
CREATE INDEX coupon_history_user ON coupon_history (user_id, occurred_at);
CREATE INDEX coupon_history_coupon ON coupon_history (coupon_code, occurred_at);
CREATE TABLE coupon_history_default PARTITION OF coupon_history DEFAULT;

-- Creates the monthly partitions covering [from_month, from_month + months).
CREATE FUNCTION ensure_history_partitions(from_month date, months integer) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    first date := date_trunc('month', from_month)::date;
    m date;
    name text;
BEGIN
    FOR i IN 0 .. months - 1 LOOP
        m := (first + make_interval(months => i))::date;
        name := format('coupon_history_%s', to_char(m, 'YYYY_MM'));
        IF to_regclass(name) IS NULL THEN
            BEGIN
                EXECUTE format(
                    'CREATE TABLE %I PARTITION OF coupon_history FOR VALUES FROM (%L) TO (%L)',
                    name, m, (m + interval '1 month')::date);
            EXCEPTION WHEN check_violation THEN
                -- Rows for that month already sit in the default partition;
                -- they stay there rather than fail start-up.
                RAISE NOTICE 'history partition % skipped: default partition holds its rows', name;
            END;
        END IF;
    END LOOP;
END $$;

SELECT ensure_history_partitions((now() - interval '1 month')::date, 4);
