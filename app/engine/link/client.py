"""The worker's side of the link: `RemotePlane`, a `facade.Plane` whose verbs the engine process answers.

What a front end asks often is answered here, without a round trip: models, readiness and the default
model come from the last state the engine pushed (app/engine/link/server.py). A request costs three round
trips (open, reserve, submit) and one message without an answer (close); its images are decoded here,
between reserve and submit, and cross to the engine in this worker's shared-memory arena.

A request that finds nothing else in flight in its worker asks for both stages at once (`admit`) once its
body is in, and decodes while the answer comes: on a quiet service each round trip is a wake-up of two
processes, and open and reserve were most of what two workers added to one process's latency. Its body is
read before stage one (which a worker with nothing else in flight can afford), but nothing of it is used
before the engine admitted it: a refusal is the answer even when the decode failed, and a decode made
for a version the engine then says it does not run is made again.

A submit's answer usually comes over a second channel, straight from the engine's inference thread
(answers.py): the worker's `Inbox`, read on this loop like the link.

If the engine goes away, every call waiting on it fails with 503 at once and readiness turns false; the
supervisor (app/supervisor.py) then stops the service, so that the orchestrator restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import numpy as np

from ...core import tracing
from ...core.config import Settings
from ...core.limits import cores
from ...core.errors import ApiError, ClientGone, OverBudget, Unavailable, UnknownModel
from ..batcher import softmax
from ..facade import ImageResult, ModelView, Readiness, RouteInfo
from .answers import Inbox
from .server import State
from .shm import Arena, ArenaFull
from .wire import Link, LinkClosed
from ..memory import MemoryBudget, UploadCount
from ..dataplane import decode_all
from ..preprocess import set_max_pixels

log = logging.getLogger("effnet.worker")


def engine_gone() -> Unavailable:
    return Unavailable("the inference engine is not running; retry shortly", retry_after=1)


class RemotePlane:
    def __init__(self, settings: Settings, socket_path: str, arena: Arena, decode_pool: Executor,
                 memory: MemoryBudget, uploads: UploadCount) -> None:
        self.settings, self.socket_path, self.arena, self.decode_pool = settings, socket_path, arena, decode_pool
        # EFFNET_MAX_INFLIGHT_MB and EFFNET_MAX_UPLOADS, each shared with the other workers (memory.Shared*)
        self.memory, self.uploads = memory, uploads
        self._draining = False  # this worker is shutting down (SIGTERM)
        self._state: State | None = None
        self._views: dict[str, ModelView] = {}
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._link: Link | None = None
        self.inbox: Inbox | None = None  # direct answers from the engine's inference threads (answers.py)
        self.lost = False
        self.in_flight = 0  # RemoteCalls open in this worker: one alone asks for both stages at once (module docstring)
        self.admit_alone = True  # False: every call takes open and reserve apart (tests of those steps)
        # Called once when the link is lost while this worker is not stopping (the worker process stops itself,
        # and the supervisor starts another or, when the engine died, restarts the service); None: answer 503.
        self.on_lost: Callable[[], None] | None = None

    # --- the link --------------------------------------------------------------------------
    async def connect(self, timeout_s: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                _, self._link = await loop.create_unix_connection(
                    lambda: Link(self._on_message, self._on_lost), self.socket_path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        inbox = Inbox.listen(os.path.dirname(self.socket_path))
        self._apply(await self._call("hello", os.getpid(), self.arena.name, inbox.path if inbox else None))
        if inbox is not None:
            if inbox.accept(self._on_message):
                self.inbox = inbox
            else:
                inbox.close()

    async def close(self) -> None:
        if self._link is not None:
            self._link.close()
        if self.inbox is not None:
            self.inbox.close()

    def _on_message(self, message: tuple) -> None:
        kind = message[0]
        if kind == "state":
            self._apply(message[2])
            return
        fut = self._pending.pop(message[1], None)
        if fut is None or fut.done():
            return
        if kind == "ok":
            fut.set_result(message[2])
        else:
            fut.set_exception(message[2])

    def _on_lost(self, exc: BaseException | None) -> None:
        if not self._draining:
            if self.on_lost is not None:
                log.error("the link to the engine is closed: stopping this worker, to be started again")
                asyncio.get_running_loop().call_soon(self.on_lost)
            else:
                log.error("the link to the engine is closed: answering 503 until the service restarts")
        self.lost = True
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(engine_gone())
        self._pending.clear()

    def _apply(self, state: State) -> None:
        self._state = state
        self._views = {v.name: v for v in state.views}

    def _send(self, message: tuple) -> None:
        if self.lost or self._link is None:
            raise engine_gone()
        try:
            self._link.put(message)
        except LinkClosed:
            raise engine_gone() from None

    def _request(self, verb: str, *args: Any) -> tuple[int, asyncio.Future]:
        mid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._send(("call", mid, verb, args))
        self._pending[mid] = fut
        return mid, fut

    async def _call(self, verb: str, *args: Any) -> Any:
        return await self._request(verb, *args)[1]

    def _tell(self, verb: str, *args: Any) -> None:
        try:
            self._send(("tell", 0, verb, args))
        except Unavailable:
            pass  # nobody left to tell

    @property
    def uploading(self) -> int:
        return self.uploads.used

    # --- facade.Plane ------------------------------------------------------------------------
    @property
    def draining(self) -> bool:
        return self._draining or self.lost or (self._state is not None and self._state.readiness.draining)

    @draining.setter
    def draining(self, value: bool) -> None:
        self._draining = value

    def find(self, name: str | None) -> ModelView:
        name = name if name is not None else self.default_model()
        view = self._views.get(name) if name is not None else None
        if view is None:
            raise UnknownModel("unknown model", available=list(self._views))
        return view

    def knows(self, name: str) -> bool:
        return name in self._views

    def views(self) -> list[ModelView]:
        return list(self._views.values())

    def default_model(self) -> str | None:
        return self._state.default_model if self._state is not None else None

    def readiness(self) -> Readiness:
        if self._state is None or self.lost:
            return Readiness(False, self.draining, (), (), {"engine": "the inference engine is not running"})
        r = self._state.readiness
        if self._draining and not r.draining:
            return Readiness(False, True, r.models, r.serving, r.not_ready)
        return r

    def open(self, view: ModelView, arrived: float | None = None, timeout_s: float | None = None) -> RemoteCall:
        loop_now = asyncio.get_running_loop().time()
        return RemoteCall(self, view, loop_now if arrived is None else arrived, timeout_s)

    async def refusal(self, view: ModelView) -> ApiError | None:
        """None: in a worker the admission gate (app/api/gate.py) would cost a round trip to the engine on
        every request only to ask what `open` asks again a moment later. So the engine decides once, in
        `open` (stage one): a refused request here costs FastAPI's routing on top, which the workers share."""
        return None

    async def route_info(self) -> dict[str, RouteInfo]:
        return await self._call("route_info")

    async def index(self) -> list[dict[str, str]]:
        return await self._call("index")

    async def load(self, name: str) -> None:
        await self._call("load", name)

    async def unload(self, name: str) -> None:
        await self._call("unload", name)

    def note_auto_routed(self, name: str, budget_missed: bool) -> None:
        self._tell("note_auto_routed", name, budget_missed)

    def note_escalations(self, cascade: str, from_model: str, to_model: str, n: int) -> None:
        self._tell("note_escalations", cascade, from_model, to_model, n)

    async def metrics_text(self) -> bytes:
        return await self._call("metrics_text")

    def _close_late(self, opened: asyncio.Future) -> None:
        """An `open` answered after its client left: the engine's call is closed at once."""
        if opened.cancelled() or opened.exception() is not None:
            return  # the engine dropped it (or never opened it): nothing to close
        self._tell("close", opened.result()[0], ClientGone("the client went away"), 0)

    def _current(self, view: ModelView, fresh: ModelView | None) -> ModelView:
        """The view the engine says the call runs on: `fresh` when the engine sent one (another load of the model).
        It replaces this worker's copy only when it is a later load (revisions only grow): a call that runs on
        the version a reload replaced must not set a copy the state push already brought forward back to it."""
        if fresh is None:
            return view
        cached = self._views.get(fresh.name)
        if cached is None or (cached.revision or 0) < (fresh.revision or 0):
            self._views[fresh.name] = fresh  # ahead of the next state push
        return fresh


