-- Every accepted user-behaviour event, stored once per event_id.
-- received_at: when the stats service accepted it (the stream entry's time);
-- stored_at: when the writer committed it (received_at..stored_at is the ingest lag);
-- stream_id: the stream entry whose insert won, which says which entry counts the
-- event in the Redis aggregates (a duplicate posted again never counts twice).
CREATE TABLE stats_events (
    event_id    uuid        PRIMARY KEY,
    type        text        NOT NULL CHECK (type IN ('view', 'cart', 'purchase')),
    product_id  bigint      NOT NULL CHECK (product_id > 0),
    user_id     text        NOT NULL CHECK (length(user_id) BETWEEN 1 AND 128),
    ts          timestamptz NOT NULL,
    received_at timestamptz NOT NULL,
    stored_at   timestamptz NOT NULL DEFAULT now(),
    stream_id   text        NOT NULL
);

-- Per-product time ranges: the brute-force window counts and ad-hoc analysis.
CREATE INDEX stats_events_product_ts ON stats_events (product_id, ts);
