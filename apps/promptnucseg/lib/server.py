"""Error answers for what MONAI Label itself lets through as a bare "500 Internal Server Error".

MONAI Label's FastAPI server has no exception handlers of its own: ``json.loads`` of a malformed ``params`` form
field, a ``MONAILabelException`` (e.g. an unknown model) or a missing ``image`` all reach the client as a 500
without a message. The app registers handlers on the running server (``monailabel.app:app``) so these become
4xx answers ``{"detail": "<what is wrong>"}``; the server keeps serving either way.
"""

from __future__ import annotations

import json
import logging
import sys

from fastapi import Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from monailabel.interfaces.exception import MONAILabelError, MONAILabelException

logger = logging.getLogger(__name__)

_CLIENT_ERRORS = {MONAILabelError.INVALID_INPUT}
_NO_INPUT = "Neither Image nor File not Session ID input is provided"  # MONAI Label's own 500 message


async def _bad_json(request: Request, exc: json.JSONDecodeError) -> JSONResponse:
    return JSONResponse(status_code=400, content={"detail": f"request parameters are not valid JSON: {exc}"})


async def _bad_fields(request: Request, exc: ValidationError) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": f"invalid request parameters: {exc}"})


async def _monailabel_error(request: Request, exc: MONAILabelException) -> JSONResponse:
    status = 400 if exc.error in _CLIENT_ERRORS else 500
    return JSONResponse(status_code=status, content={"detail": exc.msg, "error": exc.error.value})


async def _http_error(request: Request, exc: StarletteHTTPException):
    if exc.status_code == 500 and exc.detail == _NO_INPUT:
        exc = StarletteHTTPException(status_code=400, detail="no image: pass ?image=<image id> (or upload a file)")
    return await http_exception_handler(request, exc)


def install_error_handlers() -> bool:
    """Register the handlers on MONAI Label's FastAPI app if it is running in this process (not in the training
    subprocess or a script); True when installed."""
    module = sys.modules.get("monailabel.app")
    server = getattr(module, "app", None)
    if server is None:
        return False
    server.add_exception_handler(json.JSONDecodeError, _bad_json)
    server.add_exception_handler(ValidationError, _bad_fields)
    server.add_exception_handler(MONAILabelException, _monailabel_error)
    server.add_exception_handler(StarletteHTTPException, _http_error)
    # The middleware stack (which holds the handlers) is built on the server's first event, before the app is
    # created; drop it so the next request builds it again with these handlers.
    server.middleware_stack = None
    logger.info("PromptNucSeg error handlers installed")
    return True
