-- Keep in step with migrations/sqlite (same tables, columns and meaning).
-- Integers are BIGINT throughout so both backends decode to i64.
CREATE TABLE api_keys (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    key_prefix TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT,
    is_active BIGINT NOT NULL DEFAULT 1,
    daily_token_limit BIGINT,
    monthly_token_limit BIGINT,
    daily_request_limit BIGINT,
    monthly_request_limit BIGINT,
    allowed_models TEXT
);

CREATE TABLE settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE usage_buckets (
    key_id BIGINT NOT NULL,
    period TEXT NOT NULL,
    bucket TEXT NOT NULL,
    requests BIGINT NOT NULL DEFAULT 0,
    refunds BIGINT NOT NULL DEFAULT 0,
    prompt_tokens BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, period, bucket)
);

CREATE TABLE usage_events (
    id BIGSERIAL PRIMARY KEY,
    request_id TEXT NOT NULL UNIQUE,
    ts_ms BIGINT NOT NULL,
    day TEXT NOT NULL,
    key_id BIGINT NOT NULL,
    route TEXT NOT NULL,
    model TEXT NOT NULL,
    status BIGINT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    duration_ms BIGINT NOT NULL,
    refunded BIGINT NOT NULL DEFAULT 0,
    outcome TEXT NOT NULL
);
CREATE INDEX usage_events_key_ts ON usage_events (key_id, ts_ms);
CREATE INDEX usage_events_ts ON usage_events (ts_ms);
