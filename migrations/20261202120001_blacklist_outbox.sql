-- Blacklist changes waiting for the log (a transactional outbox). A change of
-- `users.blacklisted*` writes its `BlacklistChanged` event here in the same
-- transaction, already encoded with its envelope (so its event id is fixed
-- once: a re-publish is a duplicate the rebuild and audit drop). After the
-- commit the change is published and its row deleted; a row left behind (the
-- broker was down, the process died) is published by the relay of any serving
-- process. Rows of one user are published in `seq` order, which is their
-- commit order: the change holds the user's row lock when it inserts here.
CREATE TABLE IF NOT EXISTS blacklist_outbox (
    seq        bigserial   PRIMARY KEY,
    event_id   uuid        NOT NULL UNIQUE,
    user_id    text        NOT NULL,
    payload    bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS blacklist_outbox_user ON blacklist_outbox (user_id, seq);

-- The upkeep lifts entries whose end has passed (`blacklist_lift_expired`):
-- a partial index keeps that scan to the entries with an end.
CREATE INDEX IF NOT EXISTS users_blacklist_ends ON users (blacklisted_until)
    WHERE blacklisted AND blacklisted_until IS NOT NULL;
