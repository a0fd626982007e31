-- The ledger: campaigns, claims, receipts and the append-only audit trail.

CREATE TABLE batches (
    id              text PRIMARY KEY,          -- the platform's batch id
    name            text NOT NULL,
    quantity        integer NOT NULL,
    valid_days      integer NOT NULL,
    status          text NOT NULL,
    remaining       integer NOT NULL,
    raw             jsonb NOT NULL,
    synced_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE campaigns (
    id              text PRIMARY KEY,
    batch_id        text NOT NULL REFERENCES batches (id),
    required_tasks  text[] NOT NULL DEFAULT '{}',
    task_deadline   interval,                  -- after claim; NULL: no deadline
    per_user_limit  integer NOT NULL CHECK (per_user_limit > 0),
    quota           integer NOT NULL CHECK (quota >= 0),
    claimed         integer NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- The quota is enforced by the row itself, whatever the code does.
    CONSTRAINT claimed_within_quota CHECK (claimed BETWEEN 0 AND quota)
);

CREATE TABLE claims (
    coupon_id       text PRIMARY KEY,
    campaign_id     text NOT NULL REFERENCES campaigns (id),
    user_id         text NOT NULL,
    seq             integer NOT NULL CHECK (seq > 0),  -- the user's n-th claim in the campaign
    state           text NOT NULL,
    workflow_id     text NOT NULL UNIQUE,
    workflow_started boolean NOT NULL DEFAULT false,
    claimed_at      timestamptz NOT NULL DEFAULT now(),
    task_deadline   timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (campaign_id, user_id, seq)
);
CREATE INDEX claims_unstarted ON claims (claimed_at) WHERE NOT workflow_started;
CREATE INDEX claims_by_user ON claims (user_id);

CREATE TABLE receipts (
    coupon_id          text PRIMARY KEY REFERENCES claims (coupon_id),
    platform_coupon_id text NOT NULL UNIQUE,
    idempotency_key    text NOT NULL UNIQUE,
    sent_at            timestamptz NOT NULL,
    valid_until        timestamptz NOT NULL,
    confirmed_at       timestamptz NOT NULL,
    raw                jsonb NOT NULL
);

CREATE TABLE coupon_events (
    id          bigserial PRIMARY KEY,
    coupon_id   text NOT NULL REFERENCES claims (coupon_id),
    from_state  text,
    to_state    text NOT NULL,
    cause       text NOT NULL,
    at          timestamptz NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    -- The lifecycle never enters a state twice, so a retried write is a no-op.
    UNIQUE (coupon_id, to_state)
);

CREATE FUNCTION coupon_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'coupon_events is append-only';
END $$;

CREATE TRIGGER coupon_events_append_only
    BEFORE UPDATE OR DELETE ON coupon_events
    FOR EACH ROW EXECUTE FUNCTION coupon_events_append_only();
