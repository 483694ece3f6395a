"""gRPC beside REST: `pipelines serve MODEL --grpc-port 50051` answers the calls of pipelines/proto/inference.proto
(service pipelines.v1.Inference) on the same model, through the same task code (`serve_items`, `serve_batch`,
`serve_response`) and the same micro-batcher as the HTTP endpoints: the gRPC server runs on uvicorn's event loop,
so HTTP and gRPC requests are batched together.

    Predict    classification, token classification, multi-label, image classification   (REST POST /predict)
    Generate   causal LM                                                                  (POST /generate)
    GenerateStream  causal LM: Generate's new text as it is made (as /v1/completions with stream: true, greedy)
    Translate  translation                                                                (POST /translate)
    Summarize  summarization                                                              (POST /summarize)
    Info       which model and which of the calls above it answers

A request message becomes the task's own request (the REST JSON schema, pydantic-validated) and the task's REST
answer becomes the response message (google.protobuf.json_format), so the two transports cannot drift apart
silently: a key the proto lacks fails the tests. Errors map as the REST statuses do (400 / 422 ->
INVALID_ARGUMENT, 413 -> RESOURCE_EXHAUSTED, 401 -> UNAUTHENTICATED, a call of another task -> UNIMPLEMENTED,
anything unexpected -> INTERNAL); a message over the body cap of REST is refused by grpc itself
(RESOURCE_EXHAUSTED). Also served: grpc.health.v1.Health (open, like /health; NOT_SERVING while shutting down)
and server reflection (keyed, like /docs). API keys come as metadata `authorization: Bearer KEY`, the key set
of REST. Every Inference call counts in the server's metrics under its full method name
(/pipelines.v1.Inference/Predict) with the gRPC code name as status.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from types import SimpleNamespace

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError

from pipelines import openai_api
from pipelines.errors import PipelinesError
from pipelines.proto import inference_pb2 as pb2
from pipelines.proto import inference_pb2_grpc as pb2_grpc
from pipelines.serve import authorized
from pipelines.tasks import RequestError

SERVICE = pb2.DESCRIPTOR.services_by_name["Inference"].full_name  # pipelines.v1.Inference
Code = grpc.StatusCode
CODES = {400: Code.INVALID_ARGUMENT, 401: Code.UNAUTHENTICATED, 404: Code.UNIMPLEMENTED,
         413: Code.RESOURCE_EXHAUSTED, 422: Code.INVALID_ARGUMENT}
CLIENT_ERRORS = {Code.INVALID_ARGUMENT, Code.UNAUTHENTICATED, Code.UNIMPLEMENTED, Code.RESOURCE_EXHAUSTED,
                 Code.CANCELLED, Code.DEADLINE_EXCEEDED}


def call_of(endpoint: str) -> str:
    """The gRPC call of a task's REST endpoint: /predict -> Predict, /summarize -> Summarize."""
    return endpoint.strip("/").capitalize()


