-- A claim is answered as soon as the ledger has it; its coupon's workflow is started after
-- the answer by the workers (the claims not yet `workflow_started` are their outbox). A
-- worker takes a few at a time until `start_leased_until`, so two workers never start the
-- same ones at once, and the claims of a worker that died are taken again when it passes.
ALTER TABLE claims ADD COLUMN start_leased_until timestamptz;
