"""Direct answers (app/engine/link/answers.py) under the interleavings that went wrong or could: a worker that
dies while its batch runs (the engine unmapped its arena under the batch and died of SIGSEGV), a channel full
while the worker does not read, a send that raises. Each scenario that may crash the engine runs in a child
process, so that a SIGSEGV is a failed assertion here and not a dead pytest. Found by a review of the code."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from test_serve_workers_link import repo  # noqa: F401

HERE = Path(__file__).resolve().parent

# A worker's link drops (SIGKILL, OOM kill, a crash) while its request's batch runs in the inference thread.
# The engine's loop gives back what the worker held (_abandon) and detaches its arena (Regions.detach). numpy
# keeps no buffer export on the SharedMemory's memoryview, so SharedMemory.close() there does not raise the
# BufferError that detach counts on: the mapping is gone at once, while the batch still holds views of it.
WORKER_DIES_MID_RUN = textwrap.dedent("""
    import asyncio, sys, threading, time
    from pathlib import Path
    import numpy as np
    from serving_helpers import write_model
    from test_serve_workers_link import engine_with_workers, settings_for, settle

    mode, tmp = sys.argv[1], Path(sys.argv[2])

    async def main():
        repo = tmp / "repo"
        write_model(repo, "fake", crop=32, resize=36)
        async with engine_with_workers(settings_for(repo), tmp) as (plane, server, (w0, _w1)):
            b = plane.registry.entries["fake"].batcher
            real, gate, running = b.run, threading.Event(), threading.Event()

            def run(x):
                if mode == "hook":
                    x = x.copy()  # the model reads nothing of the arena: only the done hooks write into it
                running.set()
                gate.wait(10)
                return real(x)

            b.run = run
            detach = server.regions.detach

            def detach_then_run(name):
                detach(name)
                if mode == "hook":  # the run ends before the loop's next turn (a busy loop: other sessions' work)
                    gate.set()
                    time.sleep(0.5)

            server.regions.detach = detach_then_run
            x = np.ones((3, 32, 32), np.float32)
            n = 2 if mode == "hook" else 1

            async def request():
                async with w0.open(w0.find("fake")) as call:
                    return await call.tensors([x] * n)

            task = asyncio.ensure_future(request())
            await asyncio.get_running_loop().run_in_executor(None, running.wait)
            w0._link.abort()  # as a SIGKILL would leave the socket
            await settle(lambda: len(server.sessions) == 1)
            gate.set()
            await asyncio.sleep(0.5)
            try:
                await task
            except Exception:
                pass
            print("engine survived", flush=True)

    asyncio.run(main())
