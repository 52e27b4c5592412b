"""app/core/collector.py: once a process has started, its objects are left out of every later collection."""

from __future__ import annotations

import gc

from effnet_serve.core.collector import settle


def test_settle_freezes_what_startup_made_and_only_that():
    startup_made = [{"label": i} for i in range(5000)]  # stands for modules, routes, manifests
    try:
        settle()
        assert gc.get_freeze_count() >= len(startup_made)
        collectable = {id(o) for o in gc.get_objects()}  # every generation, the frozen objects left out
        assert not any(id(x) in collectable for x in startup_made)
        later = [[i] for i in range(100)]  # a request's objects stay collectable
        assert all(id(x) in {id(o) for o in gc.get_objects()} for x in later)
    finally:
        gc.unfreeze()
