"""What the app changes in MONAI Label's running FastAPI server (``monailabel.app:app``): error answers and guards.

**Error answers.** MONAI Label's server has no exception handlers of its own: ``json.loads`` of a malformed
``params`` form field, a ``MONAILabelException`` (e.g. an unknown model) or a missing ``image`` all reach the client
as a 500 without a message. The app registers handlers so these become 4xx answers ``{"detail": "<what is
wrong>"}``; the server keeps serving either way.

**Guards** around MONAI Label's route functions (module attributes the routes call by name):

- ``run_inference`` (``POST /infer/{model}``) and ``run_wsi_inference`` (``/infer/wsi/{model}``, ``/infer/wsi_v2/
  {model}``) run inside a :class:`RequestScope` naming the files this request may segment besides datastore images
  (its own uploads, its session's image): :func:`trusted_paths`, which ``PromptNucSegApp.infer`` checks;
  ``params`` must be a JSON object and ``session_id`` a session of the server;
- ``add_image`` / ``save_label`` (``PUT /datastore/image`` / ``/datastore/label``): the image id and label tag must
  be plain names (MONAI Label joins them to the studies folder: ``../..`` would write outside it);
- all of them remove the request's temporary uploads when they fail (MONAI Label removes them in a background task
  that runs only after a successful answer).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import sys
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable

from fastapi import BackgroundTasks, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lib.errors import RequestError, is_plain_name, not_in_datastore, shown
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.utils.others.generic import remove_file

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


# ------------------------------------------------------------------------------------------------ request guards
@dataclass(frozen=True)
class RequestScope:
    """The route call handling the current HTTP request: its background tasks (MONAI Label schedules the removal of
    each temporary upload there) and its session's image."""

    background_tasks: BackgroundTasks | None = None
    session_image: str | None = None

    def uploads(self) -> set[str]:
        """The temporary files the route saved from this request's uploads."""
        tasks = self.background_tasks.tasks if self.background_tasks is not None else []
        return {task.args[0] for task in tasks if task.func is remove_file and task.args}


_SCOPE: ContextVar[RequestScope | None] = ContextVar("promptnucseg_request_scope", default=None)


def trusted_paths() -> set[str]:
    """Files the current HTTP request may segment besides datastore images: its own uploads and its session's
    image; empty outside a guarded route (a batch task, a script)."""
    scope = _SCOPE.get()
    if scope is None:
        return set()
    return scope.uploads() | ({scope.session_image} if scope.session_image else set())


def remove_uploads(background_tasks: BackgroundTasks | None) -> None:
    """Run now the removals of temporary files the route scheduled (they would run only after a 2xx answer)."""
    for path in RequestScope(background_tasks).uploads():
        try:
            remove_file(path)
        except OSError as error:
            logger.warning("cannot remove the temporary upload %s: %s", path, error)


_JSON_TYPES = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}


def _json_object(text: Any, name: str) -> None:
    """``text`` (a form field) must be empty or a JSON object."""
    if not isinstance(text, str) or not text:
        return
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise RequestError(f"'{name}' is not valid JSON: {str(error)[:200]}") from error
    if not isinstance(value, dict):
        kind = _JSON_TYPES.get(type(value), "a number")
        raise RequestError(f"'{name}' must be a JSON object {{...}}, got {kind}: {json.dumps(value)[:100]}")


def _session_image(session_id: Any) -> str | None:
    """The image of session ``session_id`` (None without one); 400 when sessions are off, 404 when unknown."""
    if not session_id:
        return None
    from monailabel.interfaces.utils.app import app_instance

    sessions = app_instance().sessions()
    if sessions is None:
        raise RequestError("'session_id' given, but sessions are disabled on this server (MONAI_LABEL_SESSIONS)")
    session = sessions.get_session(session_id)
    if session is None:
        raise RequestError(f"session {shown(session_id)} is not a session of this server", status_code=404)
    return session.image


def _check_output(output: Any) -> None:
    if output == "dicom_seg":  # MONAI Label answers 500 for it after running the model
        raise RequestError("'output' dicom_seg needs a DICOMweb datastore; this server has a folder of images")


def _check_infer(arguments: dict[str, Any]) -> str | None:
    _json_object(arguments.get("params"), "params")
    _check_output(arguments.get("output"))
    return _session_image(arguments.get("session_id"))


def _check_wsi_infer(arguments: dict[str, Any]) -> str | None:
    return _session_image(arguments.get("session_id"))


def _check_add_image(arguments: dict[str, Any]) -> None:
    image = arguments.get("image")
    if image and not is_plain_name(image):
        raise RequestError(f"'image' must be a plain name (no folders), got {shown(image)}")
    filename = getattr(arguments.get("file"), "filename", None)
    if not image and filename is not None and not is_plain_name(filename):
        raise RequestError(f"the uploaded file's name must be a plain name (no folders), got {shown(filename)}")
    _json_object(arguments.get("params"), "params")


def _check_save_label(arguments: dict[str, Any]) -> None:
    from monailabel.interfaces.utils.app import app_instance

    image, tag = arguments.get("image"), arguments.get("tag")
    if not isinstance(image, str) or not image or not app_instance().datastore().get_image_uri(image):
        raise not_in_datastore(image)
    if tag and not is_plain_name(tag):
        raise RequestError(f"'tag' must be a plain name (no folders), got {shown(tag)}")
    _json_object(arguments.get("params"), "params")


def _guard(original: Callable, check: Callable[[dict[str, Any]], str | None]) -> Callable:
    """``original`` (a MONAI Label route function) after ``check`` of its arguments (which returns the session's
    image, if any), inside a :class:`RequestScope`; when it fails, its temporary uploads are removed at once."""
    if getattr(original, "__promptnucseg_guard__", False):
        return original
    signature = inspect.signature(original)

    @functools.wraps(original)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        arguments = signature.bind(*args, **kwargs).arguments
        tasks = arguments.get("background_tasks")
        session_image = check(arguments)
        token = _SCOPE.set(RequestScope(tasks, session_image))
        try:
            return original(*args, **kwargs)
        except BaseException:
            remove_uploads(tasks)
            raise
        finally:
            _SCOPE.reset(token)

    guarded.__promptnucseg_guard__ = True
    return guarded


_GUARDS: dict[str, dict[str, Callable[[dict[str, Any]], Any]]] = {
    "monailabel.endpoints.infer": {"run_inference": _check_infer},
    "monailabel.endpoints.wsi_infer": {"run_wsi_inference": _check_wsi_infer},
    "monailabel.endpoints.datastore": {"add_image": _check_add_image, "save_label": _check_save_label},
}


def install_request_guards() -> list[str]:
    """Wrap MONAI Label's route functions (see the module docstring) where its server runs in this process; the
    names wrapped. The routes call these functions by their module-level name, so the wrappers take effect."""
    wrapped = []
    for module_name, checks in _GUARDS.items():
        module = sys.modules.get(module_name)
        for name, check in checks.items():
            original = getattr(module, name, None)
            if original is None:
                continue
            setattr(module, name, _guard(original, check))
            wrapped.append(f"{module_name}.{name}")
    if wrapped:
        logger.info("PromptNucSeg request guards installed on %s", ", ".join(wrapped))
    return wrapped