""")


def _worker_dies_mid_run(mode: str, tmp_path: Path) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    # From the root, as the suite runs: in a mutation copy, mutmut's trampolines find their configuration there.
    return subprocess.run([sys.executable, "-c", WORKER_DIES_MID_RUN, mode, str(tmp_path)], env=env, cwd=HERE.parent.parent,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("mode", ["lone", "hook"])
def test_a_worker_that_dies_while_its_batch_runs_does_not_crash_the_engine(mode, tmp_path):
    """lone: a lone image runs on a view of the worker's arena; the worker dies during the run, the loop detaches
    the arena, and ONNX Runtime reads unmapped memory. hook: the run ends in the moment between the detach and
    the loop's claim (the submit task's next step), and Answer._image_done writes the logits into unmapped memory."""
    proc = _worker_dies_mid_run(mode, tmp_path)
    assert proc.returncode == 0 and "engine survived" in proc.stdout, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])


def test_regions_detach_keeps_the_mapping_while_an_array_still_points_into_it():
    """With numpy 2, np.ndarray(buffer=shm.buf) holds no buffer export, so SharedMemory.close() succeeded under a
    live array; the views are made with np.frombuffer (shm.float32_view), which holds one."""
    import os

    from effnet_serve.engine.link.shm import Arena, Regions

    owner = Arena(f"effnet-shm-test{os.getpid()}-review", 4096)
    try:
        regions = Regions()
        view = regions.array(owner.name, 64, (4,))
        shm = regions._maps[owner.name]
        regions.detach(owner.name)
        assert shm._mmap is not None, "the engine's mapping was closed while `view` still points into it"
        del view
    finally:
        owner.close()


def test_a_worker_that_reads_its_answers_late_still_gets_every_one(repo, tmp_path):  # noqa: F811
    """Backpressure: the worker's loop does not read its channel while many images are answered; once the
    channel's buffer is full the inference thread must neither block nor drop an answer: the loop answers
    over the link instead. Every call gets its answer (and its arena space back) once the worker reads again."""
    import socket

    from test_serve_workers_link import engine_with_workers, settings_for, settle

    async def main():
        s = settings_for(repo, max_queue=256, max_batch=8)
        async with engine_with_workers(s, tmp_path) as (plane, server, (w0, _w1)):
            session = next(t for t in server.sessions if t.arena == w0.arena.name)
            session.outbox._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # the kernel's minimum
            sends, send = [], session.outbox.send
            session.outbox.send = lambda m: (sends.append(ok := send(m)), ok)[1]
            loop = asyncio.get_running_loop()
            loop.remove_reader(w0.inbox._conn.fileno())  # the worker is busy elsewhere
            x = np.ones((3, 32, 32), np.float32)

            async def one(i):
                async with w0.open(w0.find("fake")) as call:
                    return await call.tensors([x * i])

            tasks = [asyncio.ensure_future(one(i)) for i in range(40)]
            await settle(lambda: False in sends and sum(sends) > 0 and len(sends) == 40)
            loop.add_reader(w0.inbox._conn.fileno(), w0.inbox._read)
            results = await asyncio.wait_for(asyncio.gather(*tasks), 20)
            assert len(results) == 40 and w0.inbox.received == sum(sends)
            await settle(lambda: w0.arena.used == 0 and not session.tickets)

    asyncio.run(main())


def test_a_send_that_raises_leaves_the_answer_to_the_loop(repo, tmp_path):  # noqa: F811
    """Outbox.send returns False for what it foresees (OSError, too big); anything else it raises (a bug, a
    MemoryError while pickling) escapes _image_done with the Answer still claimed by the thread: the loop
    then believes it answered, and the worker waits for ever."""
    from test_serve_workers_link import engine_with_workers, settings_for

    async def main():
        async with engine_with_workers(settings_for(repo), tmp_path) as (plane, server, (w0, _w1)):
            session = next(t for t in server.sessions if t.arena == w0.arena.name)

            def broken(message):
                raise RuntimeError("a bug in the send")

            session.outbox.send = broken
            x = np.ones((3, 32, 32), np.float32)
            async with w0.open(w0.find("fake")) as call:
                (r,) = await asyncio.wait_for(call.tensors([x]), 10)
            assert r.batch_size == 1

    asyncio.run(main())


def test_a_detached_arena_is_unmapped_once_its_last_array_is_gone():
    import os

    from effnet_serve.engine.link.shm import Arena, Regions

    owner = Arena(f"effnet-shm-test{os.getpid()}-review2", 4096)
    other = Arena(f"effnet-shm-test{os.getpid()}-review3", 4096)
    try:
        regions = Regions()
        view = regions.array(owner.name, 64, (4,))[None]  # a view of the view, as the batcher makes
        shm = regions._maps[owner.name]
        regions.detach(owner.name)
        assert shm._mmap is not None and regions._lingering == [shm]  # before a write that would crash otherwise
        view[:] = 3  # still mapped
        del view
        regions.array(other.name, 0, (4,))  # the next use of the regions unmaps it
        assert shm._mmap is None and regions._lingering == []
    finally:
        owner.close()
        other.close()


def test_a_workers_arena_is_not_unmapped_under_an_array_either():
    """The worker's own arena takes the same view (Arena.array): closing it while a request's array still points
    into it leaves the mapping to that array, instead of unmapping memory the array will write to."""
    import os

    from effnet_serve.engine.link.shm import Arena

    arena = Arena(f"effnet-shm-test{os.getpid()}-own", 4096)
    view = arena.array(128, (2, 4))
    arena.close()
    assert arena.shm._mmap is not None, "closed under a live array"
    view[:] = 1.0  # still mapped: no SIGSEGV
    assert view.sum() == 8.0
    del view
    arena.shm.close()
