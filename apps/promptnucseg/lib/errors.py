"""Errors that reach the client as an HTTP status with a message (FastAPI answers ``{"detail": message}``)."""

from __future__ import annotations

import os

from fastapi import HTTPException


class RequestError(HTTPException):
    """A request the app refuses: ``status_code`` (4xx: the client's fault, 503: no model) and ``detail``.

    It is a FastAPI ``HTTPException``, so raised anywhere inside an infer task it becomes the response.
    """

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(status_code=status_code, detail=message)

    def __str__(self) -> str:
        return f"{self.status_code}: {self.detail}"


def shown(value: object, limit: int = 120) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages echoing what a client sent."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def not_in_datastore(image: object) -> RequestError:
    """The one answer (404) for an image the server does not serve, whether it is missing or not allowed (a path):
    a client cannot tell which files exist on the host."""
    return RequestError(f"image {shown(image)} is not an image of this server's datastore", status_code=404)


def is_plain_name(name: object) -> bool:
    """A file name without folders (image ids, label tags): no separator, not ``.``/``..``, no NUL."""
    return (isinstance(name, str) and name.strip(".") != "" and os.path.basename(name) == name
            and not any(c in name for c in "/\\\0"))
