-- The gateways read the current blacklist every second (the sold-out fast
-- path must not answer `sold_out` to a blacklisted user, who is owed `403`);
-- a partial index keeps that read independent of the number of users.
CREATE INDEX IF NOT EXISTS users_blacklisted ON users (user_id) WHERE blacklisted;
