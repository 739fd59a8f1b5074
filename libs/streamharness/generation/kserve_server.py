"""SmolLM2 served by KServe's model server, so the same process runs locally and as a KServe
InferenceService (custom predictor container).

    python -m streamharness.generation.kserve_server --model_name smollm2 --http_port 8080

What it serves (REST, one port):

- Open Inference Protocol health: ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/<name>/ready``
  (and v1 ``/v1/models/<name>``), from KServe itself;
- OpenAI-compatible generation under ``/openai`` (KServe's prefix, ``KSERVE_OPENAI_ROUTE_PREFIX``):
  ``POST /openai/v1/chat/completions`` (``stream`` true or false), ``GET /openai/v1/models``.

Why our own OpenAI routes: KServe 0.21's OpenAI layer (``kserve.protocol.rest.openai``) imports its
request/response types from vLLM, so without vLLM installed KServe logs "OpenAI endpoints not
registered" and serves none. We add the same paths to KServe's FastAPI app instead.

Binding: KServe hard-codes ``0.0.0.0`` for REST and ``[::]`` for gRPC. ``--host`` (default
127.0.0.1) sets the REST bind address; KServe's gRPC v2 server is off by default here
(``--enable_grpc true`` turns it on, and it then always binds ``[::]``). In a pod pass
``--host 0.0.0.0``.

Settings of the model itself (GGUF path, torch threads, concurrency) are ``SH_GENERATION_*``.
This module imports ``kserve``: never import it into a process that uses ``tritonclient.grpc``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

import kserve
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from kserve import model_server as kserve_model_server
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from streamharness.errors import InvalidInput, SettingsError
from streamharness.generation.base import GenerationError
from streamharness.generation.local_smollm2 import GenerationStats, LocalSmolLM2Generator
from streamharness.generation.settings import GenerationSettings
from streamharness.settings import TelemetrySettings, load_settings
from streamharness.telemetry import setup_logging

log = logging.getLogger("streamharness.generation.server")

OPENAI_ROUTE_PREFIX = "/" + os.environ.get("KSERVE_OPENAI_ROUTE_PREFIX", "/openai").strip("/")


class SmolLM2Model(kserve.Model):
    """The KServe model: readiness follows the weights being loaded; generation is OpenAI-style."""

    def __init__(self, name: str, settings: GenerationSettings) -> None:
        super().__init__(name)
        self.generator = LocalSmolLM2Generator(settings)
        self.default_max_tokens = settings.max_new_tokens

    def load(self) -> bool:
        self.generator.load()
        self.ready = self.generator.ready()
        return self.ready

    async def predict(self, payload: Any, headers: Any = None, response_headers: Any = None) -> Any:
        raise NotImplementedError(
            f"model {self.name} generates text: POST {OPENAI_ROUTE_PREFIX}/v1/chat/completions (OpenAI API)"
        )

    def stop(self) -> None:
        super().stop()
        self.generator.close()


# -- OpenAI-compatible API --------------------------------------------------------------------
class ChatCompletionBody(BaseModel):
    """The subset of OpenAI's chat-completions request this model honours; unknown fields are
    ignored, as OpenAI-compatible servers commonly do."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: Literal[1] = 1


def _openai_error(status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                  code: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param, "code": code}})


def _describe(err: ValidationError) -> tuple[str, str | None]:
    first = err.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    return f"{param}: {first['msg']}" if param else first["msg"], param


