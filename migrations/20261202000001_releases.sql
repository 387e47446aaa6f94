-- Idempotent releases (POST /api/v1/coupon with an Idempotency-Key header,
-- couponctl issue --idempotency-key): the batch, its id and every code, is
-- stored here before anything is published. A repeat with the same key answers
-- this batch; a release cut mid-way (a client gone, a process killed, a broker
-- error) is completed by publishing the stored codes again (the projector and
-- the history sink deduplicate). `published_at` is set once every chunk is on
-- the log. The release holding the row lock (SELECT ... FOR UPDATE) is the one
-- publishing; a concurrent repeat waits for it.
CREATE TABLE IF NOT EXISTS releases (
    idempotency_key text        PRIMARY KEY,
    batch_id        uuid        NOT NULL UNIQUE,
    employee_id     text        NOT NULL,
    category        text        NOT NULL,
    count           integer     NOT NULL CHECK (count > 0),
    coupon_ids      bigint[]    NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    published_at    timestamptz
);
