"""The backend client's error classes, importable without loading the HTTP stack (the reader
and the Huey module use them; importing ``requests`` costs ~5 MB of RSS)."""


class BackendError(Exception):
    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class RetryableError(BackendError):
    """Try again later; ``retry_after`` (s) is the server's own word when it gave one."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message, status)
        self.retry_after = retry_after


class PermanentError(BackendError):
    """The request is wrong; sending it again unchanged will fail again."""


class AuthError(PermanentError):
    """The device's credentials were refused."""


class NotConfigured(PermanentError):
    pass
