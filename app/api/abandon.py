"""Requests whose clients have gone are cancelled, wherever they wait: for queue room, for the model.

Starlette and uvicorn run an endpoint to its end whether or not anyone will read the answer; uvicorn only
says a client left through `receive()` (an `http.disconnect` message), and only to a caller that asks. An
inference request waits before it reads its body (the admission gate, the data plane's stage one) and
after (stage two, the batch): a client that left in either wait used to stay in its line, and a storm of
clients that had gone kept the queue and the lines full for a whole admission wait after it ended.

So for the inference routes this middleware reads the request for the app, one message ahead, and cancels
the request's task the moment uvicorn reports the client gone: the waits give their place and their room
back (queue_room.py), queued images are skipped by the batcher, and in a worker process the cancel crosses
the link to the engine (app/engine/link). The app reads the same messages in the same order through
`receive`, as it would have.

Reading ahead is bounded: at most READ_AHEAD_BYTES of body wait here unread (about what uvicorn itself
buffers before it stops reading the socket); past that the app must read before the watch goes on, so a
big upload is watched again once it is admitted and reading. A request that asks `Expect: 100-continue` is
not read before the app asks (uvicorn sends "100 Continue" on the first receive, and the client must not be
told to send before it is admitted).

Cost: one task per inference request (the watcher) and a hand-off per body message: about 16 us a request
measured on the bare middleware (asyncio's own loop), and within run-to-run noise on 1,000 sequential
/classify requests of a small model (about 1.7 ms each). A GET, or any other route, passes straight through.
"""

from __future__ import annotations

import asyncio
import collections

from starlette.types import ASGIApp, Message, Receive, Scope, Send

READ_AHEAD_BYTES = 64 * 1024


def watched(scope: Scope) -> bool:
    """The routes that wait for queue room: POST /classify and the V2 infer routes."""
    if scope["type"] != "http" or scope.get("method") != "POST":
        return False
    path = scope.get("path", "")
    return path == "/classify" or (path.startswith("/v2/models/") and path.endswith("/infer"))


class AbandonedRequests:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not watched(scope):
            await self.app(scope, receive, send)
            return
        continues = any(k == b"expect" and v.lower() == b"100-continue" for k, v in scope.get("headers", ()))
        task = asyncio.current_task()
        assert task is not None  # an ASGI app always runs in a task
        watch = _Watch(receive, send, task, continues)
        try:
            await self.app(scope, watch.receive, watch.send)
        except asyncio.CancelledError:
            if not watch.cancelled:
                raise
            watch.cancelled = False
            if watch.host.uncancel() > 0:  # cancelled by someone else too (a shutdown): theirs goes on
                raise
            if not watch.started:  # nobody reads it (uvicorn drops it): it tells the access log and span why
                await send({"type": "http.response.start", "status": 499, "headers": []})
                await send({"type": "http.response.body", "body": b""})
        finally:
            watch.stop()
            if watch.cancelled:  # the app turned our cancel into an error or an answer: not left counted
                watch.host.uncancel()


class _Watch:
    """The request's messages, read by one watcher task ahead of the app, and the cancel when one says gone."""

    def __init__(self, receive: Receive, send: Send, host: asyncio.Task, expect_continue: bool) -> None:
        self._receive, self._send, self.host = receive, send, host
        self._inbox: collections.deque[Message] = collections.deque()
        self._arrived = asyncio.Event()  # something is in the inbox
        self._room = asyncio.Event()  # the inbox is under READ_AHEAD_BYTES
        self._room.set()
        self._asked = asyncio.Event()  # the app has called receive once
        self._held = 0  # body bytes in the inbox
        self._gone = False
        self.cancelled = False  # the host task was cancelled by us
        self.started = False  # the response has started
        self._finished = False  # the response is complete: a disconnect now is the connection's end, not a loss
        if not expect_continue:
            self._asked.set()
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        try:
            await self._asked.wait()
            while True:
                await self._room.wait()
                message = await self._receive()
                if message["type"] == "http.disconnect":
                    if not self._finished and not self.host.done():
                        self.cancelled = True
                        self.host.cancel()
                    return
                self._inbox.append(message)
                self._held += len(message.get("body", b""))
                if self._held >= READ_AHEAD_BYTES:
                    self._room.clear()
                self._arrived.set()
        finally:  # the client left, or the watch ended: the app's next read says so instead of waiting
            self._gone = True
            self._arrived.set()

    async def receive(self) -> Message:
        self._asked.set()
        while not self._inbox:
            if self._gone:
                return {"type": "http.disconnect"}
            self._arrived.clear()
            await self._arrived.wait()
        message = self._inbox.popleft()
        self._held -= len(message.get("body", b""))
        if self._held < READ_AHEAD_BYTES:
            self._room.set()
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self._finished = True
        await self._send(message)

    def stop(self) -> None:
        self._task.cancel()
