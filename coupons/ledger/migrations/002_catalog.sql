-- Catalog: batches named by us and created at the platform on demand, campaigns with
-- windows, tasks with display names and operator status, and sync/drift bookkeeping.

-- Until now a batch's id was the platform's. From here on the id is ours (what
-- operators and campaigns name) and the platform's id is kept beside it.
ALTER TABLE batches ADD COLUMN platform_batch_id text;
UPDATE batches SET platform_batch_id = id;
ALTER TABLE batches
    ALTER COLUMN platform_batch_id SET NOT NULL,
    ADD CONSTRAINT batches_platform_batch_id_key UNIQUE (platform_batch_id),
    ADD COLUMN face_value_cents integer,
    ADD COLUMN min_spend_cents integer,
    ADD COLUMN per_user_limit integer,
    ADD COLUMN starts_at timestamptz,
    ADD COLUMN ends_at timestamptz,
    ADD COLUMN created_at timestamptz NOT NULL DEFAULT now(),
    -- Written by each sync: what we still owe from this batch and what waits to be sent.
    ADD COLUMN owed integer NOT NULL DEFAULT 0,
    ADD COLUMN backlog integer NOT NULL DEFAULT 0,
    ADD COLUMN drift text[] NOT NULL DEFAULT '{}';

ALTER TABLE campaigns
    ADD COLUMN name text,
    -- Display names of `required_tasks`, position by position.
    ADD COLUMN task_names text[],
    ADD COLUMN starts_at timestamptz,
    ADD COLUMN ends_at timestamptz,
    -- A fixed task deadline; when `task_deadline` (after claim) is set too, the earlier wins.
    ADD COLUMN deadline_at timestamptz,
    ADD COLUMN status text NOT NULL DEFAULT 'active',
    ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN ended_at timestamptz;
UPDATE campaigns SET task_names = required_tasks;
ALTER TABLE campaigns
    ALTER COLUMN task_names SET NOT NULL,
    ADD CONSTRAINT campaigns_status CHECK (status IN ('active', 'paused', 'ended')),
    ADD CONSTRAINT campaigns_window CHECK (ends_at IS NULL OR starts_at IS NULL OR ends_at > starts_at),
    ADD CONSTRAINT campaigns_task_names CHECK (cardinality(task_names) = cardinality(required_tasks));

CREATE INDEX claims_by_campaign_state ON claims (campaign_id, state);
