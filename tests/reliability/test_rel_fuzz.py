"""Fuzzing: schemathesis against the service's own OpenAPI spec, and Hypothesis on the decode path.

schemathesis is driven through its Python API (`operation.as_strategy()` under Hypothesis's
`@given`) rather than its pytest plugin: the plugin's lazy-fixture loader reads pytest
internals that pytest 9 no longer has. Every operation is fuzzed in both generation modes
(schema-valid and schema-invalid requests) and every response goes through all of
schemathesis's checks (no 5xx, status code, content type, headers and body all as the spec
says, invalid input refused) except one, `positive_data_acceptance`: a schema-valid
`/classify` body is "any bytes", and any bytes that are not an image are rightly a 400. To
still reach the 200 path often, half of the schema-valid `/classify` cases carry a real image.

Every operation the service must have is in the spec, and every operation and generation mode
ran cases: an operation that ran none fails the test, except the schema-invalid mode of an
operation no request can be schema-invalid for (no body, no query, only any-string path
parameters: Hypothesis says Unsatisfiable).

Runs are deterministic (`derandomize`) so CI is reproducible; EFFNET_FUZZ_RANDOM=1 explores
new inputs and EFFNET_FUZZ_SCALE=4 runs four times as many.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from reliability_helpers import (
    ServerProcess,
    check_error,
    encode,
    leaks,
    real_photo,
    record,
)
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance
from schemathesis.core.failures import Failure, FailureGroup

from effnet_serve.core.errors import ImageError
from effnet_serve.engine.manifest import Preprocess
from effnet_serve.engine.preprocess import prepare

SCALE = float(os.environ.get("EFFNET_FUZZ_SCALE", "1"))
DERANDOMIZE = os.environ.get("EFFNET_FUZZ_RANDOM") != "1"
CLASSIFY_EXAMPLES = int(120 * SCALE)  # per generation mode
OTHER_EXAMPLES = int(25 * SCALE)
OIP_EXAMPLES = int(10 * SCALE)
DECODE_EXAMPLES = int(1000 * SCALE)


def _settings(n: int) -> settings:
    return settings(
        max_examples=n, deadline=None, database=None, derandomize=DERANDOMIZE, print_blob=True,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: failures are collected, not minimised
        suppress_health_check=list(HealthCheck),
    )


# --- schemathesis against /openapi.json -------------------------------------------------------
REAL_IMAGES = {fmt: encode(real_photo((120, 80)), fmt) for fmt in ("JPEG", "PNG", "WEBP")}


def _classify_positive(op):
    """Schema-valid /classify cases: half schemathesis's own bodies, half a real image (raw or
    multipart) with generated query parameters. Fixed bodies go in through `as_strategy(body=...)`:
    assigning `case.body` afterwards makes schemathesis re-validate the bytes and relabel the case."""
    real = [op.as_strategy(GenerationMode.POSITIVE, body=data, media_type=f"image/{fmt.lower()}")
            for fmt, data in REAL_IMAGES.items()]
    real.append(op.as_strategy(GenerationMode.POSITIVE, body={"file": [REAL_IMAGES["JPEG"]]}, media_type="multipart/form-data"))
    return st.one_of(op.as_strategy(GenerationMode.POSITIVE), st.one_of(real))


@pytest.fixture(scope="module")
def srv(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    env = {"EFFNET_REPOSITORY": str(tiny_repo), "EFFNET_MODELS": "tiny,tiny2", "EFFNET_DEFAULT_MODEL": "tiny",
           "EFFNET_MAX_BODY_MB": "2"}
    server = ServerProcess(env, tmp_path_factory.mktemp("fuzz") / "server.log").start()
    yield server
    server.stop()


OIP = "/v2"  # the Open Inference Protocol (KServe V2) routes: their own error shape, {"error": "<message>"}
# Operations that must be in the spec and fuzzed (a route that vanished from the OpenAPI fails here).
REQUIRED = {
    False: {"POST /classify", "GET /models", "GET /models/{name}", "GET /health/live", "GET /health/ready", "GET /metrics"},
    True: {"GET /v2", "GET /v2/health/live", "GET /v2/health/ready", "GET /v2/models/{name}", "GET /v2/models/{name}/ready",
           "POST /v2/models/{name}/infer"},
}


def _check_oip_error(response) -> None:
    ctype = response.headers.get("content-type", "")
    ctype = ctype[0] if isinstance(ctype, list) else ctype
    assert ctype.startswith("application/json"), ctype
    body = json.loads(response.content)
    assert isinstance(body.get("error"), str), body
    assert not leaks(response.content.decode("utf-8", "replace")), body


def _fuzz(srv: ServerProcess, oip: bool, other_examples: int) -> dict:
    """Fuzz every operation of /openapi.json whose path is (oip) or is not under /v2."""
    schema = schemathesis.openapi.from_url(srv.url + "/openapi.json")
    invalid_form = _operations_with_an_invalid_form(srv)
    cases: Counter = Counter()
    operations: list[str] = []
    unsatisfiable: set[tuple[str, str]] = set()
    statuses: Counter = Counter()
    failures: list[str] = []

    def campaign(op, mode, strategy, n: int):
        @_settings(n)
        @given(case=strategy)
        def run(case):
            cases[(op.label, mode.value)] += 1
            try:
                response = case.call_and_validate(base_url=srv.url, excluded_checks=[positive_data_acceptance], timeout=60)
            except (Failure, FailureGroup) as exc:
                failures.append(f"{op.label} [{mode.value}]: {exc}"[:2000])
                return
            statuses[response.status_code] += 1
            if response.status_code >= 400:
                try:  # one error shape, nothing internal in it, on every error answer
                    if oip:
                        _check_oip_error(response)
                    else:
                        check_error(response.status_code, response.headers, response.content)
                except AssertionError as exc:
                    failures.append(f"{op.label} [{mode.value}] {response.status_code}: {exc}"[:2000])

        try:
            run()
        except Unsatisfiable:
            unsatisfiable.add((op.label, mode.value))  # judged below: only an input-less operation may

    for result in schema.get_all_operations():
        op = result.ok()
        if op.path.startswith(OIP) != oip:
            continue
        operations.append(op.label)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if op.label == "POST /classify" and mode is GenerationMode.POSITIVE:
                strategy = _classify_positive(op)
            else:
                strategy = op.as_strategy(generation_mode=mode)
            campaign(op, mode, strategy, CLASSIFY_EXAMPLES if op.label == "POST /classify" else other_examples)
    server_errors = sum(n for s, n in statuses.items() if s >= 500) + sum("Server error" in f for f in failures)
    idle = [
        f"{label} [{mode.value}]" for label in operations for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        if not cases[(label, mode.value)]
        and not (mode is GenerationMode.NEGATIVE and label not in invalid_form and (label, mode.value) in unsatisfiable)
    ]
    return {"cases": cases, "statuses": statuses, "failures": failures, "server_errors": server_errors,
            "operations": set(operations), "idle": idle}


def _operations_with_an_invalid_form(srv: ServerProcess) -> set[str]:
    """Labels of the operations a schema-invalid request exists for: a request body, a query or
    header parameter, or a constrained path parameter. A path parameter that is any string (a
    model name) cannot be made invalid: every value fits."""
    spec = httpx.get(srv.url + "/openapi.json", timeout=30).json()

    def invalid_form(op: dict) -> bool:
        any_string = lambda p: p["in"] == "path" and {k: v for k, v in p["schema"].items() if k != "title"} == {"type": "string"}  # noqa: E731
        return bool(op.get("requestBody")) or any(not any_string(p) for p in op.get("parameters", []))

    return {f"{method.upper()} {path}" for path, ops in spec["paths"].items() for method, op in ops.items()
            if invalid_form(op)}


def _check_coverage(r: dict, oip: bool) -> None:
    missing = REQUIRED[oip] - r["operations"]
    assert not missing, f"operations missing from /openapi.json: {sorted(missing)}"
    assert not r["idle"], f"operations that ran no case: {r['idle']}"


def test_schemathesis_finds_no_server_error_and_no_schema_violation(srv: ServerProcess):
    r = _fuzz(srv, oip=False, other_examples=OTHER_EXAMPLES)
    cases, statuses, failures = r["cases"], r["statuses"], r["failures"]
    total = sum(cases.values())
    record("fuzz", schemathesis_cases=total, schemathesis_by_operation={f"{k[0]} [{k[1]}]": v for k, v in sorted(cases.items())},
           schemathesis_statuses={str(k): v for k, v in sorted(statuses.items())},
           schemathesis_failures=len(failures), schemathesis_server_errors=r["server_errors"])
    _check_coverage(r, oip=False)
    assert not failures, "\n\n".join(failures[:5])
    assert r["server_errors"] == 0
    assert total >= 200, cases
    assert statuses[200] > 20  # the real images did reach the model
    assert srv.alive(), srv.log()


def test_schemathesis_on_the_open_inference_protocol_routes(srv: ServerProcess):
    """The /v2 routes (app/api/v2/routes.py) fuzzed the same way: no 5xx and no schema violation."""
    r = _fuzz(srv, oip=True, other_examples=OIP_EXAMPLES)
    total = sum(r["cases"].values())
    _check_coverage(r, oip=True)
    kinds = Counter(re.findall(r"- (ST\d+ [^\n]+)", "\n".join(r["failures"])))
    record("fuzz", oip_cases=total, oip_statuses={str(k): v for k, v in sorted(r["statuses"].items())},
           oip_failures=len(r["failures"]), oip_failure_kinds=dict(kinds), oip_server_errors=r["server_errors"])
    assert r["server_errors"] == 0, r["failures"][:3]
    assert srv.alive(), srv.log()
    assert not r["failures"], f"{len(r['failures'])} schema findings on /v2: {dict(kinds)}; first: {r['failures'][0][:600]}"


# --- Hypothesis on the decode/preprocess path ---------------------------------------------------
FORMATS = ("JPEG", "PNG", "GIF", "WEBP")
SEEDS = {fmt: encode(real_photo((160, 106)), fmt) for fmt in FORMATS}
PREPROCESS = [
    Preprocess(resize=73, crop=64, interpolation="bicubic", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    Preprocess(resize=256, crop=224, interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
]
MAX_PIXELS = 50_000_000  # the server's default

# Positions are biased towards the first bytes, where the headers (sizes, modes, chunk
# lengths) live and parsers are most interesting to break.
_pos = st.one_of(st.integers(0, 96), st.integers(0, 1 << 20))
MUTATION = st.one_of(
    st.tuples(st.just("flip"), _pos, st.integers(0, 7)),
    st.tuples(st.just("set"), _pos, st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x01])),
    st.tuples(st.just("truncate"), _pos),
    st.tuples(st.just("delete"), _pos, st.integers(1, 64)),
    st.tuples(st.just("insert"), _pos, st.binary(min_size=1, max_size=32)),
    st.tuples(st.just("repeat"), _pos, st.integers(1, 512), st.integers(2, 6)),
    st.tuples(st.just("splice"), st.sampled_from(FORMATS), _pos, _pos, st.integers(1, 4096)),
)


def mutate(data: bytes, mutations: list[tuple]) -> bytes:
    b = bytearray(data)
    for m in mutations:
        n = max(len(b), 1)
        kind = m[0]
        if kind == "flip" and b:
            b[m[1] % n] ^= 1 << m[2]
        elif kind == "set" and b:
            b[m[1] % n] = m[2]
        elif kind == "truncate":
            b = b[: m[1] % n]
        elif kind == "delete":
            i = m[1] % n
            del b[i : i + m[2]]
        elif kind == "insert":
            i = m[1] % n
            b[i:i] = m[2]
        elif kind == "repeat":
            i = m[1] % n
            b[i:i] = b[i : i + m[2]] * (m[3] - 1)
        elif kind == "splice":  # a piece of another format's file dropped into this one
            other = SEEDS[m[1]]
            i, j = m[2] % n, m[3] % len(other)
            b[i : i + m[4]] = other[j : j + m[4]]
    return bytes(b)


def test_mutated_real_images_never_raise_anything_but_image_error():
    outcomes: Counter = Counter()

    @_settings(DECODE_EXAMPLES)
    @given(fmt=st.sampled_from(FORMATS), mutations=st.lists(MUTATION, min_size=1, max_size=6),
           pp=st.sampled_from(PREPROCESS))
    def run(fmt, mutations, pp):
        data = mutate(SEEDS[fmt], mutations)
        try:
            out = prepare(data, pp, MAX_PIXELS)
        except ImageError as exc:
            assert exc.status == 400
            outcomes["image_error"] += 1
            return
        # Anything else that escapes fails the test with the input that caused it.
        assert out.tensor.shape == (3, pp.crop, pp.crop) and out.tensor.dtype == np.float32
        assert np.isfinite(out.tensor).all()
        outcomes["decoded"] += 1

    try:
        run()
    finally:
        record("fuzz", decode_cases=sum(outcomes.values()), decode_image_errors=outcomes["image_error"],
               decode_decoded=outcomes["decoded"], decode_formats=list(FORMATS))
    assert sum(outcomes.values()) >= DECODE_EXAMPLES * 0.9
    assert outcomes["decoded"] and outcomes["image_error"]  # the campaign reached both sides
