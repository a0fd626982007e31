-- Intent first, then the platform: every change the catalog asks of the platform (create,
-- start, pause, resume, stop) is written here before the call and completed after the
-- answer, so a crash, a ledger failure or a lost answer in between leaves a pending intent
-- that the next sync (or the same command again) finishes, never a batch at the platform
-- that the ledger has not heard of.

-- A batch whose create is pending is a row already: its id is taken (two creates of one
-- id meet on the primary key), `batch list`/`show` show it, and it has no platform id yet.
ALTER TABLE batches ALTER COLUMN platform_batch_id DROP NOT NULL;
ALTER TABLE batches ADD CONSTRAINT batches_pending_has_no_platform_id
    CHECK ((status = 'pending') = (platform_batch_id IS NULL));

CREATE TABLE batch_intents (
    id           bigserial PRIMARY KEY,
    -- No foreign key: a refused create removes its pending batch row, its intent stays.
    batch_id     text NOT NULL,
    seq          integer NOT NULL CHECK (seq > 0),       -- the batch's n-th intent
    operation    text NOT NULL CHECK (operation IN ('create', 'start', 'pause', 'resume', 'stop')),
    -- The key the platform sees (create: batch_request_key), or ours for a change.
    request_key  text NOT NULL,
    -- The whole request, re-sent as it is: a platform that takes the whole request as the
    -- key's content (WeChat Pay) finds the first answer only for the same request.
    request      jsonb NOT NULL,
    state        text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done', 'refused')),
    attempts     integer NOT NULL DEFAULT 0,         -- answers and failures recorded
    last_error   text,
    answer       jsonb,                              -- the platform's batch, once done
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    UNIQUE (batch_id, seq)
);
-- A key names one request; one the platform refused names none, so it may be asked again.
CREATE UNIQUE INDEX batch_intents_key ON batch_intents (request_key) WHERE state <> 'refused';
CREATE INDEX batch_intents_pending ON batch_intents (batch_id, seq) WHERE state = 'pending';
