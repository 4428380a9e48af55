"""The OpenAI-compatible HTTP API (FastAPI) over one ``EngineLoop``.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``, ``/health``,
``/version``, ``/metrics``. Client errors are 4xx with OpenAI's error body; a client that goes away
aborts its requests (their KV blocks return at once)."""
import asyncio
import json
import time
from contextlib import asynccontextmanager
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from .loop import EngineLoop, Handle
from .metrics import CONTENT_TYPE, Metrics
from .protocol import APIError
from .routes import OpenAIRoutes
from .responses import TokenText


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is a 413, by its Content-Length or as it
    arrives."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _error_response(APIError(413, self._message(), code="request_too_large"))(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.limit:
                raise APIError(413, self._message(), code="request_too_large")
            return msg
        return await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"request body over the {self.limit}-byte limit"


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _validation_error(e) -> APIError:
    """A pydantic/FastAPI validation error as a 400 naming the first offending field."""
    err = e.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    msg = err.get("msg", "invalid request").removeprefix("Value error, ")
    return APIError(400, f"{'.'.join(loc)}: {msg}" if loc else msg, param=loc[0] if loc else None)


class Server(OpenAIRoutes):
    """``Server(llm, served_model_name=...).app`` is the ASGI app; the engine loop starts and stops
    with the app's lifespan (``grace_s``: how long shutdown lets running requests finish)."""

    def __init__(self, llm, *, served_model_name: str, api_key: Optional[str] = None, max_waiting: int = 1024,
                 max_body_bytes: int = 8 << 20, grace_s: float = 5.0):
        self.llm, self.name, self.api_key = llm, served_model_name, api_key
        self.max_waiting, self.grace_s = max_waiting, grace_s
        man = llm.model.manifest
        self.max_len = man["program"]["max_tokens"]
        self.vocab = llm.vocab_size
        self.tokenizer = llm.tokenizer
        self.tok = TokenText(self.tokenizer)
        self.metrics = Metrics(served_model_name)
        self.loop = EngineLoop(llm.engine, self.metrics)
        self.metrics.attach(self.loop)
        self.started = int(time.time())
        self.app = self._build(max_body_bytes)

    # --- the app -----------------------------------------------------------------------------
    def _build(self, max_body_bytes: int) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app):
            self.loop.start()
            yield
            await asyncio.to_thread(self.loop.stop, self.grace_s)

        app = FastAPI(title="qcompiler", lifespan=lifespan, docs_url=None, redoc_url=None)
        app.add_middleware(BodyLimit, limit=max_body_bytes)
        app.add_exception_handler(APIError, lambda r, e: _error_response(e))
        app.add_exception_handler(RequestValidationError,
                                  lambda r, e: _error_response(_validation_error(e)))
        app.add_exception_handler(HTTPException, lambda r, e: _error_response(
            APIError(e.status_code, str(e.detail), type="not_found_error" if e.status_code == 404 else
                     "invalid_request_error")))
        app.post("/v1/completions")(self.completions)
        app.post("/v1/chat/completions")(self.chat_completions)
        app.get("/v1/models")(self.models)
        app.get("/health")(self.health)
        app.get("/version")(self.version)
        app.get("/metrics")(self.metrics_text)
        return app

    async def models(self, request: Request):
        self._auth(request)
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.started,
                                            "owned_by": "qcompiler", "root": self.llm.model.path,
                                            "max_model_len": self.max_len}]}

    async def health(self):
        return Response(status_code=200 if self.loop.alive else 503)

    async def version(self):
        from qcompiler import __version__
        return {"version": __version__}

    async def metrics_text(self):
        return PlainTextResponse(self.metrics.render(), media_type=CONTENT_TYPE)

    # --- request checks ---------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
            raise APIError(401, "missing or wrong API key (Authorization: Bearer KEY)", type="authentication_error",
                           code="invalid_api_key")

    async def _parse(self, request: Request, cls):
        self._auth(request)
        raw = await request.body()
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}")
        if not isinstance(obj, dict):
            raise APIError(400, f"the body must be a JSON object, got {type(obj).__name__}")
        try:
            body = cls.model_validate(obj)
        except ValidationError as e:
            raise _validation_error(e)
        if body.model is not None and body.model != self.name:
            raise APIError(404, f"the model `{body.model}` does not exist; this server serves `{self.name}`",
                           type="not_found_error", param="model", code="model_not_found")
        return body

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise APIError(400, "this model has no tokenizer: send prompts as token ids", param="prompt")
            return self.tokenizer(prompt)["input_ids"]
        bad = [t for t in prompt if t < 0 or (self.vocab is not None and t >= self.vocab)]
        if bad:
            raise APIError(400, f"token id {bad[0]} outside the vocabulary [0, {self.vocab})", param="prompt")
        return list(prompt)

    def _check_fits(self, n_prompt: int, max_tokens: int) -> None:
        if n_prompt + max_tokens > self.max_len:
            raise APIError(400, f"this model's maximum context length is {self.max_len} tokens; the request asks for "
                           f"{n_prompt + max_tokens} ({n_prompt} in the prompt, {max_tokens} for the completion)",
                           param="max_tokens", code="context_length_exceeded")
        bm = self.llm.engine.bm
        if bm.blocks_needed(n_prompt + 1) > bm.pool.num_blocks:
            raise APIError(400, f"the prompt needs {bm.blocks_needed(n_prompt + 1)} KV blocks; the pool has "
                           f"{bm.pool.num_blocks}", param="prompt")

    def _params(self, body, max_tokens: int, logprobs, prompt_logprobs=None):
        try:
            return body.sampling_params(max_tokens, logprobs, prompt_logprobs, self.vocab)
        except ValueError as e:
            raise APIError(400, str(e))

    def _submit(self, prompts: list[list[int]], params, texts=()) -> tuple[list[Handle], asyncio.Queue]:
        if self.loop.num_waiting() + len(prompts) > self.max_waiting:
            raise APIError(503, f"the server is at capacity ({self.max_waiting} requests waiting); retry later",
                           type="server_overloaded", headers={"Retry-After": "1"})
        if not self.loop.alive:
            raise APIError(503, self.loop.failure or "the engine is not running", type="server_error")
        q, aloop = asyncio.Queue(), asyncio.get_running_loop()
        texts = list(texts) + [None] * (len(prompts) - len(texts))
        handles = [Handle(ids, params, aloop, q, tag=i, prompt_text=t) for i, (ids, t) in enumerate(zip(prompts, texts))]
        for h in handles:
            self.loop.submit(h)
        return handles, q

    async def _events(self, handles: list[Handle], q: asyncio.Queue):
        """``(handle, deltas or None)`` until every handle is done (None: that handle's done event);
        leaving early (a client gone, a consumer closed) aborts the rest."""
        left = len(handles)
        try:
            while left:
                tag, kind, payload = await q.get()
                if kind == "done":
                    left -= 1
                    yield handles[tag], None
                else:
                    yield handles[tag], payload
        finally:
            if left:
                for h in handles:
                    self.loop.abort(h)

    async def _collect(self, request: Request, handles: list[Handle], q: asyncio.Queue) -> dict:
        """Every handle's choices accumulated: ``{(tag, index): {"ids", "text", "lps", "finish"}}``. A
        client that disconnects meanwhile aborts them."""
        async def watch():
            while True:
                await asyncio.sleep(0.2)
                if await request.is_disconnected():
                    for h in handles:
                        self.loop.abort(h)
                    return
        watcher = asyncio.create_task(watch())
        out: dict = {}
        try:
            async for h, deltas in self._events(handles, q):
                for d in deltas or ():
                    c = out.setdefault((h.tag, d.index), {"ids": [], "text": "", "lps": [], "finish": None})
                    c["ids"] += d.token_ids
                    c["text"] += d.text
                    c["lps"] += d.logprobs
                    c["finish"] = d.finish_reason or c["finish"]
        finally:
            watcher.cancel()
        for h in handles:
            if h.error:
                status = 400 if h.req is None or h.req.finish_reason == "error" else 500
                raise APIError(status, h.error, type="invalid_request_error" if status == 400 else "server_error")
        return out