class Failure(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


# ---------------------------------------------------------------- the service


class Inference(pb2_grpc.InferenceServicer):
    def __init__(self, served, settings, run_items, metrics, generation):
        self.served, self.task, self.limits = served, served.task, settings.limits()
        self.settings, self.run_items, self.metrics = settings, run_items, metrics
        self.generation = generation  # GenerateStream's (openai_api.Batched, continuous.Continuous; None: not an LM)
        self.call = call_of(self.task.endpoint)

    async def Predict(self, request, context):
        return await self.answer("Predict", request, context)

    async def Generate(self, request, context):
        return await self.answer("Generate", request, context)

    async def Translate(self, request, context):
        return await self.answer("Translate", request, context)

    async def Summarize(self, request, context):
        return await self.answer("Summarize", request, context)

    async def Info(self, request, context):
        return pb2.InfoResponse(model=str(self.served.name), task=self.task.name, call=self.call,
                                quantize=self.served.quantized, batching=self.settings.batching)

    async def GenerateStream(self, request, context):
        async with self.accounted("GenerateStream", context):
            key, (prompt,) = self.items("Generate", request)
            (max_new,) = key
            params = (openai_api.KIND, max_new, 0.0, 1.0, (), None)  # greedy, as Generate
            async for kind, *rest in self.generation.stream_text(params, prompt):
                if kind == "text":
                    yield pb2.GenerateChunk(text=rest[0])
                else:
                    yield pb2.GenerateChunk(finish_reason=rest[0], completion_tokens=rest[1], model=str(self.served.name))

    async def answer(self, call: str, request, context):
        async with self.accounted(call, context):
            return await self.work(call, request)

    @contextlib.asynccontextmanager
    async def accounted(self, call: str, context):
        """One call, timed and counted; a failure becomes its status code and message."""
        method, code, t0 = f"/{SERVICE}/{call}", Code.OK, time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            yield
        except Failure as e:
            code = e.code
            await context.abort(code, e.message)
        except (asyncio.CancelledError, GeneratorExit):  # the client went away (or its deadline passed)
            code = Code.CANCELLED
            raise
        except Exception as e:  # never let a request take the server down
            code = Code.INTERNAL
            await context.abort(code, f"inference failed: {type(e).__name__}: {e}")
        finally:
            self.metrics.in_flight.dec()
            kind = None if code == Code.OK else "client" if code in CLIENT_ERRORS else "server"
            self.metrics.request(method, code.name, time.perf_counter() - t0, kind)

    def items(self, call: str, request) -> tuple[tuple, list]:
        """The request as the task's batch key and items, or the Failure that answers it."""
        if call != self.call:
            raise Failure(Code.UNIMPLEMENTED, f"the model {self.served.name!r} is a {self.task.name} model: "
                                              f"call {self.call}, not {call}")
        try:
            return self.task.serve_items(self.task_request(request), self.limits)
        except RequestError as e:
            raise Failure(CODES.get(e.status, Code.INVALID_ARGUMENT), str(e)) from None

    async def work(self, call: str, request):
        key, items = self.items(call, request)
        outputs = await self.run_items(key, items)
        answer = self.task.serve_response(self.served, outputs)
        return json_format.ParseDict(answer, getattr(pb2, f"{call}Response")())

    def task_request(self, message):
        """The message as the task's REST request: its pydantic schema, or the raw files of its upload field."""
        upload = self.task.upload_field
        given = {f.name: value for f, value in message.ListFields()}
        if upload is not None and upload in given:
            others = sorted(set(given) - {upload})
            if others:
                raise Failure(Code.INVALID_ARGUMENT, f"{', '.join(others)}: not a field of a {self.task.name} "
                                                     f"request (it takes {upload})")
            return SimpleNamespace(**{upload: list(given[upload])})
        try:
            return self.task.Request.model_validate(json_format.MessageToDict(message, preserving_proto_field_name=True))
        except ValidationError as e:  # a field of another task first: the likelier mistake than a missing one
            first = min(e.errors(), key=lambda err: err.get("type") != "extra_forbidden")
            where = ".".join(str(x) for x in first.get("loc", ())) or "request"
            msg = "not a field of this task's request" if first.get("type") == "extra_forbidden" else first.get("msg")
            raise Failure(Code.INVALID_ARGUMENT, f"invalid request: {where}: {msg}") from None


# ---------------------------------------------------------------- API keys


class KeyCheck(grpc.aio.ServerInterceptor):
    """With API keys, every call but the health service's needs metadata `authorization: Bearer KEY`."""

    def __init__(self, keys: tuple[str, ...], metrics):
        self.keys, self.metrics = keys, metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if (handler is None or not self.keys or details.method.startswith(f"/{health.SERVICE_NAME}/")
                or authorized(dict(details.invocation_metadata or ()).get("authorization", ""), self.keys)):
            return handler
        if details.method.startswith(f"/{SERVICE}/"):
            self.metrics.request(details.method, Code.UNAUTHENTICATED.name, 0.0, "client")
        return _refusal(handler)


def _refusal(handler):
    """A handler of the same kind (unary / streaming) that answers UNAUTHENTICATED."""
    message = "missing or invalid API key: send metadata `authorization: Bearer <key>`"

    async def unary(request, context):
        await context.abort(Code.UNAUTHENTICATED, message)

    async def streaming(request, context):
        await context.abort(Code.UNAUTHENTICATED, message)
        yield  # (an async generator: the handler kind of a streaming response)

    kind = ("stream" if handler.request_streaming else "unary") + "_" + ("stream" if handler.response_streaming else "unary")
    make = getattr(grpc, f"{kind}_rpc_method_handler")
    return make(streaming if handler.response_streaming else unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


# ---------------------------------------------------------------- the server


@dataclass
class GrpcServer:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int

    async def stop(self, grace_s: float = 2.0) -> None:
        await self.health.enter_graceful_shutdown()  # health checks answer NOT_SERVING from now on
        await self.server.stop(grace_s)


async def start(served, settings, run_items, metrics, generation) -> GrpcServer:
    """The gRPC server on the running event loop, on settings.grpc_host:grpc_port (0: a free port)."""
    cap = settings.limits().body_bytes(served.task.inputs)  # the REST body cap: larger messages are refused
    server = grpc.aio.server(interceptors=[KeyCheck(settings.api_keys, metrics)],
                             options=[("grpc.max_receive_message_length", cap)])
    pb2_grpc.add_InferenceServicer_to_server(Inference(served, settings, run_items, metrics, generation), server)
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    reflection.enable_server_reflection([SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as e:
        raise PipelinesError(f"cannot serve gRPC on {address}: {e}") from None
    if not port:
        raise PipelinesError(f"cannot serve gRPC on {address} (port in use?)")
    await server.start()
    for name in ("", SERVICE):
        await checks.set(name, health_pb2.HealthCheckResponse.SERVING)
    return GrpcServer(server, checks, port)
