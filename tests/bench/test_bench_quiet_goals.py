"""`make bench-quiet`'s verdicts (benchmarks/quiet.py): each goal of issue 27 judged from the medians it names.
The run itself is `python -m benchmarks.quiet --quick` (about 80 s, not part of `make test`)."""

from __future__ import annotations

from benchmarks.quiet import SERVERLESS, SERVICE, goals, render


def _result(p50_1: float, p99_1: float, p50_4: float) -> dict:
    def case(key: str, clients: int, p50: dict, p99: dict) -> dict:
        return {"model": "b0", "case": key, "clients": clients, "p50_ms": p50, "p99_ms": p99, "img_per_s": {}, "windows": {}}

    return {"cases": [case("http 1", 1, {SERVICE: p50_1, SERVERLESS: 10.0}, {SERVICE: p99_1, SERVERLESS: 12.0}),
                      case("http 4", 4, {SERVICE: p50_4, SERVERLESS: 20.0}, {SERVICE: 30.0, SERVERLESS: 22.0}),
                      {**case("http 32", 32, {}, {}), "img_per_s": {SERVICE: 100.0, "service, no spinning": 90.0}}],
            "workers": 2, "seconds": 1.0, "machine": {"cpu": "x", "cores": 2}, "rounds": 2, "window_s": 5.0}


def test_each_goal_is_met_at_its_bound_and_missed_past_it():
    met = goals(_result(11.5, 15.0, 26.0))  # 1.15x, p99 1.5x the serverless median, 1.3x
    assert [line.count("**met**") for line in met] == [2, 1]
    missed = goals(_result(11.6, 15.1, 26.1))
    assert [line.count("**missed**") for line in missed] == [2, 1]


def test_the_block_has_a_row_per_latency_case_and_the_spinning_line():
    block = render(_result(12.0, 20.0, 25.0))
    assert block.startswith("<!-- quiet -->") and block.endswith("<!-- /quiet -->")
    assert "| b0 | http 1 client | 12.0 / 20.0 |" in block and "| b0 | http 4 clients | 25.0 / 30.0 |" in block
    assert "spinning within runs 100.0, off 90.0 (1.11×)" in block
