"""The studio's web application (FastAPI; the page is plain HTML, JS and canvas).

Every request is checked before anything happens:

* **host**: bound to loopback, the ``Host`` header must name loopback too (a page on another
  site cannot reach the studio through DNS rebinding); with ``--allow-remote`` a ``--token``
  is required and every request carries it (``X-Studio-Token`` header or ``?token=``);
* **body**: at most :data:`MAX_BODY` bytes (413), JSON objects only (400 ``malformed JSON``),
  no unknown keys, typed values (400 naming the field);
* **ids**: an image id that looks like a path (``/``, ``\\``, ``..``, control characters) is a
  400, an id not in the queue a 404; points outside the image a 400. Refused requests write
  nothing.

Responses carry URIs and numbers only: storage credentials never reach the page.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
from importlib import resources
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from rootflow.studio.engines import Stroke
from rootflow.studio.queue import QueueFilter
from rootflow.studio.session import Studio, StudioError

log = logging.getLogger(__name__)

MAX_BODY = 256 * 1024
MAX_STROKE_POINTS = 4096
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})

SHORTCUTS: list[tuple[str, str]] = [
    ("left click", "add a root point"),
    ("right click", "add a background point"),
    ("drag", "pan"),
    ("wheel / + / -", "zoom"),
    ("C", "click tool"),
    ("B", "brush (paint root)"),
    ("E", "eraser (paint background)"),
    ("O", "overlay on/off"),
    ("[ / ]", "overlay opacity down/up"),
    ("Z / Ctrl+Z", "undo"),
    ("Y / Ctrl+Y", "redo"),
    ("A / Enter", "accept"),
    ("S", "skip"),
    ("F", "fit to window"),
]


def _static(name: str) -> str:
    return resources.files("rootflow.studio").joinpath("static", name).read_text("utf-8")


def _hostname(host: str) -> str:
    """``Host`` header without its port (``[::1]:8000`` -> ``[::1]``)."""
    if host.startswith("["):
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def check_image_id(image_id: str) -> str:
    """Refuse ids that look like paths (400); the queue lookup gives 404 for the rest."""
    if (not image_id or len(image_id) > 256 or "/" in image_id or "\\" in image_id
            or ".." in image_id or image_id.startswith(".")
            or any(ord(c) < 32 or ord(c) == 127 for c in image_id)):
        raise StudioError("image id must not look like a path (no '/', backslash, '..', leading "
                          "'.' or control characters)", 400)
    return image_id


async def read_json(request: Request, allowed: dict[str, type | tuple[type, ...]],
                    required: tuple[str, ...] = ()) -> dict[str, Any]:
    """The request's JSON object, size- and type-checked (StudioError otherwise)."""
    body = await request.body()
    if len(body) > MAX_BODY:
        raise StudioError(f"request body of {len(body)} bytes is over the {MAX_BODY} limit", 413)
    if not body.strip():
        data: Any = {}
    else:
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StudioError(f"malformed JSON: {e}", 400) from None
    if not isinstance(data, dict):
        raise StudioError("the body must be a JSON object", 400)
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise StudioError(f"unknown field(s) {unknown}; allowed: {sorted(allowed)}", 400)
    missing = [k for k in required if k not in data]
    if missing:
        raise StudioError(f"missing field(s) {missing}", 400)
    for k, v in data.items():
        t = allowed[k]
        ok = isinstance(v, t) and not (isinstance(v, bool) and t in (int, (int, float)))
        if isinstance(v, float) and not math.isfinite(v):
            ok = False
        if not ok:
            raise StudioError(f"field {k!r}: expected {getattr(t, '__name__', t)}, got "
                              f"{type(v).__name__}", 400)
    return data


def _int_point(p: Any, what: str) -> tuple[int, int]:
    if (not isinstance(p, list) or len(p) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in p)):
        raise StudioError(f"{what}: each point must be [x, y] integers", 400)
    return int(p[0]), int(p[1])


def _person(v: Any, default: str | None) -> str:
    person = default if v is None else v
    if not isinstance(person, str) or not person.strip():
        raise StudioError("a person (name) is required to accept: type it on the page", 400)
    person = person.strip()
    if len(person) > 80 or any(ord(c) < 32 or ord(c) == 127 for c in person):
        raise StudioError("person: at most 80 printable characters", 400)
    return person


def _opt_int(v: str | None, name: str) -> int | None:
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise StudioError(f"{name} must be an integer, got {v!r}", 400) from None