class RemoteCall:
    """One request's use of one model, through the engine (the worker-side twin of dataplane.Call)."""

    def __init__(self, plane: RemotePlane, view: ModelView, arrived: float, timeout_s: float | None) -> None:
        self.plane, self.view, self.arrived, self.timeout_s = plane, view, arrived, timeout_s
        self.tid: int | None = None
        self._skipped = 0
        self._alone = False  # nothing else in flight here when it began: both stages at once, later (module docstring)

    def _elapsed(self) -> float:
        return asyncio.get_running_loop().time() - self.arrived

    async def __aenter__(self) -> RemoteCall:
        plane = self.plane
        plane.in_flight += 1
        if plane.in_flight == 1 and plane.admit_alone:
            self._alone = True
            return self
        try:
            await self._open()
        except BaseException:
            plane.in_flight -= 1
            raise
        return self

    async def _open(self) -> None:
        plane = self.plane
        self._alone = False
        mid, fut = plane._request("open", self.view.name, self._elapsed(), self.timeout_s, self.view.revision)
        with tracing.span("open"):  # a round trip to the engine: stage one of admission
            await self._ticket(mid, fut)

    async def _ticket(self, mid: int, fut: asyncio.Future) -> None:
        """The engine's answer to an open (or admit): this call's ticket, and the view it runs on."""
        plane = self.plane
        try:
            self.tid, fresh = await asyncio.shield(fut)
        except asyncio.CancelledError:
            # The client left while the engine waits for room on its behalf: it stops waiting, and a call it
            # opened in the same instant is closed as soon as its answer arrives.
            plane._tell("drop", mid)
            fut.add_done_callback(plane._close_late)
            raise
        self.view = plane._current(self.view, fresh)

    async def __aexit__(self, exc_type, exc, tb) -> None:
        try:
            if self._alone and isinstance(exc, (asyncio.CancelledError, ClientGone)):
                # Its client left before the engine heard of it (during the body, say): nothing to answer, but
                # counted as one process counts a call closed that way.
                self.plane._tell("note_client_left", self.view.name, self._elapsed())
            elif self._alone and exc is not None:
                # It failed here before the engine heard of it (a body that does not parse, say): a refusal the
                # engine has (draining, not ready, full) is still the answer, and the call is counted either way.
                await self._open()
        finally:
            self.plane.in_flight -= 1
        if self.tid is None:
            return
        if isinstance(exc, (asyncio.CancelledError, ClientGone)):  # 499 in the engine's metrics, not 500
            exc = ClientGone("the client went away")
        elif exc is not None and not isinstance(exc, ApiError):
            exc = RuntimeError(type(exc).__name__)
        self.plane._tell("close", self.tid, exc, self._skipped)

    async def _reserve(self, n: int) -> ModelView:
        with tracing.span("admission", images=n):  # a round trip: queue room in the engine
            fresh = await self.plane._call("reserve", self.tid, n, self.view.revision)
        self.view = self.plane._current(self.view, fresh)
        tracing.annotate(images=n, version=self.view.version)
        return self.view

    def _admit(self, n: int) -> tuple[int, asyncio.Future]:
        """Both stages in one message (the module docstring): the request's id and the answer to come."""
        self._alone = False
        return self.plane._request("admit", self.view.name, self._elapsed(), self.timeout_s, self.view.revision, n)

    async def _admitted(self, mid: int, fut: asyncio.Future, n: int) -> ModelView:
        with tracing.span("admission", images=n):  # one round trip: both stages of admission
            await self._ticket(mid, fut)
        tracing.annotate(images=n, version=self.view.version)
        return self.view

    async def images(self, data: list[bytes]) -> list[ImageResult]:
        # Decoding early is for what one batch takes, and needs a manifest: this worker's view of a model may be
        # from before it loaded (the engine's state comes every PUSH_EVERY_S), and the engine may run it by now.
        if self._alone and self.view.manifest is not None and len(data) <= (self.view.max_batch or 1):
            return await self._images_alone(data)
        if self._alone:
            await self._open()
        view = await self._reserve(len(data))
        try:
            prepared = await self._decode(view, data)
        except asyncio.CancelledError:
            self._skipped += len(data)
            raise
        return await self._submit([p.tensor for p in prepared], [(p.decode_s, p.preprocess_s) for p in prepared])

    async def _images_alone(self, data: list[bytes]) -> list[ImageResult]:
        view, n = self.view, len(data)
        mid, fut = self._admit(n)
        decoding = asyncio.ensure_future(self._decode(view, data))
        try:
            admitted = await self._admitted(mid, fut, n)
        except BaseException:  # refused (or the client left): that is the answer, whatever the decode gives
            decoding.cancel()
            decoding.add_done_callback(_retrieve)
            raise
        try:
            prepared = await decoding
        except asyncio.CancelledError:
            self._skipped += n
            raise
        if admitted.spec.preprocess != view.spec.preprocess:  # the engine runs a version prepared differently
            prepared = await self._decode(admitted, data)
        return await self._submit([p.tensor for p in prepared], [(p.decode_s, p.preprocess_s) for p in prepared])

    async def _decode(self, view: ModelView, data: list[bytes]) -> list:
        plane = self.plane
        return await decode_all(plane.decode_pool, data, view.spec.preprocess, plane.settings.max_image_pixels,
                                plane.memory, view.name, plane.settings.max_request_pixels)

    async def tensors(self, xs: list[np.ndarray]) -> list[ImageResult]:
        if self._alone and len(xs) <= (self.view.max_batch or 1):
            await self._admitted(*self._admit(len(xs)), len(xs))
            return await self._submit(xs, None)
        if self._alone:
            await self._open()
        await self._reserve(len(xs))
        return await self._submit(xs, None)

    async def _submit(self, xs: list[np.ndarray], prep: list[tuple[float, float]] | None) -> list[ImageResult]:
        plane, view = self.plane, self.view
        arena = plane.arena
        classes = len(view.spec.labels)
        held: list[tuple[int, int]] = []  # (offset, bytes) of this call's arena space
        try:
            inputs = []
            for x in xs:
                off = arena.alloc(x.nbytes)
                held.append((off, x.nbytes))
                arena.array(off, x.shape)[...] = x
                inputs.append((off, tuple(x.shape)))
            outputs = []
            for _ in xs:
                off = arena.alloc(classes * 4)
                held.append((off, classes * 4))
                outputs.append(off)
        except ArenaFull as exc:
            _free(arena, held)
            raise OverBudget(str(exc), retry_after=1) from None
        try:
            _, fut = plane._request("submit", self.tid, inputs, outputs, prep)
        except BaseException:  # the engine is gone (503): nobody will read the space
            _free(arena, held)
            raise
        try:
            with tracing.span("submit"):  # the trip to the engine, its queue and run, and the way back
                submitted = tracing.now_ns()
                meta = await asyncio.shield(fut)
        except asyncio.CancelledError:
            # The engine may still be reading the tensors: the space goes back once it has answered.
            plane._tell("cancel", self.tid)
            fut.add_done_callback(lambda f: _abandoned(f, arena, held))
            raise
        except BaseException:
            _free(arena, held)
            raise
        try:
            logits = np.stack([arena.array(off, (classes,)) for off in outputs])
        finally:
            _free(arena, held)
        probs = softmax(logits)
        pretrained = view.spec.weights.pretrained
        d = prep or [(0.0, 0.0)] * len(xs)
        results = [
            ImageResult(view.name, probs[i], logits[i], view.spec.labels, d[i][0], d[i][1], q, inf, bs,
                        view.version, pretrained, view.provider)
            for i, (q, inf, bs) in enumerate(meta)
        ]
        tracing.batch_spans(submitted, results, model=view.name, model_version=view.version)
        return results


