-- Release rows waiting for the Cassandra history (HISTORY_STORE=cassandra): a
-- transactional outbox. A hold's release (by the expiry consumer, or by the
-- grant that found the user's overdue hold) writes its history row here in
-- the same transaction as the release itself, since only that transaction
-- knows whether the release happened; the history role forwards the rows to
-- Cassandra and deletes them once Cassandra acknowledged them. With
-- HISTORY_STORE=postgres the rows go straight to coupon_history and this
-- table stays empty.
CREATE TABLE IF NOT EXISTS history_outbox (
    seq         bigserial   PRIMARY KEY,
    occurred_at timestamptz NOT NULL,
    event_id    uuid        NOT NULL,
    item        integer     NOT NULL DEFAULT 0,
    coupon_code text,
    user_id     text,
    kind        text        NOT NULL,
    detail      jsonb       NOT NULL,
    UNIQUE (event_id, item)
);
