-- Keep in step with migrations/postgres (same tables, columns and meaning).
CREATE TABLE api_keys (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    key_prefix TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT,
    is_active INTEGER NOT NULL DEFAULT 1,
    daily_token_limit INTEGER,
    monthly_token_limit INTEGER,
    daily_request_limit INTEGER,
    monthly_request_limit INTEGER,
    allowed_models TEXT
);

CREATE TABLE settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE usage_buckets (
    key_id INTEGER NOT NULL,
    period TEXT NOT NULL,
    bucket TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    refunds INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, period, bucket)
);

CREATE TABLE usage_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL UNIQUE,
    ts_ms INTEGER NOT NULL,
    day TEXT NOT NULL,
    key_id INTEGER NOT NULL,
    route TEXT NOT NULL,
    model TEXT NOT NULL,
    status INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    refunded INTEGER NOT NULL DEFAULT 0,
    outcome TEXT NOT NULL
);
CREATE INDEX usage_events_key_ts ON usage_events (key_id, ts_ms);
CREATE INDEX usage_events_ts ON usage_events (ts_ms);
