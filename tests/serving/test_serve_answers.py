"""Submit answers sent from the engine's inference thread straight to the worker (app/engine/link/answers.py):
the channel itself, the claim that lets exactly one side answer, the batcher's hook, and the whole path
through a real EngineServer and RemotePlanes (as in test_serve_workers_link.py)."""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
import threading

import numpy as np
import pytest

from effnet_serve.engine.batcher import Batcher
from effnet_serve.engine.link.answers import MAX_DATAGRAM, Answer, Inbox, Outbox
from serving_helpers import encode, photo
from test_serve_workers_link import _classify, engine_with_workers, repo, settings_for, settle  # noqa: F401


class Recorder:
    """An Outbox that keeps what it sends, or refuses it all."""

    def __init__(self, refuse: bool = False) -> None:
        self.sent: list[tuple] = []
        self.refuse = refuse

    def send(self, message: tuple) -> bool:
        if self.refuse:
            return False
        self.sent.append(message)
        return True


def _answer(n: int, outbox) -> tuple[Answer, list[np.ndarray]]:
    outputs = [np.full(4, -1.0, np.float32) for _ in range(n)]
    return Answer(7, outputs, outbox), outputs


def test_the_thread_answers_once_every_image_of_the_call_has_run():
    out = Recorder()
    answer, outputs = _answer(2, out)
    first, second = answer.hooks()
    second(np.arange(4, dtype=np.float32), 0.002, 0.01, 3)
    assert out.sent == [] and not answer.sent  # one image still to come
    first(np.ones(4, np.float32), 0.001, 0.02, 2)
    assert out.sent == [("ok", 7, [(0.001, 0.02, 2), (0.002, 0.01, 3)])]
    np.testing.assert_array_equal(outputs[1], np.arange(4))
    assert answer.sent and not answer.claim()  # the loop must not answer again


def test_once_the_loop_claimed_the_thread_writes_nothing_and_sends_nothing():
    """The loop answers an error or a cancellation; the worker may then reuse the arena space at once."""
    out = Recorder()
    answer, outputs = _answer(1, out)
    assert answer.claim()
    answer.hooks()[0](np.ones(4, np.float32), 0.0, 0.01, 1)
    assert out.sent == [] and not answer.sent
    np.testing.assert_array_equal(outputs[0], np.full(4, -1.0))


def test_a_refused_send_or_a_row_of_another_shape_leaves_the_answer_to_the_loop():
    answer, _ = _answer(1, Recorder(refuse=True))
    answer.hooks()[0](np.ones(4, np.float32), 0.0, 0.01, 1)
    assert not answer.sent and answer.claim()
    out = Recorder()
    answer, outputs = _answer(1, out)
    answer.hooks()[0](np.ones(5, np.float32), 0.0, 0.01, 1)  # the model has other rows than the worker made room for
    assert out.sent == [] and answer.claim()
    np.testing.assert_array_equal(outputs[0], np.full(4, -1.0))


