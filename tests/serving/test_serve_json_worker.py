"""The worker process for big /v2 JSON bodies (app/api/v2/json_worker.py), on its own."""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.connection
import os
import signal

import numpy as np
import pytest
from serving_helpers import write_model

from effnet_serve.api.v2.codec import parse_infer
from effnet_serve.api.v2.json_worker import IN_PROCESS_BYTES, JsonWorker, json_bytes
from effnet_serve.core.errors import ApiError, Unavailable
from effnet_serve.engine.manifest import load_manifest


def _body(n: int, seed: int = 0) -> tuple[bytes, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)
    return json.dumps({"id": "r1", "inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32",
                                               "data": x.tolist()}]}).encode(), x


@pytest.fixture
def worker():
    w = JsonWorker()
    yield w
    w.close()


@pytest.fixture
def manifest(tmp_path):
    return load_manifest(write_model(tmp_path, "fake", crop=32, resize=36))


def test_json_bytes_is_the_header_part_of_the_body():
    assert json_bytes(b"x" * 10, None) == 10
    assert json_bytes(b"x" * 10, "4") == 4
    assert json_bytes(b"x" * 10, "40") == 10
    assert json_bytes(b"x" * 10, "four") == 0


def test_a_big_body_is_parsed_in_the_worker_exactly_as_in_process(worker, manifest):
    body, x = _body(16)
    assert len(body) > IN_PROCESS_BYTES
    inp = worker.parse(body, None, manifest, 64, 4 << 20)
    assert worker._pool is not None  # it went to the worker
    np.testing.assert_array_equal(np.stack(inp.tensors), x)
    here = parse_infer(body, None, manifest, 64, 4 << 20)
    assert inp.request["id"] == "r1" and "data" not in inp.request["inputs"][0]  # only arrays came back
    assert [o.name for o in inp.outputs] == [o.name for o in here.outputs]


def test_a_small_body_never_starts_the_worker(worker, manifest):
    body, x = _body(1)
    assert len(body) <= IN_PROCESS_BYTES
    np.testing.assert_array_equal(worker.parse(body, None, manifest, 64, 4 << 20).tensors[0], x[0])
    assert worker._pool is None


def test_a_protocol_error_crosses_from_the_worker_with_its_status(worker, manifest):
    body, _ = _body(16)
    with pytest.raises(ApiError) as caught:
        worker.parse(body, None, manifest, 8, 4 << 20)  # 16 images, at most 8
    assert caught.value.status == 400 and "at most 8 images" in caught.value.message


def test_a_dead_worker_is_a_503_and_the_next_body_gets_a_new_one(worker, manifest):
    body, x = _body(16)
    worker.parse(body, None, manifest, 64, 4 << 20)
    for pid in list(worker._pool._processes):
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(Unavailable):
        worker.parse(body, None, manifest, 64, 4 << 20)
    np.testing.assert_array_equal(np.stack(worker.parse(body, None, manifest, 64, 4 << 20).tensors), x)


def test_close_leaves_no_worker_process_behind_even_one_that_cannot_take_the_stop(worker, manifest):
    """A front end must exit on SIGTERM, and multiprocessing joins every child at exit: a worker that never
    takes the executor's stop sentinel (here: stopped, as one was under a flood) is killed, not waited for."""
    body, _ = _body(16)
    worker.parse(body, None, manifest, 64, 4 << 20)
    processes = list(worker._pool._processes.values())
    for p in processes:
        os.kill(p.pid, signal.SIGSTOP)
    worker.close()
    # Each process's sentinel is ready once it has died, whoever reaps it: the executor's own thread joins
    # these processes too, and is_alive() reads "alive" when that thread reaped it first (seen once in CI).
    try:
        for p in processes:
            assert multiprocessing.connection.wait([p.sentinel], timeout=10), "the JSON worker outlived close()"
    finally:  # a failure must not leave a stopped child for pytest's exit to wait on forever
        for p in processes:
            if p.exitcode is None:
                p.kill()


def _own_a_parser(conn) -> None:
    """A front end that has started its JSON parser process, then waits to be killed."""
    import time

    pool = JsonWorker()._running_pool()
    conn.send(pool.submit(os.getpid).result(timeout=60))
    time.sleep(300)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie waits only for its parent to read it
    except FileNotFoundError:
        return True


def test_the_parser_process_ends_with_its_front_end_even_an_oom_killed_one():
    """A front end killed by SIGKILL (the OOM killer's signal) runs no shutdown: its parser process once lived on
    for good, waiting on a queue whose write end it held itself. It asks the kernel to end it with its parent."""
    import time

    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    front_end = ctx.Process(target=_own_a_parser, args=(theirs,))
    front_end.start()
    try:
        assert ours.poll(60), "the parser process did not start"
        parser = ours.recv()
        assert parser != front_end.pid and not _gone(parser)
    finally:
        os.kill(front_end.pid, signal.SIGKILL)
        front_end.join(10)
    deadline = time.monotonic() + 15
    while not _gone(parser) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = not _gone(parser)
    if alive:
        os.kill(parser, signal.SIGKILL)
    assert not alive, "the parser process outlived its killed front end"
