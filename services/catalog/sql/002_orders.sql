-- Orders (reservations), the per-user limit guard and idempotency keys.
--
-- Inventory invariant, per product, at every commit:
--   units_on_sale = stock + sum(quantity of orders in 'reserved' or 'paid')
-- `stock` is what can still be reserved; `units_on_sale` restarts whenever an
-- admin sets `stock` (it becomes stock + the units already held by orders).

ALTER TABLE products ADD COLUMN units_on_sale integer;
UPDATE products SET units_on_sale = stock;
ALTER TABLE products
    ALTER COLUMN units_on_sale SET NOT NULL,
    ADD CONSTRAINT units_on_sale_covers_stock CHECK (units_on_sale >= stock);

-- A new product row without units_on_sale (seeders, older code) starts the
-- invariant from its stock.
CREATE FUNCTION products_default_units_on_sale() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.units_on_sale IS NULL THEN
        NEW.units_on_sale := NEW.stock;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER products_default_units_on_sale BEFORE INSERT ON products
    FOR EACH ROW EXECUTE FUNCTION products_default_units_on_sale();

CREATE TABLE orders (
    id           uuid        PRIMARY KEY,
    user_id      text        NOT NULL,
    product_id   bigint      NOT NULL REFERENCES products (id),
    quantity     integer     NOT NULL CHECK (quantity BETWEEN 1 AND 10),
    amount_cents bigint      NOT NULL CHECK (amount_cents >= 0),
    currency     char(3)     NOT NULL,
    status       text        NOT NULL DEFAULT 'reserved'
                             CHECK (status IN ('reserved', 'paid', 'expired', 'cancelled')),
    created_at   timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,
    held_by      uuid,
    held_until   timestamptz,
    paid_by      uuid,
    closed_at    timestamptz,
    CONSTRAINT hold_complete CHECK ((held_by IS NULL) = (held_until IS NULL)),
    CONSTRAINT paid_has_payment CHECK ((status = 'paid') = (paid_by IS NOT NULL))
);
-- The sweeper's claim: reserved orders by expiry time.
CREATE INDEX orders_reserved_by_expiry ON orders (expires_at) WHERE status = 'reserved';
-- The invariant check and the gate rebuild: units held per product.
CREATE INDEX orders_active_by_product ON orders (product_id)
    WHERE status IN ('reserved', 'paid');
CREATE INDEX orders_by_user ON orders (user_id, created_at);

-- One row per (user, product): the units the user holds in reserved or paid
-- orders. The CHECK is the race-proof per-user limit: concurrent buys update
-- this row one at a time (row lock) and the one that would pass the cap fails.
-- `cap` is the flash-sale per-user limit in force at the last buy (NULL: none).
CREATE TABLE order_limits (
    user_id    text    NOT NULL,
    product_id bigint  NOT NULL REFERENCES products (id),
    units      integer NOT NULL CHECK (units >= 0),
    cap        integer,
    PRIMARY KEY (user_id, product_id),
    CONSTRAINT per_user_limit CHECK (cap IS NULL OR units <= cap)
);

-- Idempotency-Key records, scoped per user and operation. `order_id` is chosen
-- when the key is first seen, so a retry after a crash reuses the same
-- reservation id (the gate and the insert are no-ops the second time).
CREATE TABLE idempotency_keys (
    user_id         text        NOT NULL,
    scope           text        NOT NULL,
    key             text        NOT NULL,
    request_hash    bytea       NOT NULL,
    order_id        uuid        NOT NULL,
    response_status integer,
    response_body   bytea,
    locked_until    timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL,
    PRIMARY KEY (user_id, scope, key),
    CONSTRAINT response_complete CHECK ((response_status IS NULL) = (response_body IS NULL))
);
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);
