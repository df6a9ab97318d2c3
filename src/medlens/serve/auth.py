"""Who may call the server: API keys, and the viewer's session tokens.

A request is authorized by an API key (``X-API-Key`` header or ``Authorization: Bearer``) or, without a key,
by the viewer's session cookie set by ``POST /login``: a random token mapped on the server to the SHA-256 of
the key it was opened with (never the key itself), valid for 12 hours and only while that key is still
configured. Keys are compared in constant time. Keys are required whenever the server is bound to anything
but localhost (``settings.check_binding``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

from starlette.datastructures import Headers
from starlette.requests import cookie_parser

from medlens.errors import ConfigError

API_KEYS_ENV = "MEDLENS_API_KEYS"
SESSION_COOKIE = "medlens_session"
SESSION_TTL_S = 12 * 3600
MAX_SESSIONS = 10_000


def load_api_keys(key_file: str | Path | None = None) -> tuple[str, ...]:
    """Keys from ``$MEDLENS_API_KEYS`` (comma-separated) and/or a file (one key per line, ``#`` comments)."""
    keys = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    if key_file:
        p = Path(key_file)
        if not p.is_file():
            raise ConfigError("API key file not found", p)
        keys += [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()
                 if ln.strip() and not ln.strip().startswith("#")]
    short = [k for k in keys if len(k) < 16]
    if short:
        raise ConfigError(f"{len(short)} API key(s) shorter than 16 characters; use long random keys "
                          "(python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return tuple(dict.fromkeys(keys))


def _key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def session_token(headers: Headers) -> str | None:
    """The viewer's session token a request carries (its cookie), if any."""
    return cookie_parser(headers.get("cookie", "")).get(SESSION_COOKIE)


class Auth:
    """The configured API keys and the open viewer sessions of one app."""

    def __init__(self, api_keys: tuple[str, ...]) -> None:
        self.api_keys = tuple(api_keys)
        self.sessions: dict[str, tuple[str, float]] = {}  # random token -> (sha256 of the key, expiry on monotonic)

    @property
    def required(self) -> bool:
        return bool(self.api_keys)

    def valid(self, key: str | None) -> bool:
        return bool(key) and any(hmac.compare_digest(key.encode(), k.encode()) for k in self.api_keys)

    def new_session(self, key: str) -> str:
        """A new random session token for a valid ``key`` (expired and, past ``MAX_SESSIONS``, oldest dropped)."""
        now = time.monotonic()
        for t in [t for t, (_, exp) in self.sessions.items() if exp <= now]:
            del self.sessions[t]
        while len(self.sessions) >= MAX_SESSIONS:      # oldest first (dicts keep insertion order)
            del self.sessions[next(iter(self.sessions))]
        token = secrets.token_urlsafe(32)
        self.sessions[token] = (_key_id(key), now + SESSION_TTL_S)
        return token

    def session_valid(self, token: str | None) -> bool:
        entry = self.sessions.get(token or "")
        if entry is None:
            return False
        kid, exp = entry
        if exp <= time.monotonic() or not any(hmac.compare_digest(kid, _key_id(k)) for k in self.api_keys):
            self.sessions.pop(token or "", None)
            return False
        return True

    def end_session(self, token: str | None) -> None:
        self.sessions.pop(token or "", None)

    def authorized(self, headers: Headers) -> bool:
        """A valid API key in the headers, or (no key given) a valid session cookie."""
        key = headers.get("x-api-key")
        auth = headers.get("authorization", "")
        if not key and auth.lower().startswith("bearer "):
            key = auth[7:].strip()
        return self.valid(key) or (not key and self.session_valid(session_token(headers)))
