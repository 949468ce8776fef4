"""The dashboard's door: the password (a salted scrypt hash in the store, never the
password), the session-signing key (rotated with the password), who is trusted without a
password (``direct_local``), which Host names it answers to (``known_host``), the session's
CSRF token, and the login rate limit."""
from __future__ import annotations

import secrets
import socket
import time
from collections import defaultdict, deque
from urllib.parse import urlsplit

from flask.sessions import SecureCookieSessionInterface
from itsdangerous import URLSafeTimedSerializer
from werkzeug.security import check_password_hash, generate_password_hash

from mash.config import is_loopback
from mash.models import Store

PASSWORD_KEY = "dashboard.password"
SECRET_KEY = "dashboard.secret"
MIN_PASSWORD = 8


class PasswordError(ValueError):
    pass


# Headers a reverse proxy adds: a request carrying one came through something that may
# forward anyone's, so it is never trusted without the password.
PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto",
                 "X-Real-IP")


def set_password(store: Store, password: str) -> None:
    """Store the password's hash and a new session-signing key, in one transaction: every
    session made before (with the old password, or with none) stops opening at once."""
    if len(password) < MIN_PASSWORD:
        raise PasswordError(f"a password needs at least {MIN_PASSWORD} characters")
    hashed = generate_password_hash(password, method="scrypt")
    with store.transaction():
        store.meta_set(PASSWORD_KEY, hashed)
        store.meta_set(SECRET_KEY, secrets.token_hex(32))


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


class StoreKeyedSessions(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions, signed with the key in the store as it is at each
    request: `mash dashboard set-password` (another process) rotates it, and the running
    dashboard refuses every older cookie from then on."""

    def __init__(self, store: Store):
        self.store = store

    def get_signing_serializer(self, app):
        return URLSafeTimedSerializer(session_secret(self.store), salt=self.salt,
                                      serializer=self.serializer,
                                      signer_kwargs={"key_derivation": self.key_derivation,
                                                     "digest_method": self.digest_method})


def host_name(host_header: str | None) -> str | None:
    """The name in a ``Host`` header (lower case, IPv6 without brackets, port dropped);
    None when it is missing or malformed."""
    if not host_header:
        return None
    try:
        parts = urlsplit("//" + host_header)
        parts.port                  # a bad port raises ValueError
    except ValueError:
        return None
    if parts.username or parts.path or parts.query or parts.fragment:
        return None
    return parts.hostname or None


def own_names(dashboard_host: str | None = None) -> set[str]:
    """What this machine is called, besides loopback and its addresses: the names a
    grower's browser or a reverse proxy on the farm's network put in ``Host``."""
    names = {"localhost"}
    host = socket.gethostname().lower()
    names |= {host, f"{host}.local", socket.getfqdn().lower()}
    if dashboard_host:
        names.add(dashboard_host.lower())
    return names


def known_host(name: str | None, names: set[str]) -> bool:
    """``Host`` names the dashboard answers to: its own names and any address literal. A
    name that is neither is a page elsewhere whose DNS now points here (DNS rebinding)."""
    if not name:
        return False
    if name in names or is_loopback(name):
        return True
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in name else socket.AF_INET, name)
        return True
    except OSError:
        return False


def direct_local(remote_addr: str | None, host_header: str | None, headers) -> bool:
    """Trusted without a password: a request from a loopback address, to a loopback name
    (``localhost``, ``127.0.0.1``, ``[::1]``, any port), with no proxy header. A reverse
    proxy or an ``ssh -L`` on this machine also connects from loopback; a proxy says so in
    its headers, and a tunnel needs an account here anyway."""
    return (is_loopback(remote_addr) and is_loopback(host_name(host_header))
            and not any(h in headers for h in PROXY_HEADERS))


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
