-- Payments, their idempotency keys, provider events and the outbox to the catalog.

CREATE TABLE payments (
    id               uuid        PRIMARY KEY,
    order_id         uuid        NOT NULL,
    user_id          text        NOT NULL,
    amount_cents     bigint      NOT NULL CHECK (amount_cents > 0),
    currency         text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    -- created: not yet known to the provider's answer; pending: outcome unknown
    -- (timeout, lost reply); succeeded / failed: settled. Moves only forward.
    status           text        NOT NULL DEFAULT 'created'
                     CHECK (status IN ('created', 'pending', 'succeeded', 'failed')),
    provider         text        NOT NULL,
    charge_id        text,
    failure_reason   text,
    refund_required  boolean     NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    last_attempt_at  timestamptz,
    next_settle_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    settled_at       timestamptz
);

-- At most one payment in flight per order (the catalog's hold is the other guard).
CREATE UNIQUE INDEX payments_one_in_flight_per_order
    ON payments (order_id) WHERE status IN ('created', 'pending');
CREATE INDEX payments_order ON payments (order_id);
CREATE INDEX payments_unsettled ON payments (next_settle_at)
    WHERE status IN ('created', 'pending');

-- Idempotency-Key records, scoped per user (IETF draft / Stripe semantics).
CREATE TABLE payment_idempotency_keys (
    user_id          text        NOT NULL,
    key              text        NOT NULL,
    fingerprint      text        NOT NULL,
    payment_id       uuid,
    response_status  int,
    response_headers jsonb,
    response_body    bytea,
    locked_at        timestamptz,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    completed_at     timestamptz,
    PRIMARY KEY (user_id, key)
);
CREATE INDEX payment_idempotency_keys_created ON payment_idempotency_keys (created_at);

-- Provider events seen, by event id: a second delivery is a duplicate, never a second effect.
CREATE TABLE payment_psp_events (
    event_id     text        PRIMARY KEY,
    type         text        NOT NULL,
    payment_id   uuid,
    charge_id    text,
    created      bigint      NOT NULL,
    applied      boolean     NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Messages to the catalog, committed with the payment change that causes them.
CREATE TABLE payment_outbox (
    id              bigserial   PRIMARY KEY,
    payment_id      uuid        NOT NULL REFERENCES payments (id),
    order_id        uuid        NOT NULL,
    kind            text        NOT NULL CHECK (kind IN ('paid', 'release')),
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    attempts        int         NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    delivered_at    timestamptz,
    dead_at         timestamptz,
    last_error      text,
    UNIQUE (payment_id, kind)
);
CREATE INDEX payment_outbox_due ON payment_outbox (next_attempt_at)
    WHERE delivered_at IS NULL AND dead_at IS NULL;
