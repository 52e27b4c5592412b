"""A V2 FP32 input given as JSON `data` holds numbers only: a null or a string is the client's error (400),
not a value numpy would make of it (NaN, which came back as an answer of nulls with 200; a parsed number).
Booleans are refused when they are all there is; one among numbers is read as 0 or 1, since Python's JSON
parser gives no way to tell it from the integer without walking every value in Python."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from effnet_serve.api.v2.codec import parse_infer
from effnet_serve.core.errors import ApiError
from effnet_serve.engine.manifest import load_manifest


@pytest.fixture(scope="module")
def manifest(tiny_repo: Path):
    return load_manifest(tiny_repo / "tiny")


def body(data) -> bytes:
    return json.dumps({"inputs": [{"name": "images", "shape": [1, 3, 64, 64], "datatype": "FP32", "data": data}]}).encode()


N = 3 * 64 * 64


@pytest.mark.parametrize("data", [[None] * N, [0.5] * (N - 1) + [None], ["1.5"] * N, [0.5] * (N - 1) + ["1.5"],
                                  [True] * N], ids=["nulls", "one null", "strings", "one string", "booleans"])
def test_data_that_is_not_a_number_is_a_400(manifest, data):
    with pytest.raises(ApiError) as caught:
        parse_infer(body(data), None, manifest, 8)
    assert caught.value.status == 400 and "must hold numbers" in caught.value.message


def test_numbers_flat_or_nested_ints_or_floats_are_taken_as_float32(manifest):
    x = np.random.default_rng(3).standard_normal((1, 3, 64, 64)).astype(np.float32)
    for data in (x.tolist(), x.reshape(-1).tolist()):
        rows = parse_infer(body(data), None, manifest, 8).tensors
        assert len(rows) == 1 and rows[0].dtype == np.float32
        np.testing.assert_array_equal(rows[0], x[0])
    rows = parse_infer(body([1] * N), None, manifest, 8).tensors  # JSON integers are numbers too
    assert rows[0].dtype == np.float32 and (rows[0] == 1.0).all()
