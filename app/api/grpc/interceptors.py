"""What every gRPC call passes before its message is read: the API key, a slot, and a deadline on the message.

grpcio reads a unary call's whole message (up to EFFNET_MAX_BODY_MB) before the servicer runs, with no
time limit. So every unary method is served here as a client-streaming one, which grpcio does not read on
its own, and the message is read only once the call is let in:

1. The key, from the call's metadata (headers only): a keyless call is answered UNAUTHENTICATED and its
   message is never read; what grpc core has buffered for it is at most the stream's flow-control window.
   Then a method the servicer does not implement (ModelStreamInfer, statistics, shared memory, trace) is
   answered UNIMPLEMENTED without reading its messages: the generated base class would raise, and grpc.aio
   would log a traceback for every such call a client makes.
2. A slot: at most EFFNET_MAX_CONNECTIONS calls at once (UNAVAILABLE + retry-after beyond). The health
   RPCs (ServerLive, ServerReady) take none, so calls that hold every slot cannot fail the probes, and their
   message is never read: it has no field they use, and a slot-free call that read a 20 MB one would hold
   20 MB outside every bound.
3. The message must arrive within EFFNET_BODY_TIMEOUT_S (DEADLINE_EXCEEDED, the call is ended and its
   stream freed), and is charged to the in-flight memory budget (EFFNET_MAX_INFLIGHT_MB) the moment grpcio
   hands it over, before it is parsed; the charge is held until the call ends. grpcio gives no earlier
   look: its core assembles the message before Python sees a byte of it.
4. Before it is parsed, the objects parsing would make of it are counted from its bytes
   (message_limits.py): a message of millions of tiny fields is refused instead of growing many times its
   charge in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor

from .message_limits import count_objects
from .status import KeyCheck, abort_with
from ...core.errors import ApiError, BadRequest, NotImplementedHere, Overloaded, RequestTimeout
from ...engine.facade import Plane


class Guard(grpc.aio.ServerInterceptor):
    def __init__(self, plane: Plane, health_paths: dict[str, str], request_types: dict[str, Descriptor],
                 served: frozenset[str]) -> None:
        """`health_paths`: method name (`ServerLive`) -> the HTTP path whose key exemption it follows;
        `request_types`: method name -> its request message's descriptor (the schema the count follows);
        `served`: the unary methods the servicer implements."""
        self.plane = plane
        self.served = served
        self.request_types = request_types
        # A request needs a few dozen strings and sub-messages, plus one BYTES element per image at most.
        self.object_limit = 1024 + 2 * plane.settings.max_queue
        self.keys = KeyCheck(plane.settings)
        self.health_paths = health_paths
        self.limit = plane.settings.max_connections
        self.calls = 0  # calls holding a slot (all on this process's event loop: no lock needed)

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return handler  # a method of no service here: grpc answers UNIMPLEMENTED itself
        method = details.method.rsplit("/", 1)[-1]
        health = method in self.health_paths
        try:
            self.keys.check(details.invocation_metadata, self.health_paths.get(method))
            if method not in self.served or handler.request_streaming or handler.response_streaming:
                raise NotImplementedHere(f"{method} is not implemented by this server")
        except ApiError as exc:
            return _refusal(exc, handler)
        return self._guarded(handler, not health, self.request_types.get(method))

    def _guarded(self, handler: grpc.RpcMethodHandler, counted: bool,
                 schema: Descriptor | None) -> grpc.RpcMethodHandler:
        behavior, parse = handler.unary_unary, handler.request_deserializer
        memory = self.plane.memory
        read_s, limit = self.plane.settings.body_timeout_s, self.object_limit

        async def serve(requests, context: grpc.aio.ServicerContext):
            # Checked and taken with no await between: the count is exact.
            if counted and self.calls >= self.limit:
                await abort_with(context, Overloaded(f"{self.limit} gRPC calls are in progress; retry shortly"))
            self.calls += counted
            charged = 0
            try:
                raw = await _read_within(context, read_s) if counted else b""  # a probe: see the docstring
                try:
                    memory.take(2 * len(raw), "request bodies")  # the bytes and the parsed message, for a moment
                    charged = 2 * len(raw)
                    if schema is not None:
                        count_objects(raw, schema, limit)
                except ApiError as exc:
                    await abort_with(context, exc)
                try:
                    request = parse(raw) if parse is not None else raw
                except Exception:  # noqa: BLE001 - protobuf's DecodeError, or worse: the client's fault either way
                    await abort_with(context, BadRequest("the message is not a valid protobuf message for this RPC"))
                del raw
                memory.give(charged // 2)  # the bytes are gone; the parsed message stays charged
                charged //= 2
                return await behavior(request, context)
            finally:
                if charged:
                    memory.give(charged)
                if counted:
                    self.calls -= 1

        return grpc.stream_unary_rpc_method_handler(serve, response_serializer=handler.response_serializer)


async def _read_within(context: grpc.aio.ServicerContext, read_s: float) -> bytes:
    """The call's one message (raw bytes), or the call ended: DEADLINE_EXCEEDED when it is not all there within
    read_s, INVALID_ARGUMENT when the client closed without one."""
    read = asyncio.ensure_future(context.read())
    try:
        done, _ = await asyncio.wait({read}, timeout=read_s)
    except asyncio.CancelledError:  # the call was cancelled (the client went away): the read goes with it
        read.cancel()
        raise
    if not done:
        # Ending the call cancels its pending read in grpc core; that read then ends without a message.
        try:
            await abort_with(context, RequestTimeout(f"the message did not arrive within {read_s:g} s"))
        finally:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await read
    message = read.result()
    if message is grpc.aio.EOF:
        await abort_with(context, BadRequest("the call carried no request message"))
    return message


def _refusal(error: ApiError, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler that answers `error` without reading the message (of the method's kind: a streaming answer
    for a method that streams one)."""

    async def refuse(requests, context: grpc.aio.ServicerContext):
        await abort_with(context, error)

    if handler.response_streaming:
        async def refuse_stream(requests, context: grpc.aio.ServicerContext):
            await abort_with(context, error)
            yield  # unreachable: abort raises; the yield makes this the async generator grpc expects

        return grpc.stream_stream_rpc_method_handler(refuse_stream, response_serializer=handler.response_serializer)
    return grpc.stream_unary_rpc_method_handler(refuse, response_serializer=handler.response_serializer)
