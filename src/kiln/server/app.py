"""The HTTP app: KServe v2 / Open Inference Protocol endpoints, thin over the DataPlane."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiln.server.codec import HEADER_LENGTH, BadRequest
from kiln.server.dataplane import DataPlane, internal_error

log = logging.getLogger("kiln.access")
_INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object"},
        "inputs": {"type": "array", "items": {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
            "name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
            "datatype": {"type": "string", "example": "FP32"}, "parameters": {"type": "object"},
            "data": {"type": "array", "items": {}}}}},
        "outputs": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "parameters": {"type": "object"}}}}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                            "description": "JSON header of Inference-Header-Content-Length bytes, then binary tensors"}}}}}


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json")


def _error_body(e: BadRequest) -> bytes:
    doc: dict[str, Any] = {"error": str(e)}
    if e.request_id:
        doc["request_id"] = e.request_id
    return orjson.dumps(doc)


def _error(e: BadRequest) -> Response:
    headers = {"Retry-After": "1"} if e.status in (429, 503) else None
    return Response(_error_body(e), status_code=e.status, media_type="application/json", headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(f"body of {declared} bytes exceeds the limit of {limit} bytes; send smaller batches or raise --max-body-mb", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"body exceeds the limit of {limit} bytes; send smaller batches or raise --max-body-mb", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(plane: DataPlane, *, api_key: str | None = None, max_body_bytes: int = 64 << 20,
               access_log: bool = False, log_json: bool = False, load_in_background: bool = True,
               grpc_port: int | None = None, grpc_host: str = "127.0.0.1", peers: Any = None) -> FastAPI:
    """The ASGI app. Models load in the background at startup: live at once, ready when loaded and warm.
    With load_in_background=False startup waits for them (Ray Serve replicas: healthy means loaded).
    With `grpc_port`, the KServe v2 gRPC service runs beside it on the same event loop and data plane.
    With `peers` (a kiln.server.peers.Peers: one of the workers of `kiln serve --workers N`), the endpoints that
    describe the whole server (readiness, statistics, metrics, drift watch, repository load/unload) ask the
    other workers too and merge."""
    from kiln.server import peers as merge

    def fan_out(request: Request) -> bool:
        return peers is not None and merge.LOCAL not in request.headers

    async def others(request: Request, timeout_s: float = merge.ASK_TIMEOUT_S) -> dict[int, Any]:
        answers: dict[int, Any] = await peers.ask(request.method, request.url.path, request.headers, timeout_s=timeout_s)
        return answers

    def merged(r: Response, answers: dict[int, Any]) -> Response:
        """A merged answer says how many workers took part."""
        r.headers[merge.ANSWERED] = merge.answered(answers, peers.count)
        return r

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for name in plane.available():
            plane.loading.add(name)
        task = asyncio.create_task(plane.load_all())
        lag = asyncio.create_task(plane.metrics.watch_loop_lag())
        grpc_server = None
        if grpc_port is not None:
            from kiln.server import grpc_service

            grpc_server = await grpc_service.start(plane, port=grpc_port, host=grpc_host, api_key=api_key,
                                                   max_message_bytes=max_body_bytes, peers=peers)
        if not load_in_background:
            await task
        yield
        if grpc_server is not None:
            await grpc_server.stop(1.0)
        for t in (task, lag):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await plane.stop()

    app = FastAPI(title="kiln", version=plane.server_metadata()["version"], lifespan=lifespan, docs_url=None,
                  redoc_url=None, description="KServe v2 / Open Inference Protocol server for models built by `kiln build`.")
    app.state.plane = plane
    _offline_docs(app)

    @app.exception_handler(BadRequest)
    async def _bad(_: Request, e: BadRequest) -> Response:
        return _error(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> Response:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return _error(BadRequest(f"invalid request: {where}: {first.get('msg', 'bad value')}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> Response:
        text = f"no endpoint {request.method} {request.url.path}; the API is listed at /docs" if e.status_code == 404 \
            else f"{e.detail}"
        return Response(orjson.dumps({"error": text}), status_code=e.status_code, media_type="application/json",
                        headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _fault(_: Request, e: Exception) -> Response:
        return _error(internal_error(e))

    @app.get("/v2/health/live", tags=["health"])
    async def live() -> Response:
        return _json({"live": True})

    @app.get("/v2/health/ready", tags=["health"])
    async def ready(request: Request) -> Response:
        ok = plane.ready()
        doc = {"ready": ok} if ok else {"ready": False, "reasons": plane.not_ready_reasons()}
        if fan_out(request):
            answers = await others(request)
            doc = merge.merge_ready(doc, peers.index, answers)
            return merged(_json(doc, 200 if doc["ready"] else 503), answers)
        return _json(doc, 200 if ok else 503)

    @app.get("/v2", tags=["metadata"])
    async def server_metadata() -> Response:
        return _json(plane.server_metadata())

    @app.get("/v2/models/stats", tags=["statistics"])
    async def all_stats(request: Request) -> Response:
        return await stats_of(request, None, None)

    async def stats_of(request: Request, model: str | None, version: str | None) -> Response:
        doc = plane.statistics(model, version)
        if fan_out(request):
            doc, answers = await peers.statistics(doc, request.url.path, request.headers)
            return merged(_json(doc), answers)
        return local(_json(doc))

    def local(r: Response) -> Response:
        """One worker's own answer says which worker it is."""
        if peers is not None:
            r.headers[merge.WORKER] = str(peers.index)
        return r

    @app.get("/v2/models/{model}", tags=["metadata"])
    @app.get("/v2/models/{model}/versions/{version}", tags=["metadata"])
    async def model_metadata(model: str, version: str | None = None) -> Response:
        return _json(plane.model_metadata(model, version))

    @app.get("/v2/models/{model}/ready", tags=["health"])
    @app.get("/v2/models/{model}/versions/{version}/ready", tags=["health"])
    async def model_ready(request: Request, model: str, version: str | None = None) -> Response:
        m = plane.get(model, version)
        if fan_out(request):
            answers = await others(request)
            ok = m.ready and all(r is not None and r.status_code == 200 for r in answers.values())
            return merged(_json({"name": model, "ready": ok}, 200 if ok else 503), answers)
        return _json({"name": model, "ready": m.ready}, 200 if m.ready else 503)

    @app.get("/v2/models/{model}/config", tags=["metadata"])
    @app.get("/v2/models/{model}/versions/{version}/config", tags=["metadata"])
    async def model_config(model: str, version: str | None = None) -> Response:
        return _json(plane.model_config(model, version))

    @app.get("/v2/models/{model}/stats", tags=["statistics"])
    @app.get("/v2/models/{model}/versions/{version}/stats", tags=["statistics"])
    async def model_stats(request: Request, model: str, version: str | None = None) -> Response:
        return await stats_of(request, model, version)

    @app.get("/v2/models/{model}/fidelity", tags=["statistics"])
    @app.get("/v2/models/{model}/versions/{version}/fidelity", tags=["statistics"])
    async def model_fidelity(request: Request, model: str, version: str | None = None) -> Response:
        """Drift watch (--shadow-rate): the served variant against the fp32 reference on sampled live requests."""
        doc = plane.fidelity(model, version)
        if fan_out(request):
            answers = await others(request)
            return merged(_json(merge.merge_fidelity(doc, peers.index, answers)), answers)
        return _json(doc)

    @app.post("/v2/models/{model}/infer", tags=["inference"], openapi_extra=_INFER_BODY)
    @app.post("/v2/models/{model}/versions/{version}/infer", tags=["inference"], openapi_extra=_INFER_BODY)
    async def infer(request: Request, model: str, version: str | None = None) -> Response:
        body = await read_body(request, max_body_bytes)
        h = request.headers
        out, header_len = await plane.infer(model, version, body, h.get(HEADER_LENGTH), h.get("kiln-timeout-ms"))
        if header_len is None:
            return Response(out, media_type="application/json")
        return Response(out, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(header_len)})

    @app.post("/v1/models/{model}:predict", tags=["inference"])
    async def predict_v1(request: Request, model: str) -> Response:
        body = await read_body(request, max_body_bytes)
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise BadRequest(f'malformed JSON: {e}; send {{"instances": [...]}}') from None
        if not isinstance(doc, dict) or "instances" not in doc:
            raise BadRequest('send {"instances": [row, ...]}')
        return _json(await plane.predict_v1(model, doc["instances"]))

    @app.post("/v2/repository/index", tags=["repository"])
    async def repo_index() -> Response:
        return _json(plane.index())

    @app.post("/v2/repository/models/{model}/load", tags=["repository"])
    async def repo_load(request: Request, model: str) -> Response:
        from kiln.errors import KilnError

        try:
            await plane.load(model)
        except KilnError as e:
            raise BadRequest(f"cannot load {model!r}: {e.message}" + (f"; {e.hint}" if e.hint else "")) from None
        return await on_every_worker(request)

    @app.post("/v2/repository/models/{model}/unload", tags=["repository"])
    async def repo_unload(request: Request, model: str) -> Response:
        await plane.unload(model)
        return await on_every_worker(request)

    async def on_every_worker(request: Request) -> Response:
        """Done here: do it on the other workers too (a repository change must hold whichever worker answers)."""
        if not fan_out(request):
            return _json({})
        answers = await others(request, merge.LOAD_TIMEOUT_S)
        failed = merge.first_failure(answers)
        if failed is not None:
            i, error, status = failed
            raise BadRequest(f"worker {i} of {peers.count}: {error}", status if status >= 400 else 500)
        return merged(_json({}), answers)

    @app.get("/metrics", tags=["metrics"])
    async def metrics(request: Request) -> Response:
        text = plane.metrics.render()
        if fan_out(request):
            answers = await others(request)
            texts = {peers.index: text.decode()} | {i: r.text for i, r in answers.items()
                                                    if r is not None and r.status_code == 200}
            return merged(Response(merge.merge_metrics(texts), media_type="text/plain; version=0.0.4"), answers)
        return local(Response(text, media_type="text/plain; version=0.0.4"))

    endpoint = InferEndpoint(plane, max_body_bytes)
    app.router.routes[0:0] = [Route("/v2/models/{model}/infer", endpoint, methods=["POST"]),
                              Route("/v2/models/{model}/versions/{version}/infer", endpoint, methods=["POST"])]
    if access_log:
        app.add_middleware(AccessLog, json_lines=log_json)
    if api_key:  # added last: outermost, so no request reaches anything else without the key
        app.add_middleware(BearerAuth, key=api_key)
    return app


