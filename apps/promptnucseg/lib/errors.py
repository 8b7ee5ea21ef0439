"""Errors that reach the client as an HTTP status with a message (FastAPI answers ``{"detail": message}``)."""

from __future__ import annotations

from fastapi import HTTPException


class RequestError(HTTPException):
    """A request the app refuses: ``status_code`` (4xx: the client's fault, 503: no model) and ``detail``.

    It is a FastAPI ``HTTPException``, so raised anywhere inside an infer task it becomes the response.
    """

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(status_code=status_code, detail=message)

    def __str__(self) -> str:
        return f"{self.status_code}: {self.detail}"
