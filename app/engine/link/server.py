"""The engine's side of the link: one session per worker process, each serving the data plane's verbs.

A worker's request goes through the same `Call` as in a single process (app/engine/dataplane.py), in the
same order, one verb per step: `open` (stage one), `reserve` (stage two, before the worker decodes; `admit`
is both at once, for a worker with nothing else in flight),
`submit` (the tensors, read from the worker's arena, batched with every other worker's), `close` (status
and duration recorded once). So admission, queue room, deadlines and metrics mean what they mean in one
process, and batches form across workers.

A submit is answered by the inference thread that ran its images, straight to the worker (answers.py), unless
something went wrong; the loop then answers it here, and does every submit's bookkeeping after the answer.

A request whose client leaves is let go wherever it waits: an `open` still waiting for room is dropped
("drop"), a reserve or submit still waiting is cancelled when its call is closed, so no room is ever
granted to a call nobody will use.

What a worker holds when it dies (its link closes) is given back at once: its reservations are released,
its queued images are dropped before inference, its calls are recorded as 499, and its arena is detached.
No other worker's request is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import itertools
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from ...core.errors import ClientGone, ShuttingDown
from ..dataplane import Call, DataPlane, view_of
from ..facade import ModelView, Readiness
from .answers import Answer, Outbox
from .shm import Regions
from .wire import Link, LinkClosed, safe_exception

log = logging.getLogger("effnet.engine")

PUSH_EVERY_S = 0.05  # how stale a worker's view of readiness and models may get


class _Answered(Exception):
    """A submit the inference thread already answered (answers.py): the loop must not answer it again."""


@dataclass(frozen=True)
class State:
    """What every worker answers probes and lookups from, pushed whenever it changes."""

    readiness: Readiness
    views: tuple[ModelView, ...]
    default_model: str | None

    def key(self) -> tuple:
        """What tells two states apart (a manifest changes only with a new load: the revision)."""
        return (self.readiness, self.default_model,
                tuple((v.name, v.status, v.reason, v.version, v.provider, v.max_batch, v.batch_sizes, v.drift,
                       v.revision)
                      for v in self.views))


def state_of(plane: DataPlane) -> State:
    return State(plane.readiness(), tuple(plane.views()), plane.default_model())


@dataclass
class _Ticket:
    call: Call
    room: Any = None  # the Reservation, once reserved
    task: asyncio.Task | None = None  # the reserve or submit in progress (a close cancels it)
    answer: Answer | None = None  # the submit's, once it is queued

    def cancel(self) -> None:
        """Stop a reserve or submit that waits. A submit the inference thread answered is not waiting: its
        task only records what ran (the routing sample, the stage metrics) and must finish."""
        if self.task is not None and not (self.answer is not None and self.answer.sent):
            self.task.cancel()


def _forget_opening(opening: dict[int, asyncio.Task], mid: int, _task: asyncio.Task) -> None:
    opening.pop(mid, None)


@dataclass(eq=False)  # one per connection, kept in a set
class _Session:
    link: Link
    arena: str | None = None
    worker_pid: int | None = None
    outbox: Outbox | None = None  # the worker's answer channel (answers.py), when it has one
    tickets: dict[int, _Ticket] = field(default_factory=dict)
    tasks: set[asyncio.Task] = field(default_factory=set)
    opening: dict[int, asyncio.Task] = field(default_factory=dict)  # message id -> an `open` still waiting

    def send(self, message: tuple) -> None:
        try:
            self.link.put(message)
        except LinkClosed:
            pass  # the worker is gone; _abandon gives back what it held


class EngineServer:
    def __init__(self, plane: DataPlane, path: str) -> None:
        self.plane, self.path = plane, path
        self.regions = Regions()
        self.sessions: set[_Session] = set()
        self._ids = itertools.count(1)
        self._server: asyncio.AbstractServer | None = None
        self._pusher: asyncio.Task | None = None
        self._last_key: tuple | None = None
        self.idle = asyncio.Event()  # no worker connected
        self.idle.set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(self._connect, path=self.path)
        os.chmod(self.path, 0o600)
        self._pusher = loop.create_task(self._push_changes(), name="push-state")

    async def close(self) -> None:
        if self._pusher is not None:
            self._pusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pusher
        if self._server is not None:
            self._server.close()
        for s in list(self.sessions):
            s.link.close()

    # --- state ---------------------------------------------------------------------------
    def push(self) -> None:
        """Send the state to every worker if it changed since the last push."""
        state = state_of(self.plane)
        key = state.key()
        if key != self._last_key:
            self._last_key = key
            for s in list(self.sessions):
                s.send(("state", 0, state))

    async def _push_changes(self) -> None:
        while True:
            await asyncio.sleep(PUSH_EVERY_S)
            try:
                self.push()
            except Exception:  # noqa: BLE001 - the pusher must outlive one bad snapshot
                log.exception("could not push the state to the workers")

    # --- sessions ------------------------------------------------------------------------
    def _connect(self) -> Link:
        """A worker connected: its session lives as long as its link."""
        s: _Session

        def on_message(message: tuple) -> None:
            try:
                kind, mid, verb, args = message
            except (TypeError, ValueError):
                log.error("worker %s sent a malformed message: ending its link", s.worker_pid)
                s.link.abort()
                return
            if kind == "call":
                task = asyncio.get_running_loop().create_task(self._answer(s, mid, verb, args))
                s.tasks.add(task)
                task.add_done_callback(s.tasks.discard)
                if verb in ("open", "admit"):  # its client may leave while it waits for room: see "drop"
                    s.opening[mid] = task
                    task.add_done_callback(functools.partial(_forget_opening, s.opening, mid))
            elif kind == "tell":
                self._tell(s, verb, args)

        def on_lost(exc: BaseException | None) -> None:
            if exc is not None and not isinstance(exc, ConnectionError):
                log.error("the link to worker %s failed: %s", s.worker_pid, exc)
            self._abandon(s)
            self.sessions.discard(s)
            if not self.sessions:
                self.idle.set()

        s = _Session(Link(on_message, on_lost))
        self.sessions.add(s)
        self.idle.clear()
        return s.link

    def _abandon(self, s: _Session) -> None:
        """The worker is gone: give back everything it held (see the module docstring)."""
        for task in list(s.tasks):
            task.cancel()
        for tid in list(s.tickets):
            self._close(s, tid, ClientGone("the worker process holding the request is gone"), 0)
        if s.tickets or s.worker_pid is not None:
            log.info("worker %s left", s.worker_pid)
        if s.arena is not None:
            self.regions.detach(s.arena)
        if s.outbox is not None:
            s.outbox.close()

    async def _answer(self, s: _Session, mid: int, verb: str, args: tuple) -> None:
        try:
            # submit alone needs the message's id: the inference thread may answer it (answers.py)
            value = await (self.submit(s, *args, mid=mid) if verb == "submit" else VERBS[verb](self, s, *args))
        except _Answered:
            return
        except asyncio.CancelledError:
            s.send(("err", mid, ShuttingDown("the engine dropped the request")))
            raise
        except BaseException as exc:  # noqa: BLE001 - every failure is the caller's answer
            s.send(("err", mid, safe_exception(exc)))
            return
        try:
            s.send(("ok", mid, value))
        except Exception as exc:  # noqa: BLE001 - an answer that cannot cross: the caller must still hear
            log.exception("the answer to %s could not be sent", verb)
            s.send(("err", mid, RuntimeError(f"the engine could not send its answer to {verb}: {type(exc).__name__}")))

    def _tell(self, s: _Session, verb: str, args: tuple) -> None:
        if verb == "close":
            self._close(s, *args)
        elif verb == "cancel":
            t = s.tickets.get(args[0])
            if t is not None:
                t.cancel()
        elif verb == "drop":  # an `open` whose client left: out of the line for room (recorded as 499)
            task = s.opening.pop(args[0], None)
            if task is not None:
                if inspect.getcoroutinestate(task.get_coro()) == inspect.CORO_CREATED:  # type: ignore[arg-type]
                    # Cancelled before its first step, it never reaches _answer: the worker still hears.
                    s.send(("err", args[0], ShuttingDown("the engine dropped the request")))
                task.cancel()
        elif verb == "note_auto_routed":
            self.plane.note_auto_routed(*args)
        elif verb == "note_escalations":
            self.plane.note_escalations(*args)
        elif verb == "note_client_left":
            self.plane.note_client_left(*args)
        else:
            log.warning("worker %s sent an unknown message %r", s.worker_pid, verb)

    def _close(self, s: _Session, tid: int, exc: BaseException | None, skipped: int) -> None:
        t = s.tickets.pop(tid, None)
        if t is None:
            return
        t.cancel()  # a reserve or submit still waiting: it would hold room for nobody
        if t.room is not None:
            t.room.release()
        if skipped:
            t.call._skipped(skipped, "client_gone")
        t.call._close(exc)

    # --- verbs ---------------------------------------------------------------------------
    async def hello(self, s: _Session, worker_pid: int, arena: str, answers: str | None = None) -> State:
        """`answers`: the worker's listener for direct answers, connected before this answer leaves."""
        s.worker_pid, s.arena = worker_pid, arena
        if answers is not None and s.outbox is None:
            s.outbox = Outbox.connect(answers)
        return state_of(self.plane)

    async def open(self, s: _Session, name: str, elapsed_s: float, timeout_s: float | None, known: int | None):
        plane = self.plane
        arrived = asyncio.get_running_loop().time() - max(0.0, elapsed_s)
        call = plane.open(plane.entry(name), arrived, timeout_s)
        await call.__aenter__()  # stage one; on a refusal it records itself and raises
        tid = next(self._ids)
        s.tickets[tid] = _Ticket(call)
        return tid, self._view_unless_known(call, known)

    async def admit(self, s: _Session, name: str, elapsed_s: float, timeout_s: float | None, known: int | None, n: int):
        """open and reserve in one message, for a worker with nothing else in flight that decodes meanwhile
        (client.py, RemoteCall): the ticket, and the view if another load. A refused reservation closes the
        call here, since the worker never learns its ticket."""
        tid, _ = await self.open(s, name, elapsed_s, timeout_s, known)
        try:
            # The view of the entry the reservation holds (a reload may have moved the call on since open): None
            # when that is the worker's own, whatever open's entry was.
            return tid, await self.reserve(s, tid, n, known)
        except BaseException as exc:
            self._close(s, tid, ClientGone("the client went away") if isinstance(exc, asyncio.CancelledError) else exc, 0)
            raise

    async def reserve(self, s: _Session, tid: int, n: int, known: int | None):
        t = s.tickets[tid]
        t.task = asyncio.current_task()  # a close while it waits cancels it (its room goes back)
        try:
            t.room = await t.call.reserve(n)
        finally:
            t.task = None
        return self._view_unless_known(t.call, known)

    @staticmethod
    def _view_unless_known(call: Call, known: int | None) -> ModelView | None:
        """The model's view when the worker's copy is of another load (a reload: another version, or the same
        one with another manifest), else None. `known`: the revision of the worker's copy."""
        return None if call.entry.revision == known else view_of(call.entry)

    async def submit(self, s: _Session, tid: int, inputs: list[tuple[int, tuple]], outputs: list[int],
                     prep: list[tuple[float, float]] | None, *, mid: int | None = None):
        t = s.tickets[tid]
        call, room = t.call, t.room
        arena = s.arena
        assert arena is not None  # hello, the session's first message, named it
        xs = [self.regions.array(arena, off, shape) for off, shape in inputs]
        if s.outbox is not None and mid is not None:
            classes = len(call.entry.spec.labels)  # what the worker made room for (a model with other rows: the loop says)
            t.answer = Answer(mid, [self.regions.array(arena, off, (classes,)) for off in outputs], s.outbox)
        t.task = asyncio.current_task()
        try:
            results = await room.submit(xs, call.arrived, call._timeout(), t.answer.hooks() if t.answer else None)
        except BaseException:
            if t.answer is not None and not t.answer.claim():
                raise _Answered from None
            raise
        finally:
            t.task = None
        answered = t.answer is not None and not t.answer.claim()
        if not answered:
            classes = results[0].logits.shape[0]
            for off, r in zip(outputs, results):
                self.regions.array(arena, off, (classes,))[:] = r.logits
        if prep is not None:
            call.record_prepared(call.entry.name, prep, results)
        if answered:
            raise _Answered
        return [(r.queue_s, r.inference_s, r.batch_size) for r in results]

    async def route_info(self, s: _Session):
        return await self.plane.route_info()

    async def index(self, s: _Session):
        return await self.plane.index()

    async def load(self, s: _Session, name: str) -> None:
        await self.plane.load(name)
        self.push()  # before the answer: the asking worker sees the model as soon as it is told

    async def unload(self, s: _Session, name: str) -> None:
        await self.plane.unload(name)
        self.push()

    async def metrics_text(self, s: _Session) -> bytes:
        return await self.plane.metrics_text()

    async def view(self, s: _Session, name: str) -> ModelView:
        return self.plane.find(name)


VERBS = {name: getattr(EngineServer, name) for name in (
    "hello", "open", "admit", "reserve", "submit", "route_info", "index", "load", "unload", "metrics_text", "view",
)}
