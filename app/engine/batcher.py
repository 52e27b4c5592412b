"""Dynamic batching for one model: a bounded queue, one collector task, one inference thread.

Design choices, each for a failure we want to rule out:

* The queue is a deque plus an Event, not asyncio.Queue: waiting for "more items or the
  delay" is `wait_for(event.wait())`, which can time out without ever losing an item
  (a timed-out `wait_for(queue.get())` can).
* Admission is all-or-nothing per request (`submit` of several images checks room for all),
  so a multi-image request is never half queued, and a full queue is refused at once with
  `Overloaded` (-> 503 + Retry-After) instead of growing latency without bound.
* Each model owns a single-thread executor: one inference at a time per model (ORT's own
  intra-op pool parallelises inside a run), and one slow model never holds another's thread.
* Batches only take a size from `sizes` (a few fixed shapes): ORT's CPU arena and memory
  patterns then see a bounded set of shapes. With `pad=False` (CPU) the collector takes the
  largest allowed size that is available and leaves the rest for the next round, so no
  compute is spent on padding; with `pad=True` (GPU, where a bigger batch is nearly free)
  it pads up with zeros.
* Queue room is reserved before images are decoded (`reserve`), so a request that will not
  fit is refused before any decode work is spent on it, and the collector knows how many
  images are on their way. The delay is spent only while such reserved images are still
  decoding: a lone request on an idle model runs at once instead of waiting for company
  that is not coming; under load the queue fills while the previous batch runs, so
  batching needs no waiting there either. Reserved images that never arrive (the request
  failed or was cancelled) give their room back when the reservation closes.
* After a run, when requests queued during it leave a partial batch, the collector first waits (at
  most the delay, counted from the run's end) for as many images as the run just answered (images of a
  request with some still queued are not answered: a lone request split over two runs does not wait for
  itself): closed-loop
  clients answered together send again together. Without it, clients that once fall into two groups
  stay in two: each group queues during the other's run, and the model runs two half batches per round
  (measured: b0, 4 clients, 2 workers, batches of 2.2 on average and 8 ms of queueing, against 3.9 and
  1 ms with it). An empty queue at the run's end means no such wait: a lone request still runs at once.
* Cancelled futures (client went away) are dropped before the run; their slot is not
  wasted. Items that waited past the request deadline fail with `DeadlineExceeded`
  instead of spending model time on an answer nobody waits for.
* An exception from the model fails that batch's futures only; the loop carries on.
* An image may come with a hook (`done`) that the inference thread calls with its logits as soon as the
  run returns, before the loop hears of it: with worker processes, the engine answers a worker from there
  (app/engine/link/answers.py), without the two wake-ups between the run and the worker. The batch's room
  is given back before the hooks run: an answered client who sends again at once must not be refused for
  room its own answer still holds.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..core.errors import DeadlineExceeded, InferenceFailed, ShuttingDown
from .observe import BatchObserver
from .queue_room import QueueRoom, Reservation

log = logging.getLogger("effnet.batcher")

RunFn = Callable[[np.ndarray], np.ndarray]  # [n, 3, H, W] float32 -> [n, classes] logits
ImageDone = Callable[[np.ndarray, float, float, int], None]  # (logits row, queue_s, inference_s, batch size)


@dataclass
class Result:
    probs: np.ndarray  # softmax over classes, one row
    queue_s: float
    inference_s: float
    batch_size: int
    logits: np.ndarray  # the raw model output row (the V2 protocol returns it)


@dataclass
class _Item:
    x: np.ndarray
    future: asyncio.Future
    enqueued: float  # loop.time()
    enqueued_pc: float  # time.perf_counter(): uvloop's loop.time() has millisecond resolution, too coarse for queue_s
    deadline: float  # loop.time() after which the answer is no longer worth computing
    done: ImageDone | None = None  # called in the inference thread once it ran (module docstring)
    request: object | None = None  # shared by the images of one request (enqueue_reserved): who is answered


def batch_sizes(max_batch: int) -> list[int]:
    """Powers of two below max_batch, plus max_batch: 8 -> [1, 2, 4, 8]; 6 -> [1, 2, 4, 6]."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


# Smoothing of the recent inference cost per image (seconds), which the router uses to price a queue.
COST_SMOOTHING = 0.2


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float32) - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


