-- Tenants (each app), their API keys, tenant-owned batches and campaigns, the answers
-- kept for idempotent requests, and the platform's notifications already taken.

CREATE TABLE tenants (
    id          text PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);
-- What existed before tenants, and what the operator's command line manages.
INSERT INTO tenants (id, name) VALUES ('default', 'default');

CREATE TABLE api_keys (
    id             text PRIMARY KEY,          -- the key's public part, shown in lists
    tenant_id      text NOT NULL REFERENCES tenants (id),
    scope          text NOT NULL CHECK (scope IN ('app', 'admin')),
    -- The secret is random and long: a fast hash is enough, and the secret is never stored.
    secret_sha256  bytea NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    revoked_at     timestamptz
);
CREATE INDEX api_keys_by_tenant ON api_keys (tenant_id);

ALTER TABLE batches ADD COLUMN tenant_id text NOT NULL DEFAULT 'default' REFERENCES tenants (id);
ALTER TABLE campaigns ADD COLUMN tenant_id text NOT NULL DEFAULT 'default' REFERENCES tenants (id);
CREATE INDEX batches_by_tenant ON batches (tenant_id);
CREATE INDEX campaigns_by_tenant ON campaigns (tenant_id);

CREATE TABLE idempotency_keys (
    tenant_id    text NOT NULL REFERENCES tenants (id),
    key          text NOT NULL,
    fingerprint  text NOT NULL,               -- method, path and a digest of the body
    status       integer,                     -- NULL while the first request is in flight
    response     jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, key)
);

CREATE TABLE callback_notifications (
    id                  text PRIMARY KEY,     -- the platform's notification id
    platform_coupon_id  text NOT NULL,
    received_at         timestamptz NOT NULL DEFAULT now(),
    applied_at          timestamptz
);
