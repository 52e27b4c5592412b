"""What a gRPC message would become once parsed, counted from its bytes before it is parsed.

The in-flight memory budget charges a message by its size on the wire (interceptors.py), but protobuf makes
an object of every length-delimited field: a string, a bytes value, a packed array, a sub-message, a map
entry. Such a field costs two bytes on the wire and some hundred in memory, so a 19 MB ModelInferRequest of
1.8 M empty `inputs` entries parsed into ~650 MB, and one of 10 M empty BYTES elements took seconds of the
event loop to refuse. So the message's length-delimited fields are counted first, at every depth its schema
has (the request type's descriptor says which fields are messages), and a message with more than a request
can need is refused before anything is built from it. Scalars (varints, fixed32/64) make no object each: a
repeated one is stored as an array, packed or not, and costs no more parsed than on the wire.
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from ...core.errors import BadRequest

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


class Malformed(BadRequest):
    """Not a protobuf message at all: the same answer parsing it would have given."""


def _varint(buf: bytes, i: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= end or shift > 63:
            raise Malformed("the message is not a valid protobuf message for this RPC")
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def count_objects(buf: bytes, message: Descriptor, limit: int) -> int:
    """The length-delimited fields in `buf`, parsed as `message`, at every depth; BadRequest past `limit`."""
    count = 0
    stack = [(0, len(buf), message)]  # the V2 request types do not nest themselves: the schema ends the descent
    while stack:
        i, end, desc = stack.pop()
        while i < end:
            key, i = _varint(buf, i, end)
            number, kind = key >> 3, key & 7
            if kind == _VARINT:
                _, i = _varint(buf, i, end)
            elif kind == _FIXED64:
                i += 8
            elif kind == _FIXED32:
                i += 4
            elif kind == _LEN:
                size, i = _varint(buf, i, end)
                start, i = i, i + size
                count += 1
                if count > limit:
                    raise BadRequest(f"the message holds more than {limit} strings, tensors and sub-messages; "
                                     "no request needs that many")
                field = desc.fields_by_number.get(number) if desc is not None else None
                if field is not None and field.type == FieldDescriptor.TYPE_MESSAGE and i <= end:
                    stack.append((start, i, field.message_type))
            else:  # groups (3, 4) are not proto3; 6 and 7 are no wire type at all
                raise Malformed("the message is not a valid protobuf message for this RPC")
            if i > end:
                raise Malformed("the message is not a valid protobuf message for this RPC")
    return count