@dataclass
class Batcher:
    name: str
    run: RunFn
    max_batch: int = 8
    max_delay_s: float = 0.005
    max_queue: int = 256
    timeout_s: float = 30.0
    pad: bool = False
    wait_always: bool = False  # EFFNET_BATCH_WAIT=always: wait the full delay even when nothing is incoming
    observer: BatchObserver = field(default_factory=BatchObserver)  # its metrics (app/engine/observe.py)

    def __post_init__(self) -> None:
        self.sizes = batch_sizes(self.max_batch)
        self._items: collections.deque[_Item] = collections.deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{self.name}")
        self._task: asyncio.Task | None = None
        self._closing = False
        self._busy = False
        self._running = 0  # images in the batch being computed: admitted, not yet answered
        # max_queue bounds every image admitted and not yet answered (queued, reserved or running), so an
        # admitted image never has more than max_queue / batch batches ahead of it.
        self.room = QueueRoom(self, self.max_queue, lambda: len(self._items) + self._running)
        self.batches_run = 0
        self._regroup: tuple[float, int] | None = None  # (end, images answered) of a run that left a partial queue
        self.per_image_s = 0.0  # recent inference seconds per image (smoothed); 0 until the first batch

    # --- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")

    async def stop(self, drain_s: float = 0.0, refusal: Callable[[], ShuttingDown] | None = None) -> None:
        """Refuse new work, give queued items up to drain_s to finish, fail the rest with `refusal()` (default:
        the server's shutdown; an unload or a reload says so instead)."""
        self._closing = True
        self.room.close(refusal)
        deadline = time.monotonic() + drain_s
        while (self._items or self._busy or self.room.reserved) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._items:
            item = self._items.popleft()
            if not item.future.done():
                item.future.set_exception(self.room.refusal())
        self.observer.depth(0)
        # A run the drain did not wait for ends in its thread, not on the loop: a drain shorter than one b7
        # batch must not stall every other model and connection of the process until that batch is done.
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)

    def warm_up(self, shape: Sequence[int]) -> None:
        """Run each batch shape once (blocking, call from a thread) so readiness means fast."""
        for n in self.sizes:
            self.run(np.zeros((n, *shape), dtype=np.float32))

    # --- admission -------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self._items)

    @property
    def queued(self) -> int:
        """Images queued, reserved or running: what a new image would wait behind."""
        return self.room.used

    def reserve(self, n: int) -> Reservation:
        """Hold queue room for the n images of one request now, or refuse them all (Overloaded)."""
        return self.room.reserve(n)

    async def submit(self, xs: Sequence[np.ndarray], arrived: float | None = None) -> list[Result]:
        """Queue every image of one request, or none of them; await all results.

        `arrived` (loop.time()) is when the request reached the server, so time spent
        decoding counts against the deadline too; default: now.
        """
        with self.reserve(len(xs)) as room:
            return await room.submit(xs, arrived)

    async def enqueue_reserved(self, xs: Sequence[np.ndarray], arrived: float | None,
                               timeout_s: float | None = None,
                               done: Sequence[ImageDone] | None = None) -> list[Result]:
        """Queue images whose room a Reservation holds (queue_room.py calls this, nobody else) and wait for
        their answers."""
        # Room reserved before stop() began is honoured while the drain runs; after it, nothing is taken.
        if self._closing and self._task is None:
            raise self.room.refusal()
        loop = asyncio.get_running_loop()
        now = loop.time()
        # The client's own deadline can only shorten the server's.
        timeout = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        deadline = (now if arrived is None else arrived) + timeout
        t = time.perf_counter()
        hooks = done if done is not None else [None] * len(xs)
        request = object()
        items = [_Item(x, loop.create_future(), now, t, deadline, hook, request) for x, hook in zip(xs, hooks, strict=True)]
        self._items.extend(items)
        self.observer.depth(len(self._items))
        self._wakeup.set()
        try:
            return list(await asyncio.gather(*(i.future for i in items)))
        except BaseException:
            # One image failed or the caller was cancelled: the siblings are not needed either.
            for i in items:
                i.future.cancel()
            raise

    def wake(self) -> None:
        """Reserved room was given back: a partial batch waiting for those images need not wait any more."""
        self._wakeup.set()

    # --- the loop --------------------------------------------------------------------
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch: list[_Item] = []
            try:
                batch = await self._collect(loop)
                if batch:
                    await self._run_batch(loop, batch)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the loop must outlive any single batch
                log.exception("batcher %s: unexpected error", self.name)
                # A bug outside the model call (a metrics hook, say) must not leave the batch's clients
                # waiting until their deadline: they get the same 500 as a failed inference.
                self._fail(batch)

    async def _collect(self, loop: asyncio.AbstractEventLoop) -> list[_Item]:
        while not self._items:
            self._wakeup.clear()
            await self._wakeup.wait()
        regroup, self._regroup = self._regroup, None
        if regroup is not None:  # the clients the last run answered, likely to send again (module docstring)
            ended, answered = regroup
            target = min(self.max_batch, len(self._items) + answered)
            await self._wait(loop, lambda: len(self._items) >= target, ended + self.max_delay_s)
        # Otherwise the delay counts from the first item's arrival, so an item that already waited
        # through the previous batch's inference is not held back again.
        await self._wait(loop, lambda: len(self._items) >= self.max_batch
                         or not (self.room.reserved > 0 or self.wait_always),
                         self._items[0].enqueued + self.max_delay_s)
        return self._take(loop.time())

    async def _wait(self, loop: asyncio.AbstractEventLoop, enough: Callable[[], bool], until: float) -> None:
        """Until `enough()` or loop time `until`, waking whenever an image arrives or reserved room is given back."""
        while not enough():
            remaining = until - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take(self, now: float) -> list[_Item]:
        live: list[_Item] = []
        expired = skipped = 0
        # Drop dead items first so they do not count towards the batch.
        while self._items and len(live) < self.max_batch:
            item = self._items.popleft()
            if item.future.done():  # cancelled: the client went away, its image is not computed
                skipped += 1
                continue
            if now > item.deadline:
                expired += 1
                item.future.set_exception(
                    DeadlineExceeded(f"request waited more than {self.timeout_s:g}s before reaching model {self.name!r}")
                )
                continue
            live.append(item)
        try:
            if live and not self.pad:
                n = max(s for s in self.sizes if s <= len(live))
                for item in reversed(live[n:]):  # back to the front of the queue, order kept
                    self._items.appendleft(item)
                live = live[:n]
            self._running = len(live)  # still admitted, now in the batch about to run
            self.room.grant()  # skipped and expired images left: room for whoever waits
        except Exception:
            # These items are off the queue and `_loop` never sees them as a batch: answer them here.
            self._fail(live)
            raise
        self._report_take(expired, skipped)
        return live

    def _fail(self, items: Sequence[_Item]) -> None:
        """A failure outside the model call: each client still waiting gets the same 500 as a failed inference."""
        for item in items:
            if not item.future.done():
                item.future.set_exception(InferenceFailed(f"inference failed for model {self.name!r}"))

    def _report_take(self, expired: int, skipped: int) -> None:
        """The metrics of a take. The items are already off the queue: a hook that raised here and reached
        `_loop` would leave the batch's clients unanswered, so its failure is logged and goes no further."""
        try:
            if expired:
                self.observer.expired(expired)
            if skipped:
                self.observer.skipped(skipped)
            self.observer.depth(len(self._items))
        except Exception:  # noqa: BLE001 - instrumentation must never cost a client its answer
            log.exception("batcher %s: a metrics hook failed", self.name)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        n = len(batch)
        started = time.perf_counter()
        self._busy = True
        try:  # the stacking too: whatever fails, the finally below frees the batch's queue room
            size = min(s for s in self.sizes if s >= n)
            # A lone image runs on its own array (with worker processes: a view of the worker's shared memory),
            # not on a copy: stacking one b0 image is ~0.06 ms of a quiet request's latency.
            x = np.ascontiguousarray(batch[0].x[None]) if n == 1 else np.stack([i.x for i in batch])
            if size > n:
                x = np.concatenate([x, np.zeros((size - n, *x.shape[1:]), dtype=x.dtype)])
            probs, seconds, logits = await loop.run_in_executor(self._executor, self._infer, x, batch, started)
        except asyncio.CancelledError:  # stop() gave up draining: nobody must wait forever
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(self.room.refusal())
            raise
        except Exception as exc:  # noqa: BLE001 - the model's failure is this batch's only
            log.error("model %s failed on a batch of %d: %s: %s", self.name, n, type(exc).__name__, exc)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(InferenceFailed(f"inference failed for model {self.name!r}"))
            return
        finally:
            self._busy = False
            self._running = 0
            self.room.grant()  # the batch's images are answered (or failed): their room is free
        self.batches_run += 1
        if 0 < len(self._items) < self.max_batch:  # requests queued during the run: see _collect
            # Answered are the images whose request is complete: a request split over runs (more images than
            # the batch took) still has images queued, and its client cannot send again before they run.
            waiting = {i.request for i in self._items}
            answered = sum(1 for i in batch if i.request is None or i.request not in waiting)
            if answered:
                self._regroup = (loop.time(), answered)
        cost = seconds / n
        self.per_image_s = cost if not self.per_image_s else (1 - COST_SMOOTHING) * self.per_image_s + COST_SMOOTHING * cost
        self.observer.ran(n, seconds)
        for row, lrow, item in zip(probs, logits, batch):
            queue_s = started - item.enqueued_pc
            self.observer.queued(queue_s)
            if not item.future.done():
                item.future.set_result(Result(row, queue_s, seconds, n, lrow))

    def _infer(self, x: np.ndarray, batch: Sequence[_Item], started: float) -> tuple[np.ndarray, float, np.ndarray]:
        t0 = time.perf_counter()
        logits = self.run(x)
        seconds = time.perf_counter() - t0
        logits = np.asarray(logits)
        if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(f"model returned shape {logits.shape} for a batch of {x.shape[0]}")
        # The batch is computed: its room is free from here (the loop only ever sets this between runs, and
        # hands the room to whoever waits for it once it hears). Then the hooks: what a client waits for.
        self._running = 0
        for item, row in zip(batch, logits):
            if item.done is not None:
                try:
                    item.done(row, started - item.enqueued_pc, seconds, len(batch))
                except Exception:  # noqa: BLE001 - a hook's failure leaves its answer to the loop
                    log.exception("batcher %s: an image's done hook failed", self.name)
        return softmax(logits[: x.shape[0]]), seconds, logits[: x.shape[0]]
