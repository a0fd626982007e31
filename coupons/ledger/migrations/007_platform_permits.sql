-- Permits for platform calls, shared by every worker process (coupons/ledger/permits.py).
-- Time is cut into short windows by the database's clock; each row counts the permits it
-- granted in each of the last `ring` windows (granted[1 + window_no % ring]). A kind's row
-- never grants more than its limit over any `ring` consecutive windows; the 'total' row
-- counts every kind's grants against the limit on all calls. With a ring one window longer
-- than a second, any second of calls meets at most `ring` windows: never over the limit.
-- `asked` counts the permits a kind asked for within its own limit, for calls waiting: a
-- kind that yields to it leaves room in the total for as many as it asked in this window
-- or the last, less what it got in this one (sends before lookups).
CREATE TABLE platform_permits (
    kind      text PRIMARY KEY,
    window_no bigint NOT NULL DEFAULT 0,
    granted   integer[] NOT NULL DEFAULT '{}',
    asked     integer[] NOT NULL DEFAULT '{}'
);

INSERT INTO platform_permits (kind) VALUES ('total'), ('send'), ('query');

-- `counts` (a ring last written in window `from_no`) as of window `to_no`: the windows in
-- between, which nothing was granted in, start from zero.
CREATE FUNCTION platform_permits_rolled(counts integer[], from_no bigint, to_no bigint, ring integer)
RETURNS integer[] LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    rolled integer[] := counts;
BEGIN
    IF coalesce(array_length(counts, 1), 0) <> ring OR to_no - from_no >= ring THEN
        RETURN array_fill(0, ARRAY[ring]);
    END IF;
    FOR i IN 1 .. greatest(to_no - from_no, 0)::integer LOOP
        rolled[((from_no + i) % ring)::integer + 1] := 0;
    END LOOP;
    RETURN rolled;
END $$;

CREATE FUNCTION platform_permits_sum(counts integer[]) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$ SELECT coalesce(sum(c), 0)::integer FROM unnest(counts) AS c $$;

-- Up to `want` permits of `kind` for the current window: within the kind's limit over the
-- ring and its share of one window (`window_cap`), within the total's, and, when the kind
-- yields to another, after the room that one's recent asks keep, except for the first
-- `first` (calls that complete what the other kind began: an issue's confirming lookups).
-- `ask` (at most `want`) is what callers wait for now, as opposed to what is taken ahead;
-- it is kept (`keep_asks`) for a kind others yield to. A lease that gets nothing and keeps
-- nothing only reads: a starved process asking each window costs no write. Otherwise it
-- takes the 'total' row's lock first and counts again: leases are serialized, and the
-- window is read after the lock, so windows only move forward from one lease to the next.
CREATE FUNCTION lease_platform_permits(
    p_kind text, p_want integer, p_ask integer, p_first integer, p_keep_asks boolean,
    p_limit integer, p_window_cap integer, p_total integer, p_total_cap integer,
    p_yields_to text, p_window_ms integer, p_ring integer
) RETURNS TABLE (granted integer, window_no bigint, ends_in_ms double precision)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    t platform_permits;
    k platform_permits;
    y platform_permits;
    now_ms double precision;
    w bigint;
    i integer;
    own integer;
    room integer;
    yielded integer;
    got integer;
BEGIN
    FOR attempt IN 1 .. 2 LOOP
        IF attempt = 1 THEN
            SELECT * INTO STRICT t FROM platform_permits WHERE kind = 'total';
            SELECT * INTO STRICT k FROM platform_permits WHERE kind = p_kind;
        ELSE
            SELECT * INTO STRICT t FROM platform_permits WHERE kind = 'total' FOR UPDATE;
            SELECT * INTO STRICT k FROM platform_permits WHERE kind = p_kind FOR UPDATE;
        END IF;
        now_ms := extract(epoch FROM clock_timestamp()) * 1000;
        w := floor(now_ms / p_window_ms)::bigint;
        i := (w % p_ring)::integer + 1;
        t.granted := platform_permits_rolled(t.granted, t.window_no, w, p_ring);
        k.granted := platform_permits_rolled(k.granted, k.window_no, w, p_ring);
        k.asked := platform_permits_rolled(k.asked, k.window_no, w, p_ring);
        own := least(p_limit - platform_permits_sum(k.granted), p_window_cap - k.granted[i]);
        room := least(p_total - platform_permits_sum(t.granted), p_total_cap - t.granted[i]);
        yielded := 0;
        IF p_yields_to IS NOT NULL THEN
            SELECT * INTO STRICT y FROM platform_permits WHERE kind = p_yields_to;
            y.granted := platform_permits_rolled(y.granted, y.window_no, w, p_ring);
            y.asked := platform_permits_rolled(y.asked, y.window_no, w, p_ring);
            yielded := greatest(
                0, greatest(y.asked[i], y.asked[((w - 1) % p_ring)::integer + 1]) - y.granted[i]
            );
        END IF;
        got := greatest(0, least(p_want, own, greatest(room - yielded, least(p_first, room))));
        IF attempt = 1 AND got = 0 AND NOT (p_keep_asks AND least(p_ask, own) > 0) THEN
            RETURN QUERY SELECT 0, w, (w + 1) * p_window_ms - now_ms;
            RETURN;
        END IF;
    END LOOP;
    k.granted[i] := k.granted[i] + got;
    t.granted[i] := t.granted[i] + got;
    IF p_keep_asks THEN
        k.asked[i] := k.asked[i] + greatest(0, least(p_ask, own));
    END IF;
    UPDATE platform_permits SET window_no = w, granted = t.granted WHERE kind = 'total';
    UPDATE platform_permits
    SET window_no = w, granted = k.granted, asked = k.asked
    WHERE kind = p_kind;
    RETURN QUERY SELECT got, w, (w + 1) * p_window_ms - now_ms;
END $$;
