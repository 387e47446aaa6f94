-- Profiles (issue #28 item 6): the seed's `name`, `dob` and `location` of
-- `users` are filled by the profiles processor from `coupons.users`
-- (`UserProfileUpdated`). Of two events for one user the later
-- (`profile_updated_at`, then the larger `profile_event_id`) wins, whatever
-- order they arrive in: these two columns are what the projection compares,
-- so a redelivered or older event changes nothing.
ALTER TABLE users
    ADD COLUMN IF NOT EXISTS profile_updated_at timestamptz,
    ADD COLUMN IF NOT EXISTS profile_event_id   text;

-- Eligibility (issue #28 item 2) is enforced by the claim processor: each
-- batch reads the campaigns with rules that still have available coupons.
CREATE INDEX IF NOT EXISTS campaigns_restricted ON campaigns (valid_until)
    WHERE cardinality(locations) > 0 OR min_age IS NOT NULL;
