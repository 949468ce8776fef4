"""Sink failures, classified in one place (CONTRACT.md section 2) for the three clients and
the sweeps that use them. Importable without loading the HTTP stack (the reader and the Huey
module use it; importing ``requests`` costs ~5 MB of RSS).

Every failure has a ``kind`` that says what the sweep does with what it was sending:

- ``offline``: network error, timeout, 5xx, an answer we cannot read. Retry with backoff.
- ``rate_limited``: 429. Nothing goes to the backend until ``retry_after`` has passed.
- ``auth``: 401/403, or a broker refusing our user name or password. We cannot talk now;
  this is never the data's fault. Retry with backoff, and everything stays owed.
- ``too_large``: 413. Send less: halve the batch. Only a single item refused as too large
  is the data.
- ``bad_request``: 400/422. The data is wrong: bisect a batch until the refused items are
  isolated, and record why for those alone.
- ``not_found``: 404. The backend does not know the device (register again, once per run)
  or the command (record it, do not retry).
- ``conflict``: 409 (a registration: the device is already ours).
- ``refused``: any other 4xx. The request is wrong: record why, do not retry blindly.
- ``off``: the sink is not configured. What it is owed waits until it is.
- ``unregistered``: the backend does not know this device and we may not create it (the
  deployed MASH backend: an operator creates the device row first). Everything stays owed;
  registration is tried again slowly.

The classes keep the names the rest of the code and the guide's examples use:
``RetryableError`` (retry later: offline, rate_limited, auth), ``PermanentError`` (the
request is wrong: the rest), ``AuthError`` (a ``RetryableError`` now, no longer a
``PermanentError``), ``NotConfigured``, ``BackendError`` (all of them).
"""
from __future__ import annotations

OFFLINE = "offline"
RATE_LIMITED = "rate_limited"
AUTH = "auth"
TOO_LARGE = "too_large"
BAD_REQUEST = "bad_request"
NOT_FOUND = "not_found"
CONFLICT = "conflict"
REFUSED = "refused"
OFF = "off"
UNREGISTERED = "unregistered"

# The kinds after which what was sent stays owed as it is: the sink, not the data, failed.
KEEP_OWED = (OFFLINE, RATE_LIMITED, AUTH, OFF, UNREGISTERED)


def kind_for_status(status: int | None) -> str:
    """The kind of an HTTP answer's status (None: no answer at all)."""
    if status is None or status >= 500:
        return OFFLINE
    if status in (401, 403):
        return AUTH
    if status == 429:
        return RATE_LIMITED
    if status == 413:
        return TOO_LARGE
    if status in (400, 422):
        return BAD_REQUEST
    if status == 404:
        return NOT_FOUND
    if status == 409:
        return CONFLICT
    return REFUSED if status >= 400 else OFFLINE


# MQTT CONNACK codes that mean "our credentials": 3.1.1's 4 (bad user name or password) and
# 5 (not authorized); 5.0's 0x86, 0x87 and 0x8C (bad authentication method).
_MQTT_AUTH_CODES = (4, 5, 0x86, 0x87, 0x8C)


def kind_for_connack(code: int) -> str:
    """The kind of a broker's refusal of our connection."""
    return AUTH if code in _MQTT_AUTH_CODES else OFFLINE


class SinkError(Exception):
    """A sink failed; ``kind`` (above) says what to do with what was being sent."""
    kind = OFFLINE

    # (method, path) of the request that failed, and whether it may have reached the server
    # (no answer to a request that left: a read timeout, a dropped connection); set by the
    # backend client, for a sink that does not dedupe (the deployed MASH backend)
    request: tuple[str, str] | None = None
    maybe_delivered = False

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after

    @property
    def keeps_owed(self) -> bool:
        """True when what was sent must stay owed unchanged (the sink failed, not the data)."""
        return self.kind in KEEP_OWED


class BackendError(SinkError):
    pass


class RetryableError(BackendError):
    """Try again later; ``retry_after`` (s) is when: the server's own word (429) or the
    client's login backoff (401), else the task's retry backoff decides."""


class RateLimited(RetryableError):
    kind = RATE_LIMITED


class AuthError(RetryableError):
    """The backend refused the device's credentials or session (401/403): cannot talk now."""
    kind = AUTH


class DeviceUnknown(RetryableError):
    """The backend has no device with our serial (or answered with another one's) and we
    cannot create it: a person must (``retry_after``: when to ask again)."""
    kind = UNREGISTERED


class PermanentError(BackendError):
    """The request is wrong; sending it again unchanged will fail again."""
    kind = REFUSED


class TooLarge(PermanentError):
    kind = TOO_LARGE


class BadRequest(PermanentError):
    kind = BAD_REQUEST


class NotFound(PermanentError):
    kind = NOT_FOUND


class Conflict(PermanentError):
    kind = CONFLICT


class NotAllowed(PermanentError):
    """The account may not do this (a 403 to something only some roles may do, such as
    creating a sensor): not our credentials failing, a person must grant it or do it."""


class NotConfigured(BackendError):
    """The sink's settings are absent: it is off, and what it is owed waits."""
    kind = OFF


_BY_KIND = {OFFLINE: RetryableError, RATE_LIMITED: RateLimited, AUTH: AuthError,
            TOO_LARGE: TooLarge, BAD_REQUEST: BadRequest, NOT_FOUND: NotFound,
            CONFLICT: Conflict, REFUSED: PermanentError}


def backend_error(status: int | None, message: str, retry_after: float | None = None) -> BackendError:
    """The error for an HTTP answer with ``status`` (None: no answer)."""
    return _BY_KIND[kind_for_status(status)](message, status, retry_after)