def test_the_channel_carries_whole_messages_and_refuses_what_does_not_fit(tmp_path):
    async def main():
        inbox = Inbox.listen(str(tmp_path))
        assert inbox is not None
        outbox = Outbox.connect(inbox.path)
        assert outbox is not None
        got: list[tuple] = []
        assert inbox.accept(got.append)
        assert not (tmp_path / inbox.path).exists()  # the listener is gone once the engine is in
        left: list[int] = []  # sends from 4 threads at once, none read meanwhile: a full buffer refuses some

        def sender(i: int) -> None:
            left.extend(i * 100 + k for k in range(100) if outbox.send(("ok", i * 100 + k, [k] * 50)))

        threads = [threading.Thread(target=sender, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not outbox.send(("ok", 1, b"x" * MAX_DATAGRAM))  # nothing of it leaves
        assert len(left) >= 50
        await settle(lambda: len(got) == len(left))
        await asyncio.sleep(0.05)
        assert sorted(m[1] for m in got) == sorted(left)  # each whole, none twice, none that was refused
        assert all(m[2] == [m[1] % 100] * 50 for m in got) and inbox.received == len(left)
        outbox.close()
        assert not outbox.send(("ok", 2, None))  # a closed channel refuses, and the loop answers
        inbox.close()

    asyncio.run(main())


def test_a_message_of_the_largest_size_crosses_whole(tmp_path):
    async def main():
        inbox = Inbox.listen(str(tmp_path))
        outbox = Outbox.connect(inbox.path)
        got: list[tuple] = []
        assert inbox.accept(got.append)
        base = len(pickle.dumps(("ok", 1, b""), protocol=pickle.HIGHEST_PROTOCOL))
        payload = b"y" * (MAX_DATAGRAM - base - 8)  # the length prefix of bytes grows past 255 and 65535
        while len(pickle.dumps(("ok", 1, payload), protocol=pickle.HIGHEST_PROTOCOL)) < MAX_DATAGRAM:
            payload += b"y"
        assert len(pickle.dumps(("ok", 1, payload), protocol=pickle.HIGHEST_PROTOCOL)) == MAX_DATAGRAM
        assert outbox.send(("ok", 1, payload))
        await settle(lambda: got == [("ok", 1, payload)])
        outbox.close()
        inbox.close()

    asyncio.run(main())


def test_the_listener_is_private_and_an_engine_that_never_connects_leaves_nothing_behind(tmp_path):
    async def main():
        inbox = Inbox.listen(str(tmp_path))
        assert (os.stat(inbox.path).st_mode & 0o777) == 0o600
        assert not inbox.accept(lambda m: None)  # at once: no connection is waiting
        assert not os.path.exists(inbox.path)
        inbox.close()  # after a failed accept too

    asyncio.run(main())


def test_the_reader_stops_when_the_engine_goes_or_its_socket_fails_and_on_close(tmp_path):
    async def main():
        loop = asyncio.get_running_loop()
        inbox = Inbox.listen(str(tmp_path))
        outbox = Outbox.connect(inbox.path)
        assert inbox.accept(lambda m: None)
        fd = inbox._conn.fileno()
        outbox.close()  # the engine is gone: end of stream
        await settle(lambda: inbox._loop is None)
        assert not loop.remove_reader(fd)  # nothing reads the socket any more
        inbox.close()

        inbox = Inbox.listen(str(tmp_path))
        outbox = Outbox.connect(inbox.path)
        assert inbox.accept(lambda m: None)
        fd = inbox._conn.fileno()
        inbox.close()
        assert not loop.remove_reader(fd)
        outbox.close()

        a, b = socket.socketpair()

        class Failing:  # a socket whose read fails (a reset): stop reading, do not spin on it
            def recv(self, n: int) -> bytes:
                raise ConnectionResetError

            def fileno(self) -> int:
                return a.fileno()

        inbox = Inbox.listen(str(tmp_path))
        inbox._drop_listener()
        inbox._conn, inbox._loop = Failing(), loop
        loop.add_reader(a.fileno(), inbox._read)
        inbox._read()
        assert inbox._loop is None and not loop.remove_reader(a.fileno())
        a.close()
        b.close()

    asyncio.run(main())


def test_an_unreadable_datagram_is_skipped_and_the_next_one_read(tmp_path, caplog):
    async def main():
        inbox = Inbox.listen(str(tmp_path))
        outbox = Outbox.connect(inbox.path)
        got: list[tuple] = []
        assert inbox.accept(got.append)
        outbox._sock.send(b"not a pickle")
        assert outbox.send(("ok", 5, None))
        await settle(lambda: got == [("ok", 5, None)])
        assert inbox.received == 1 and caplog.messages.count("an unreadable answer from the engine") == 1
        outbox.close()
        inbox.close()

    asyncio.run(main())


def test_a_worker_whose_listener_the_engine_cannot_reach_is_answered_over_the_link(tmp_path, caplog):
    """And the operator reads why in the log: the path and the system's reason."""
    inbox = Inbox.listen(str(tmp_path))
    assert inbox is not None
    inbox.close()
    assert Outbox.connect(inbox.path) is None
    assert f"no direct answer channel to {inbox.path} ([Errno 2] No such file or directory): answers go over the link" \
        in caplog.messages
    assert Inbox.listen(str(tmp_path / ("x" * 120))) is None  # over a Unix socket path's 108 bytes
    assert "no direct answer channel (AF_UNIX path too long): answers go over the link" in caplog.messages


def test_the_batchers_hook_runs_in_the_inference_thread_before_the_loop_hears():
    seen: list[tuple] = []

    async def main():
        loop_thread = threading.get_ident()
        b = Batcher("m", lambda x: x.reshape(len(x), -1)[:, :3] * 2, max_batch=4, max_delay_s=0.001)
        b.start()
        try:
            x = np.arange(12, dtype=np.float32).reshape(3, 2, 2)
            with b.reserve(1) as room:
                fut = asyncio.ensure_future(room.submit([x], None, None, [lambda *a: seen.append((threading.get_ident(), fut.done(), *a))]))
                (r,) = await fut
        finally:
            await b.stop()
        (thread, done_then, row, queue_s, inference_s, size), = seen
        assert thread != loop_thread and not done_then
        np.testing.assert_array_equal(row, r.logits)
        assert (queue_s, inference_s, size) == (pytest.approx(r.queue_s), r.inference_s, 1)

    asyncio.run(main())


def test_a_hook_that_fails_is_logged_and_its_image_is_answered_by_the_loop(caplog):
    def broken(*_):
        raise RuntimeError("a bug in a hook")

    async def main():
        b = Batcher("m", lambda x: x.reshape(len(x), -1)[:, :3], max_batch=2, max_delay_s=0.001)
        b.start()
        try:
            with b.reserve(1) as room:
                (r,) = await room.submit([np.ones((3, 2, 2), np.float32)], None, None, [broken])
        finally:
            await b.stop()
        np.testing.assert_array_equal(r.logits, np.ones(3))

    asyncio.run(main())
    assert "batcher m: an image's done hook failed" in caplog.messages


def test_a_hook_for_each_image_or_none_at_all():
    """A request's hooks and images pair one to one: one missing would leave an image without an answer."""

    async def main():
        b = Batcher("m", lambda x: x.reshape(len(x), -1)[:, :3], max_batch=2, max_delay_s=0.001)
        b.start()
        try:
            with b.reserve(2) as room:
                with pytest.raises(ValueError):
                    await room.submit([np.ones((3, 2, 2), np.float32)] * 2, None, None, [lambda *a: None])
        finally:
            await b.stop()

    asyncio.run(main())


def test_a_lone_image_runs_on_its_own_array_not_a_copy():
    """With worker processes the array is a view of the worker's shared memory: a copy is ~0.06 ms of a quiet
    b0 request. Several images are stacked into one batch."""
    seen: list[np.ndarray] = []
    xs = [np.full((3, 2, 2), i, np.float32) for i in range(3)]

    async def main():
        b = Batcher("m", lambda x: (seen.append(x), x.reshape(len(x), -1)[:, :3])[1], max_batch=2, max_delay_s=0.001)
        b.start()
        try:
            with b.reserve(1) as room:
                await room.submit(xs[:1])
            with b.reserve(2) as room:
                await room.submit(xs[1:])
        finally:
            await b.stop()

    asyncio.run(main())
    assert np.shares_memory(seen[0], xs[0]) and seen[0].shape == (1, 3, 2, 2)
    assert seen[1].shape == (2, 3, 2, 2) and not np.shares_memory(seen[1], xs[1])


def test_the_batchs_room_is_free_when_its_answers_leave():
    """An answered client may send again at once: with the queue full of its own batch, it must find room, though
    the loop has not heard of the run yet."""
    used: list[int] = []

    async def main():
        b = Batcher("m", lambda x: x.reshape(len(x), -1)[:, :3], max_batch=2, max_queue=2, max_delay_s=0.001)
        b.start()
        try:
            with b.reserve(2) as room:
                await room.submit([np.ones((3, 2, 2), np.float32)] * 2, None, None,
                                  [lambda *a: used.append(b.room.used)] * 2)
        finally:
            await b.stop()

    asyncio.run(main())
    assert used == [0, 0]


def test_a_lone_request_is_answered_from_the_inference_thread_and_recorded_as_before(repo, tmp_path):  # noqa: F811
    """Through a real engine and worker: the submit's answer comes over the channel, the engine's loop does
    not answer it again, and what it records (the 200, the routing sample, the arena space) is as before.
    With the channel refusing, the loop answers, the same."""
    jpeg = encode(photo((120, 90), seed=8))

    async def main():
        async with engine_with_workers(settings_for(repo), tmp_path) as (plane, server, (w0, _w1)):
            session = next(s for s in server.sessions if s.arena == w0.arena.name)
            put, told = session.link.put, []
            session.link.put = lambda m: (told.append(m[0]), put(m))[1]
            (direct,) = await _classify(w0, [jpeg])
            assert w0.inbox is not None and w0.inbox.received == 1
            await settle(lambda: plane.metrics.requests.labels("fake", "200")._value.get() == 1)
            assert told.count("ok") == 1  # the admit's answer; the submit's went over the channel
            await settle(lambda: len(plane.stats.fresh("fake")) == 1 and not session.tickets)
            session.outbox.send = lambda message: False  # a full channel, say
            (linked,) = await _classify(w0, [jpeg])
            assert w0.inbox.received == 1 and told.count("ok") == 3
            np.testing.assert_array_equal(direct.logits, linked.logits)
            assert direct.batch_size == linked.batch_size == 1 and direct.inference_s > 0
            await settle(lambda: plane.metrics.requests.labels("fake", "200")._value.get() == 2)
            await settle(lambda: not session.tickets and w0.arena.used == 0)
            assert plane.inflight["fake"] == 0 and len(plane.stats.fresh("fake")) == 2

    asyncio.run(main())

