"""The error a daemon method raises to refuse a request: answered with its message and code."""

from __future__ import annotations

from ..errors import StockadeError


class RequestError(StockadeError):
    """A request the daemon refuses; ``code`` is the machine-readable kind."""

    def __init__(self, message: str, code: str = "invalid_params") -> None:
        super().__init__(message)
        self.code = code
