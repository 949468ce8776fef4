"""The dashboard's door: the password (a salted scrypt hash in the store, never the
password), the session's CSRF token, and the login rate limit."""
from __future__ import annotations

import secrets
import time
from collections import defaultdict, deque

from werkzeug.security import check_password_hash, generate_password_hash

from mash.models import Store

PASSWORD_KEY = "dashboard.password"
SECRET_KEY = "dashboard.secret"
MIN_PASSWORD = 8


class PasswordError(ValueError):
    pass


def set_password(store: Store, password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise PasswordError(f"a password needs at least {MIN_PASSWORD} characters")
    store.meta_set(PASSWORD_KEY, generate_password_hash(password, method="scrypt"))


def has_password(store: Store) -> bool:
    return bool(store.meta_get(PASSWORD_KEY))


def check_password(store: Store, password: str) -> bool:
    stored = store.meta_get(PASSWORD_KEY)
    return bool(stored) and check_password_hash(stored, password)


def session_secret(store: Store) -> str:
    """The key that signs session cookies: made once, kept in the store, so a restart does
    not log everyone out."""
    secret = store.meta_get(SECRET_KEY)
    if not secret:
        secret = secrets.token_hex(32)
        store.meta_set(SECRET_KEY, secret)
    return secret


def new_csrf_token() -> str:
    return secrets.token_urlsafe(24)


class LoginLimiter:
    """Ten wrong passwords from one address in a minute: the next tries are refused until
    the oldest of them is a minute old (and each refused try waits a second)."""
    LIMIT, WINDOW, DELAY = 10, 60.0, 1.0

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.failures: dict[str, deque] = defaultdict(deque)

    def wait_for(self, client: str) -> float:
        """Seconds until ``client`` may try again (0: now)."""
        now, q = self.clock(), self.failures[client]
        while q and now - q[0] > self.WINDOW:
            q.popleft()
        return self.WINDOW - (now - q[0]) if len(q) >= self.LIMIT else 0.0

    def failed(self, client: str) -> None:
        self.failures[client].append(self.clock())

    def succeeded(self, client: str) -> None:
        self.failures.pop(client, None)
