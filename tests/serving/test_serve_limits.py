"""What the server reads of its container (cgroup CPU quota and memory limit), the memory budget, and the
16-bit conversion that keeps big images cheap."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from PIL import Image
from serving_helpers import encode

from effnet_serve.core import limits
from effnet_serve.core.config import Settings
from effnet_serve.core.errors import OverBudget
from effnet_serve.engine import preprocess
from effnet_serve.engine.batcher import Batcher
from effnet_serve.engine.memory import MemoryBudget
from effnet_serve.engine.registry import ModelEntry, Registry


@pytest.mark.parametrize("files, quota, memory", [
    ({"cpu.max": "150000 100000", "memory.max": "3221225472"}, 1.5, 3 << 30),  # cgroup v2, limited
    ({"cpu.max": "max 100000", "memory.max": "max"}, None, None),  # v2, unlimited
    ({"cpu/cpu.cfs_quota_us": "200000", "cpu/cpu.cfs_period_us": "100000",
      "memory/memory.limit_in_bytes": str(1 << 30)}, 2.0, 1 << 30),  # v1
    ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000",
      "memory/memory.limit_in_bytes": "9223372036854771712"}, None, None),  # v1, unlimited
    ({}, None, None),  # no cgroup files at all
])
def test_the_cgroup_says_what_the_container_may_use(tmp_path, files, quota, memory):
    for name, value in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(value + "\n")
    assert limits.cpu_quota(tmp_path) == quota
    assert limits.memory_limit(tmp_path) == memory
    cores = limits.cores(tmp_path)
    assert cores >= 1 and (quota is None or cores <= int(np.ceil(quota)))
    assert limits.default_inflight_mb(tmp_path) >= 256


def test_a_fractional_quota_rounds_up_and_never_exceeds_the_visible_cores(tmp_path):
    (tmp_path / "cpu.max").write_text("50000 100000")
    assert limits.cores(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("6400000 100000")  # 64 CPUs of quota on a smaller machine
    assert limits.cores(tmp_path) == limits.cores(tmp_path / "nothing-here")


def test_the_memory_budget_refuses_what_does_not_fit_and_takes_nothing_for_it():
    budget = MemoryBudget(100)
    budget.take(60, "a")
    with pytest.raises(OverBudget) as err:
        budget.take(41, "b")
    assert err.value.status == 503 and err.value.headers["Retry-After"] == "1"
    assert budget.used == 60
    budget.give(60)
    budget.take(100, "c")
    assert budget.peak == 100


def test_an_image_too_big_for_the_budget_is_refused_before_it_is_decoded():
    png16 = encode(Image.fromarray(np.full((1000, 1000), 1234, np.uint16)), "PNG")
    budget = MemoryBudget(1_000_000)  # a 1000x1000 16-bit image needs ~12 MB at its peak
    pp = preprocess.Preprocess(resize=36, crop=32, interpolation="bicubic", mean=[0.5] * 3, std=[0.5] * 3)
    with pytest.raises(OverBudget):
        preprocess.prepare(png16, pp, 50_000_000, budget=budget)
    assert budget.used == 0
    roomy = MemoryBudget(100_000_000)
    preprocess.prepare(png16, pp, 50_000_000, budget=roomy)
    assert roomy.used == 0 and roomy.peak >= 1000 * 1000 * 2  # charged while decoding, given back after


def test_16_bit_to_8_bit_is_exactly_round_of_v_over_257_for_every_value():
    v = np.arange(65536, dtype=np.float64)
    assert np.array_equal(preprocess._U16_TO_U8, np.rint(v / 257.0).astype(np.uint8))


def test_models_stop_in_parallel_so_several_busy_ones_fit_in_one_drain(tmp_path):
    """Model a's batch can only finish once b has been told to stop: a close that stops the models one
    after the other waits out a's whole drain first (and a's batch then fails); a parallel close does not.
    Decided by the order of events, not by how fast this machine runs."""
    a_running, b_stopping = threading.Event(), threading.Event()
    waited: dict[str, bool] = {}

    def a_model(x):
        a_running.set()
        waited["a"] = b_stopping.wait(timeout=10)
        return np.zeros((x.shape[0], 10), np.float32)

    def b_model(x):
        return np.zeros((x.shape[0], 10), np.float32)

    async def main():
        registry = Registry(Settings(repository=tmp_path))
        for name, fn in (("a", a_model), ("b", b_model)):
            b = Batcher(name, fn, max_batch=1, max_delay_s=0)
            b.start()
            registry.entries[name] = ModelEntry(name, tmp_path, status="ready", batcher=b)
        b_batcher = registry.entries["b"].batcher
        b_stop = b_batcher.stop

        async def stop_b(drain_s: float = 0.0) -> None:
            b_stopping.set()
            await b_stop(drain_s)

        b_batcher.stop = stop_b
        pending = asyncio.ensure_future(registry.entries["a"].batcher.submit([np.zeros((3, 4, 4), np.float32)]))
        assert await asyncio.to_thread(a_running.wait, 10)  # a's batch is running
        await registry.close(drain_s=2.0)
        return await asyncio.gather(pending, return_exceptions=True)

    (answer,) = asyncio.run(main())
    assert waited == {"a": True}
    assert not isinstance(answer, BaseException), answer