async def _iterate_in_thread(pieces: Iterator[str], cancel: threading.Event) -> AsyncIterator[str]:
    """Drive a blocking iterator on its own thread and hand its items to the event loop. If the
    consumer goes away (client disconnect), ``cancel`` stops the model at its next token."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def deliver(item: tuple[str, Any]) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (server shutting down): nobody is listening
            cancel.set()

    def pump() -> None:
        try:
            for piece in pieces:
                deliver(("piece", piece))
                if cancel.is_set():
                    break
            deliver(("end", None))
        except BaseException as err:  # noqa: BLE001 - re-raised on the loop side
            deliver(("error", err))
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()

    threading.Thread(target=pump, name="openai-stream", daemon=True).start()
    try:
        while True:
            kind, value = await queue.get()
            if kind == "piece":
                yield value
            elif kind == "error":
                raise value
            else:
                return
    finally:
        cancel.set()


def openai_router(model: SmolLM2Model) -> APIRouter:
    router = APIRouter(prefix=OPENAI_ROUTE_PREFIX, tags=["OpenAI"])
    created = int(time.time())

    @router.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model.name, "object": "model", "created": created, "owned_by": "streamharness"}]}

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        try:
            body = ChatCompletionBody.model_validate(await request.json())
        except ValueError as err:  # ValidationError is a ValueError; so is a body that is not JSON
            if isinstance(err, ValidationError):
                message, param = _describe(err)
            else:
                message, param = f"request body is not valid JSON: {err}", None
            return _openai_error(400, message, param=param)
        if body.model != model.name:
            return _openai_error(404, f"model {body.model!r} does not exist; this server serves {model.name!r}",
                                 param="model", code="model_not_found")
        if not model.ready:
            return _openai_error(503, f"model {model.name!r} is not ready", kind="server_error")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        stats = GenerationStats()
        cancel = threading.Event()
        try:
            pieces = model.generator.stream_chat(
                body.messages,
                max_new_tokens=body.max_completion_tokens or body.max_tokens or model.default_max_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                stop=stop,
                seed=body.seed,
                stats=stats,
                cancel=cancel,
            )
        except InvalidInput as err:
            return _openai_error(400, str(err), param="messages")
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if not body.stream:
            text = "".join([p async for p in _iterate_in_thread(pieces, cancel)])
            return {
                "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": stats.finish_reason}],
                "usage": _usage(stats),
            }
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(
            _sse(completion_id, model.name, _iterate_in_thread(pieces, cancel), stats, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    return router


def _usage(stats: GenerationStats) -> dict[str, int]:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_tokens + stats.completion_tokens}


async def _sse(completion_id: str, model_name: str, pieces: AsyncIterator[str], stats: GenerationStats,
               include_usage: bool) -> AsyncIterator[str]:
    import orjson

    created = int(time.time())

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        chunk = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                 "choices": choices, **extra}
        return f"data: {orjson.dumps(chunk).decode()}\n\n"

    yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    try:
        async for piece in pieces:
            yield event([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
    except GenerationError as err:
        # Headers are gone already: report in-band, as OpenAI-compatible servers do.
        log.error("generation %s failed: %s", completion_id, err)
        yield f"data: {orjson.dumps({'error': {'message': str(err), 'type': 'server_error'}}).decode()}\n\n"
        yield "data: [DONE]\n\n"
        return
    yield event([{"index": 0, "delta": {}, "finish_reason": stats.finish_reason}])
    if include_usage:
        yield event([], usage=_usage(stats))
    yield "data: [DONE]\n\n"


# -- server -----------------------------------------------------------------------------------
class GeneratorModelServer(kserve.ModelServer):
    """KServe's ModelServer with a REST bind address (KServe hard-codes 0.0.0.0)."""

    def __init__(self, host: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._host = host

    async def _serve(self) -> None:
        # start() builds the REST server, then runs this coroutine; uvicorn binds config.host in
        # its startup, which has not happened yet.
        if self._rest_server is not None:
            self._rest_server.config.host = self._host
        log.info("serving on http://%s:%d (OpenAI API at %s/v1)", self._host, self.http_port, OPENAI_ROUTE_PREFIX)
        await super()._serve()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m streamharness.generation.kserve_server",
        parents=[kserve_model_server.parser],
        description="Serve SmolLM2-135M-Instruct with KServe: OpenAI-compatible chat completions + v2 health.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="REST bind address (0.0.0.0 inside a pod).")
    # The generation API is REST; KServe's gRPC v2 server would add nothing but an open port.
    parser.set_defaults(model_name="smollm2", enable_grpc=False)
    return parser


def install_routes(app: FastAPI, model: SmolLM2Model) -> None:
    app.include_router(openai_router(model))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers != 1:
        print("error: --workers must be 1 (each worker would load its own model; scale with replicas)", flush=True)
        return 2
    try:
        settings = load_settings(GenerationSettings)
        telemetry = load_settings(TelemetrySettings)
    except SettingsError as err:
        print(f"error: {err}", flush=True)
        return 2
    setup_logging(telemetry.log_level, telemetry.log_json)
    model = SmolLM2Model(args.model_name, settings)
    model.load()
    install_routes(kserve_model_server.app, model)
    server = GeneratorModelServer(
        args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        workers=1,
        max_threads=args.max_threads,
        max_asyncio_workers=args.max_asyncio_workers,
        access_log_format=args.access_log_format,
        enable_grpc=args.enable_grpc,
        enable_docs_url=args.enable_docs_url,
        enable_latency_logging=args.enable_latency_logging,
        timeout_keep_alive=args.timeout_keep_alive,
        event_loop=args.event_loop,
    )
    if args.enable_grpc:
        log.warning("KServe's gRPC server binds [::]:%d whatever --host says", args.grpc_port)
    server.start([model])
    return 0


if __name__ == "__main__":
    sys.exit(main())
