"""message_limits.count_objects: the objects a gRPC request would parse into, counted from its bytes, against
the parser itself (protobuf, through tritonclient's generated classes) on real requests."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from effnet_serve.api.grpc.message_limits import Malformed, count_objects
from effnet_serve.core.errors import BadRequest

INFER = pb.ModelInferRequest.DESCRIPTOR


def test_real_requests_count_their_strings_tensors_and_sub_messages_at_every_depth():
    raw = pb.ModelInferRequest(model_name="b0", id="7")
    raw.inputs.add(name="images", datatype="FP32", shape=[8, 3, 224, 224])
    raw.raw_input_contents.append(np.zeros((8, 3, 224, 224), "<f4").tobytes())
    raw.outputs.add(name="logits").parameters["classification"].int64_param = 5
    # model_name, id; input, its name, datatype and packed shape; the raw tensor; output, its name, its
    # parameter's map entry, the entry's key and its value message
    assert count_objects(raw.SerializeToString(), INFER, 100) == 12

    typed = pb.ModelInferRequest(model_name="b0")
    tensor = typed.inputs.add(name="images", datatype="FP32", shape=[1, 3, 224, 224])
    tensor.contents.fp32_contents.extend(np.ones(3 * 224 * 224, np.float32))  # one packed array, one object
    assert count_objects(typed.SerializeToString(), INFER, 100) == 7

    jpegs = pb.ModelInferRequest(model_name="b0")
    jpegs.inputs.add(name="images", datatype="BYTES", shape=[256]).contents.bytes_contents.extend([b"\xff" * 99] * 256)
    assert count_objects(jpegs.SerializeToString(), INFER, 1024 + 2 * 256) == 256 + 6


def test_past_the_limit_it_is_a_bad_request_without_reading_the_rest():
    many = pb.ModelInferRequest(model_name="b0")
    for _ in range(50):
        many.inputs.add()
    raw = many.SerializeToString()
    assert count_objects(raw, INFER, 51) == 51
    with pytest.raises(BadRequest, match="more than 50 strings, tensors and sub-messages"):
        count_objects(raw, INFER, 50)


def test_scalars_make_no_object_each_packed_or_not():
    unpacked = b"".join(b"\x18" + bytes([i]) for i in range(60))  # 60 varints as field 3 of an input (shape)
    message = b"\x2a" + bytes([len(unpacked)]) + unpacked  # inside one `inputs` entry (field 5)
    assert pb.ModelInferRequest.FromString(message).inputs[0].shape[59] == 59  # the parser reads it so too
    assert count_objects(message, INFER, 10) == 1


@pytest.mark.parametrize("raw", [
    b"\x0a\x05ab",  # a string longer than what is left
    b"\x0b",  # a group: not proto3
    b"\xff" * 12,  # a varint of more than 64 bits
    b"\x2a\x02\x2a\x7f",  # a sub-message whose own field runs past its end
    b"\x0e",  # wire type 6 does not exist
    b"\x2a\x02\x0d\x00",  # a fixed32 cut short inside a sub-message
])
def test_what_is_not_protobuf_is_malformed_as_the_parser_says(raw):
    """Refused as parsing it would be (the same message), without parsing it."""
    with pytest.raises(Malformed, match="not a valid protobuf message"):
        count_objects(raw, INFER, 100)
    with pytest.raises(Exception):  # noqa: B017 - protobuf's DecodeError, whatever its class in this version
        pb.ModelInferRequest.FromString(raw)
