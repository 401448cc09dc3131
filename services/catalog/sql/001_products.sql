CREATE TABLE products (
    id                   bigint      PRIMARY KEY CHECK (id > 0),
    sku                  text        NOT NULL UNIQUE,
    name                 text        NOT NULL,
    description          text        NOT NULL DEFAULT '',
    price_cents          bigint      NOT NULL CHECK (price_cents >= 0),
    currency             char(3)     NOT NULL,
    stock                integer     NOT NULL CHECK (stock >= 0),
    flash_price_cents    bigint      CHECK (flash_price_cents >= 0),
    flash_starts_at      timestamptz,
    flash_ends_at        timestamptz,
    flash_per_user_limit integer     CHECK (flash_per_user_limit > 0),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT flash_sale_complete CHECK (
        (flash_price_cents IS NULL AND flash_starts_at IS NULL AND flash_ends_at IS NULL
            AND flash_per_user_limit IS NULL)
        OR (flash_price_cents IS NOT NULL AND flash_starts_at IS NOT NULL
            AND flash_ends_at IS NOT NULL AND flash_per_user_limit IS NOT NULL
            AND flash_ends_at > flash_starts_at)
    )
);
