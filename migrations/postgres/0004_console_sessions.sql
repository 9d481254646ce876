-- Sessions of the web console: a browser signs in with an API key and then carries a random
-- session token in a cookie. Only the token's sha256 is stored; a session acts as its key, ends
-- at expires_at (Unix milliseconds) or when it signs out, and dies with its key's revocation.
CREATE TABLE console_sessions (
    token_hash  TEXT PRIMARY KEY,
    key_id      TEXT NOT NULL REFERENCES api_keys (id),
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL
);
CREATE INDEX console_sessions_key ON console_sessions (key_id);