def _retrieve(fut: asyncio.Future) -> None:
    """A future nobody waits for any more: its outcome is read, so that asyncio does not log it as lost."""
    if not fut.cancelled():
        fut.exception()


def _abandoned(fut: asyncio.Future, arena: Arena, held: list[tuple[int, int]]) -> None:
    """The engine answered a submit nobody waits for any more: its space goes back, its answer is dropped."""
    _free(arena, held)
    _retrieve(fut)


def _free(arena: Arena, held: list[tuple[int, int]]) -> None:
    for off, n in held:
        arena.free(off, n)
    held.clear()


def decode_threads(settings: Settings, workers: int) -> int:
    """EFFNET_DECODE_WORKERS when it is set; else this worker's share of the cores (at least one), so that
    the workers' decode threads together match the CPU quota instead of each taking all of it."""
    if "decode_workers" in settings.model_fields_set:
        return settings.decode_workers
    return max(1, cores() // max(1, workers))


@contextlib.asynccontextmanager
async def remote_plane(settings: Settings, socket_path: str, arena: Arena, workers: int,
                       memory: MemoryBudget, uploads: UploadCount,
                       on_lost: Callable[[], None] | None = None) -> AsyncIterator[RemotePlane]:
    """A worker's plane for its lifetime: connected to the engine, with this worker's decode threads and the
    service's in-flight memory budget and upload count; `on_lost`: see RemotePlane.on_lost."""
    set_max_pixels(settings.max_image_pixels)
    pool = ThreadPoolExecutor(max_workers=decode_threads(settings, workers), thread_name_prefix="decode")
    plane = RemotePlane(settings, socket_path, arena, pool, memory, uploads)
    plane.on_lost = on_lost
    try:
        await plane.connect()
        yield plane
    finally:
        plane.draining = True
        await plane.close()
        pool.shutdown(wait=False, cancel_futures=True)
