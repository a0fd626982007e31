-- A campaign's quota is held by counter rows ("slots") instead of one column. A grant
-- locks one slot for the rest of its statement and its commit: with one row, the grants
-- of a campaign committed one after another (each waiting for the last one's WAL flush);
-- with several, that many commit at once and share their flushes. Each slot holds its own
-- share of the quota and never passes it, so together they never pass the quota.
CREATE TABLE campaign_slots (
    campaign_id text NOT NULL REFERENCES campaigns (id),
    slot        smallint NOT NULL,
    quota       integer NOT NULL,
    claimed     integer NOT NULL DEFAULT 0,
    PRIMARY KEY (campaign_id, slot),
    -- The quota is enforced by the rows themselves, whatever the code does.
    CONSTRAINT slot_claimed_within_quota CHECK (claimed BETWEEN 0 AND quota)
);

-- Gives a campaign's 16 slots `total` between them: each keeps what it has claimed and
-- what is left is shared evenly. The slots are locked first, so no claim moves the count
-- under the split (claims of the campaign wait for the caller's transaction).
CREATE FUNCTION spread_quota(campaign text, total integer) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO campaign_slots (campaign_id, slot, quota)
    SELECT campaign, g, 0 FROM generate_series(0, 15) AS g
    ON CONFLICT DO NOTHING;
    WITH s AS (
        SELECT slot, claimed FROM campaign_slots
        WHERE campaign_id = campaign ORDER BY slot FOR UPDATE
    ), t AS (
        SELECT total - sum(claimed) AS free, count(*) AS n FROM s
    )
    UPDATE campaign_slots c
    SET quota = s.claimed + t.free / t.n + CASE WHEN s.slot < t.free % t.n THEN 1 ELSE 0 END
    FROM s, t
    WHERE c.campaign_id = campaign AND c.slot = s.slot;
$$;

INSERT INTO campaign_slots (campaign_id, slot, quota, claimed)
SELECT id, 0, claimed, claimed FROM campaigns;
SELECT spread_quota(id, quota) FROM campaigns;

ALTER TABLE campaigns DROP CONSTRAINT claimed_within_quota;
ALTER TABLE campaigns DROP COLUMN claimed;