def _opt_date(v: str | None, name: str) -> str | None:
    import datetime as dt

    if v is None or v == "":
        return None
    try:
        return dt.date.fromisoformat(v).isoformat()
    except ValueError:
        raise StudioError(f"{name} must be a date YYYY-MM-DD, got {v!r}", 400) from None


def create_app(studio: Studio, *, token: str | None = None,
               allowed_hosts: frozenset[str] | None = LOOPBACK_HOSTS) -> FastAPI:
    """The web app over ``studio``; ``allowed_hosts=None`` accepts any Host (remote mode)."""
    app = FastAPI(title="rootflow studio", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.studio = studio

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        host = _hostname(request.headers.get("host") or "")
        if allowed_hosts is not None and host not in allowed_hosts:
            return JSONResponse({"error": f"host {host!r} refused: the studio answers on "
                                          "loopback only (start it with --allow-remote)"}, 400)
        if token is not None:
            given = request.headers.get("x-studio-token") or request.query_params.get("token")
            if not given or not hmac.compare_digest(given.encode(), token.encode()):
                return JSONResponse({"error": "missing or wrong token"}, 401)
        length = request.headers.get("content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return JSONResponse({"error": "bad Content-Length"}, 400)
            if n > MAX_BODY:
                return JSONResponse({"error": f"request body of {n} bytes is over the "
                                              f"{MAX_BODY} limit"}, 413)
        resp: Response = await call_next(request)
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Cache-Control"] = "no-store"
        resp.headers["Referrer-Policy"] = "no-referrer"
        resp.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; "
            "frame-ancestors 'none'")
        return resp

    @app.exception_handler(StudioError)
    async def studio_error(_: Request, exc: StudioError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        reason = str(exc.detail)
        if exc.status_code == 404:
            reason = (f"no such route {request.url.path!r} (image ids never contain '/'; "
                      "see the page for the API)")
        return JSONResponse({"error": reason}, exc.status_code)

    # -- pages -------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse(_static("index.html"))

    @app.get("/figures", response_class=HTMLResponse)
    def figures_page() -> HTMLResponse:
        return HTMLResponse(_static("figures.html"))

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in ("app.js", "figures.js", "studio.css"):
            raise StudioError(f"no static file {name!r}", 404)
        kind = "text/css" if name.endswith(".css") else "text/javascript"
        return Response(_static(name), media_type=f"{kind}; charset=utf-8")

    # -- API ---------------------------------------------------------------------------------
    @app.get("/api/config")
    def config() -> dict[str, Any]:
        return {"engines": sorted(studio.engines), "default_engine": studio.default_engine(),
                "person": studio.cfg.person, "shortcuts": SHORTCUTS,
                "versions": {k: e.version for k, e in studio.engines.items()}}

    @app.get("/api/queue")
    def queue(tube: str | None = None, depth: str | None = None, date_from: str | None = None,
              date_to: str | None = None, producer: str | None = None,
              order: str = "priority", include_done: str = "1") -> dict[str, Any]:
        if order not in ("priority", "name"):
            raise StudioError(f"order must be 'priority' or 'name', got {order!r}", 400)
        flt = QueueFilter(tube=_opt_int(tube, "tube"), depth=_opt_int(depth, "depth"),
                          date_from=_opt_date(date_from, "date_from"),
                          date_to=_opt_date(date_to, "date_to"), producer=producer or None,
                          include_done=include_done not in ("0", "false", "no"))
        items = studio.queue(flt, order)
        return {"n": len(items), "n_done": sum(e.done for e in items),
                "images": [e.to_json() for e in items]}

    def _state(s: Any) -> dict[str, Any]:
        e = s.entry
        props = [p.to_json() for p in e.proposals if p.mask_uri]
        forest = studio.engines.get("forest")
        if forest is not None and (forest.model is not None or forest.base is not None):
            props.append({"producer": "forest", "version": forest.version,
                          "key": "forest-studio", "confidence": None, "length_mm": None,
                          "has_mask": True, "studio": True})
        return {"image_id": e.image_id, "width": s.w, "height": s.h, "revision": s.revision,
                "proposal": s.proposal.to_json() if s.proposal else None, "proposals": props,
                "n_clicks": len(s.clicks), "n_strokes": len(s.strokes),
                "can_undo": bool(s.undo), "can_redo": bool(s.redo), "done": e.done,
                "root_fraction": float(s.current.mean()),
                "clicks": [c.to_json() for c in s.clicks]}

    @app.get("/api/images/{image_id}")
    async def open_image(image_id: str, proposal: str | None = None) -> dict[str, Any]:
        check_image_id(image_id)
        studio.entry(image_id)
        s = await run_in_threadpool(studio.open, image_id, proposal)
        return _state(s)

    @app.get("/api/images/{image_id}/image")
    async def image(image_id: str) -> Response:
        import cv2

        check_image_id(image_id)
        rgb = await run_in_threadpool(studio.rgb, studio.entry(image_id))
        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]),
                               [cv2.IMWRITE_JPEG_QUALITY, 92])
        return Response(bytes(buf), media_type="image/jpeg")

    @app.get("/api/images/{image_id}/mask")
    def mask(image_id: str) -> Response:
        import cv2

        check_image_id(image_id)
        s = studio.session(image_id)
        ok, buf = cv2.imencode(".png", s.current.astype(np.uint8) * 255,
                               [cv2.IMWRITE_PNG_COMPRESSION, 1])
        return Response(bytes(buf), media_type="image/png",
                        headers={"X-Revision": str(s.revision)})

    @app.post("/api/images/{image_id}/click")
    async def click(image_id: str, request: Request) -> dict[str, Any]:
        check_image_id(image_id)
        data = await read_json(request, {"x": int, "y": int, "label": int, "engine": str},
                               ("x", "y", "label"))
        if data["label"] not in (0, 1):
            raise StudioError("label must be 1 (root) or 0 (background)", 400)
        engine = data.get("engine")
        if engine is not None and engine not in studio.engines:
            raise StudioError(f"engine {engine!r} is not available; have "
                              f"{sorted(studio.engines)}", 400)
        studio.session(image_id)
        res = await run_in_threadpool(studio.click, image_id, data["x"], data["y"],
                                      data["label"], engine)
        return {**_state(studio.session(image_id)), "seconds": round(res.seconds, 4),
                "region": list(res.region), "tiles": res.tiles, "note": res.note}

    @app.post("/api/images/{image_id}/stroke")
    async def stroke(image_id: str, request: Request) -> dict[str, Any]:
        check_image_id(image_id)
        data = await read_json(request, {"mode": str, "radius": int, "points": list},
                               ("mode", "points"))
        if data["mode"] not in ("brush", "eraser"):
            raise StudioError("mode must be 'brush' or 'eraser'", 400)
        radius = data.get("radius", 4)
        if not 1 <= radius <= 100:
            raise StudioError("radius must be 1..100 px", 400)
        pts = data["points"]
        if not 1 <= len(pts) <= MAX_STROKE_POINTS:
            raise StudioError(f"a stroke has 1..{MAX_STROKE_POINTS} points", 400)
        st = Stroke(data["mode"], radius, tuple(_int_point(p, "points") for p in pts))
        studio.session(image_id)
        await run_in_threadpool(studio.stroke, image_id, st)
        return _state(studio.session(image_id))

    @app.post("/api/images/{image_id}/undo")
    async def undo(image_id: str, request: Request) -> dict[str, Any]:
        check_image_id(image_id)
        await read_json(request, {})
        ok = await run_in_threadpool(studio.undo, image_id, False)
        return {**_state(studio.session(image_id)), "changed": ok}

    @app.post("/api/images/{image_id}/redo")
    async def redo(image_id: str, request: Request) -> dict[str, Any]:
        check_image_id(image_id)
        await read_json(request, {})
        ok = await run_in_threadpool(studio.undo, image_id, True)
        return {**_state(studio.session(image_id)), "changed": ok}

    @app.post("/api/images/{image_id}/accept")
    async def accept(image_id: str, request: Request) -> dict[str, Any]:
        check_image_id(image_id)
        data = await read_json(request, {"person": str})
        person = _person(data.get("person"), studio.cfg.person)
        studio.session(image_id)
        return await run_in_threadpool(studio.accept, image_id, person)

    @app.post("/api/images/{image_id}/skip")
    async def skip(image_id: str, request: Request) -> dict[str, Any]:
        check_image_id(image_id)
        await read_json(request, {})
        return {"next": studio.skip(image_id)}

    @app.get("/api/figures")
    async def figures() -> dict[str, Any]:
        from rootflow.studio.annotations import figures as compute

        return await run_in_threadpool(compute, studio.lake)

    return app
