-- Retention (issue #27 item 4): the decision and quota tables gain about a
-- million rows a day at the seed's volume and nothing removed them. They
-- become range-partitioned by day (UTC), so that rows older than their
-- window plus DECISION_RETENTION leave by `DROP TABLE` of a whole
-- partition (no DELETE, no scan, no vacuum debt); the history, already
-- partitioned by month, leaves the same way after HISTORY_RETENTION.
--
-- claim_decisions is partitioned on decided_at (the claim's judged time).
-- Postgres can only enforce a unique key on a partitioned table if it holds
-- the partition key, so request_id is unique per partition: each day's
-- partition (and the default one) has a unique index on request_id, which
-- the claim processor's `INSERT ... ON CONFLICT DO NOTHING` arbitrates on.
-- The claim processor looks a batch's request ids up from REQUEST_ID_HORIZON
-- (default 1d) before its records' time, floored to the UTC day
-- (`store::claims::find_decisions`): a probe per day reached, not per day
-- kept (measured on 720,000 rows: 2,000 ids in 13 ms bounded, 111-144 ms
-- across all 49 partitions, 6 ms unpartitioned). So:
--   * a redelivered record is always recognised: its stored decision is
--     never older than the record's own time or its first judging;
--   * a client's retry (a new record under a used request id) is recognised
--     within REQUEST_ID_HORIZON of the first, and always within its UTC
--     day; later it is a new request, decided afresh by today's rules (the
--     quota slot and the one-hold-per-user index still refuse a second
--     coupon in one window). Decisions are kept DECISION_RETENTION (35d)
--     for disputes and the audit, longer than they deduplicate;
--   * the day's unique index never refuses a decision the lookup missed
--     (the lookup covers the whole day a new decision goes to);
--   * two processors deciding the same request at once (a rebalance) with
--     decision times on either side of a UTC midnight both store their
--     decision (the per-day index cannot see across days). The quota slot
--     (primary key of quota_grants) and the one-hold-per-user index still
--     refuse a second coupon; what can remain is a second stored answer.
--
-- quota_grants is partitioned on window_start; its primary key (user_id,
-- window_start) holds the partition key and stays a real constraint.
--
-- Each table keeps a DEFAULT partition, as the history does: rows of a day
-- without a partition (a rebuild of an older log before its partitions are
-- made, a clock far off) land there rather than fail. Retention never
-- drops the default partition.
--
-- retention_floors records, per table, the time before which retention
-- dropped rows: the audit compares the live database with the log only
-- from there (`coupon_analyst::audit`).

CREATE TABLE retention_floors (
    table_name text        PRIMARY KEY,
    kept_from  timestamptz NOT NULL
);

-- The existing tables move aside; their rows are copied below.
ALTER TABLE claim_decisions RENAME TO claim_decisions_unpartitioned;
ALTER INDEX claim_decisions_pkey RENAME TO claim_decisions_unpartitioned_pkey;
ALTER INDEX claim_decisions_user RENAME TO claim_decisions_unpartitioned_user;
ALTER TABLE quota_grants RENAME TO quota_grants_unpartitioned;
ALTER INDEX quota_grants_pkey RENAME TO quota_grants_unpartitioned_pkey;

CREATE TABLE claim_decisions (
    request_id        text        NOT NULL,
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
) PARTITION BY RANGE (decided_at);
CREATE INDEX claim_decisions_user ON claim_decisions (user_id, coupon_code);
CREATE TABLE claim_decisions_default PARTITION OF claim_decisions DEFAULT;
CREATE UNIQUE INDEX claim_decisions_default_request ON claim_decisions_default (request_id);

CREATE TABLE quota_grants (
    user_id      text        NOT NULL,
    window_start timestamptz NOT NULL,
    request_id   text        NOT NULL,
    granted_at   timestamptz NOT NULL,
    PRIMARY KEY (user_id, window_start)
) PARTITION BY RANGE (window_start);
CREATE TABLE quota_grants_default PARTITION OF quota_grants DEFAULT;

-- Creates the daily partitions of claim_decisions and quota_grants covering
-- the UTC days [from_day, from_day + days), each decision partition with
-- its unique index on request_id. A day whose rows already sit in a default
-- partition is skipped (they stay there rather than fail start-up), and so
-- is one whose lock is not had within 500 ms (making a partition locks its
-- parent: waiting behind a long reader would stall the claims queued
-- behind it; the next round makes it). Returns how many partitions it made.
CREATE FUNCTION ensure_decision_partitions(from_day date, days integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    d date;
    name text;
    parent text;
    made integer := 0;
    waited text := current_setting('lock_timeout');
BEGIN
    PERFORM set_config('lock_timeout', '500ms', true);
    FOR i IN 0 .. days - 1 LOOP
        d := from_day + i;
        FOREACH parent IN ARRAY ARRAY['claim_decisions', 'quota_grants'] LOOP
            name := format('%s_%s', parent, to_char(d, 'YYYY_MM_DD'));
            IF to_regclass(name) IS NULL THEN
                BEGIN
                    EXECUTE format(
                        'CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                        name, parent, d::timestamp AT TIME ZONE 'UTC',
                        (d + 1)::timestamp AT TIME ZONE 'UTC');
                    IF parent = 'claim_decisions' THEN
                        EXECUTE format('CREATE UNIQUE INDEX %I ON %I (request_id)',
                                       name || '_request', name);
                    END IF;
                    made := made + 1;
                EXCEPTION
                    WHEN check_violation THEN
                        RAISE NOTICE 'partition % skipped: the default partition holds its rows', name;
                    WHEN lock_not_available THEN
                        RAISE NOTICE 'partition % skipped: its table is busy; the next round makes it', name;
                END;
            END IF;
        END LOOP;
    END LOOP;
    PERFORM set_config('lock_timeout', waited, true);
    RETURN made;
END $$;

-- Drops the partitions of `parent` (never its default) whose upper bound is
-- at or before `cutoff`, records the newest such bound in
-- retention_floors, and returns the dropped partitions' names. A lock the
-- drop would queue for is waited on at most 500 ms (a drop locks the
-- parent; the claims queued behind it wait as long): a round that cannot
-- get it fails and the next round tries again.
CREATE FUNCTION drop_partitions_before(parent text, cutoff timestamptz) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    part record;
    upper_bound timestamptz;
    floor_at timestamptz;
BEGIN
    PERFORM set_config('lock_timeout', '500ms', true);
    FOR part IN
        SELECT c.relname::text AS name, pg_get_expr(c.relpartbound, c.oid) AS bound
          FROM pg_inherits h JOIN pg_class c ON c.oid = h.inhrelid
         WHERE h.inhparent = to_regclass(parent)
         ORDER BY 1
    LOOP
        CONTINUE WHEN part.bound = 'DEFAULT';
        upper_bound := substring(part.bound FROM $re$TO \('([^']*)'\)$re$)::timestamptz;
        CONTINUE WHEN upper_bound IS NULL OR upper_bound > cutoff;
        EXECUTE format('DROP TABLE IF EXISTS %I', part.name);
        floor_at := greatest(floor_at, upper_bound);
        RETURN NEXT part.name;
    END LOOP;
    IF floor_at IS NOT NULL THEN
        INSERT INTO retention_floors (table_name, kept_from) VALUES (parent, floor_at)
        ON CONFLICT (table_name)
        DO UPDATE SET kept_from = greatest(retention_floors.kept_from, EXCLUDED.kept_from);
    END IF;
END $$;

-- The days the existing rows fall in get partitions of their own (at most
-- the last 400 days: older rows go to the default partition), then the
-- rows move over and the old tables go.
DO $$
DECLARE
    today date := (now() AT TIME ZONE 'UTC')::date;
    first date;
BEGIN
    first := (least((SELECT min(decided_at) FROM claim_decisions_unpartitioned),
                    (SELECT min(window_start) FROM quota_grants_unpartitioned),
                    now() - interval '1 day') AT TIME ZONE 'UTC')::date;
    first := greatest(first, today - 400);
    PERFORM ensure_decision_partitions(first, today - first + 8);
END $$;

INSERT INTO claim_decisions (request_id, event_id, user_id, outcome, coupon_code, category,
                             expires_at, repeated, retry_at, blacklisted_until, reason, decided_at)
SELECT request_id, event_id, user_id, outcome, coupon_code, category,
       expires_at, repeated, retry_at, blacklisted_until, reason, decided_at
  FROM claim_decisions_unpartitioned;
INSERT INTO quota_grants (user_id, window_start, request_id, granted_at)
SELECT user_id, window_start, request_id, granted_at FROM quota_grants_unpartitioned;
DROP TABLE claim_decisions_unpartitioned;
DROP TABLE quota_grants_unpartitioned;