def _offline_docs(app: FastAPI) -> None:
    """/docs with Swagger UI's assets served from the swagger-ui-bundle package, not a CDN: it works offline."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:  # the page then says where its assets would come from
        swagger_ui_path = None
    if swagger_ui_path is not None:
        app.mount("/docs-assets", StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="kiln - API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")


class InferEndpoint:
    """The hot path, `POST /v2/models/{m}[/versions/{v}]/infer`, as an ASGI endpoint of a Starlette Route
    registered ahead of FastAPI's routes: the body goes straight to the data plane, without FastAPI's request
    parsing and dependency layers (measured: about a fifth of a tiny model's request cost). The FastAPI route
    of the same path stays for the OpenAPI description and answers identically."""

    def __init__(self, plane: DataPlane, max_body_bytes: int) -> None:
        self.plane = plane
        self.limit = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = scope["path_params"]
        model, version = params["model"], params.get("version")
        headers = dict(scope["headers"])
        try:
            body = await self._body(headers, receive)
            hl = headers.get(b"inference-header-content-length")
            timeout = headers.get(b"kiln-timeout-ms")
            out, header_len = await self.plane.infer(model, version, body, hl.decode("latin-1") if hl else None,
                                                     timeout.decode("latin-1") if timeout else None)
        except BadRequest as e:
            extra = [(b"retry-after", b"1")] if e.status in (429, 503) else []
            await _send(send, e.status, _error_body(e), b"application/json", extra)
            return
        except Exception as e:  # a bug, not the client's fault: 500 with a request id, details in the log
            await _send(send, 500, _error_body(internal_error(e)), b"application/json", [])
            return
        if header_len is None:
            await _send(send, 200, out, b"application/json", [])
        else:
            await _send(send, 200, out, b"application/octet-stream",
                        [(b"inference-header-content-length", str(header_len).encode())])

    async def _body(self, headers: dict[bytes, bytes], receive: Receive) -> bytes:
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            raise BadRequest(f"body of {int(declared)} bytes exceeds the limit of {self.limit} bytes; "
                             "send smaller batches or raise --max-body-mb", 413)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise BadRequest("client disconnected", 499)
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                raise BadRequest(f"body exceeds the limit of {self.limit} bytes; send smaller batches or raise --max-body-mb", 413)
            chunks.append(chunk)
            if not msg.get("more_body"):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _send(send: Send, status: int, body: bytes, ctype: bytes, extra: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode()), *extra]})
    await send({"type": "http.response.body", "body": body})


class BearerAuth:
    """Requires `Authorization: Bearer KEY` on everything but the health endpoints."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.expected = key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith("/v2/health/"):
            scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            # RFC 7235: the scheme is case-insensitive; the token is compared in constant time
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.expected):
                body = b'{"error":"missing or wrong API key; send the header Authorization: Bearer <key>"}'
                await send({"type": "http.response.start", "status": 401, "headers": [
                    (b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                    (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


class AccessLog:
    """One line per request (method, path, status, duration, bytes), plain or JSON, to stderr."""

    def __init__(self, app: ASGIApp, *, json_lines: bool) -> None:
        self.app = app
        self.json_lines = json_lines

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [0]
        size = [0]

        async def _send(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            elif msg["type"] == "http.response.body":
                size[0] += len(msg.get("body", b""))
            await send(msg)

        try:
            await self.app(scope, receive, _send)
        finally:
            ms = (time.perf_counter() - t0) * 1e3
            client = scope.get("client") or ("-", 0)
            if self.json_lines:
                line = json.dumps({"ts": round(time.time(), 3), "client": client[0], "method": scope["method"],
                                   "path": scope["path"], "status": status[0], "ms": round(ms, 3), "bytes": size[0]})
            else:
                line = f'{client[0]} "{scope["method"]} {scope["path"]}" {status[0]} {ms:.2f}ms {size[0]}B'
            print(line, file=sys.stderr, flush=True)
