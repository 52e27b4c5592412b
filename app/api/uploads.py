"""What an upload holds: its media type, and the `file` parts of a multipart body.

The body itself is read, within its bounds, by app/api/body.py. Multipart is parsed from that bounded
buffer with python-multipart's low-level parser, keeping every part in memory: no temp-file spooling,
and a `file` part counts whether or not the client gave it a filename.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from ..core.errors import BadRequest, UnsupportedMediaType

RAW_TYPES = ("application/octet-stream",)
FILE_FIELD = "file"
MAX_PARTS = 64  # fields of any name; a multipart body is not a place for thousands of parts


def media_type(request: Request) -> tuple[str, dict[bytes, bytes]]:
    raw = request.headers.get("content-type", "")
    ctype, params = parse_options_header(raw)
    return ctype.decode("latin-1").lower().strip(), params


def check_media_type(ctype: str) -> str:
    """'raw' or 'multipart'; anything else is 415 before the body is read."""
    if ctype == "multipart/form-data":
        return "multipart"
    if ctype.startswith("image/") or ctype in RAW_TYPES:
        return "raw"
    raise UnsupportedMediaType(
        "send the image as the raw body with an image/* or application/octet-stream content type, "
        "or as multipart/form-data field 'file'",
    )


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    # Pieces of the part's data: (start, end) offsets into the body, or bytes copied from the parser's own
    # buffer (it keeps a little look-behind when a boundary might straddle). One copy per part at the end.
    pieces: list[tuple[int, int] | bytes] = field(default_factory=list)

    @property
    def name(self) -> str | None:
        _, params = parse_options_header(self.headers.get(b"content-disposition", b""))
        value = params.get(b"name")
        return value.decode("utf-8", "replace") if value is not None else None


def parse_multipart(body: bytes, params: dict[bytes, bytes]) -> list[bytes]:
    """Every `file` part's bytes, in order; 400 when the body is malformed or has none."""
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest("multipart body without a boundary parameter")
    # python-multipart steps through every delimiter in Python, and RFC 2046 lets none appear inside a part:
    # so their count, found in C, bounds the parse. 10 MB of "\r\n--aX" (boundary "a") took 2-3 s of one core.
    # 64 parts: one before each (the first may lack its CRLF) and one to close.
    if body.count(b"\r\n--" + boundary) > MAX_PARTS + 1:
        raise BadRequest(f"at most {MAX_PARTS} multipart parts are accepted")
    parts: list[_Part] = []
    header_field = bytearray()
    header_value = bytearray()

    def on_part_begin() -> None:
        if len(parts) >= MAX_PARTS:
            raise BadRequest(f"at most {MAX_PARTS} multipart parts are accepted")
        parts.append(_Part())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        parts[-1].headers[bytes(header_field).lower()] = bytes(header_value)
        header_field.clear()
        header_value.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1].pieces.append((start, end) if data is body else bytes(data[start:end]))

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except BadRequest:
        raise
    except (MultipartParseError, ValueError, IndexError):
        raise BadRequest("malformed multipart body") from None
    files = [b"".join(body[x[0]:x[1]] if isinstance(x, tuple) else x for x in p.pieces)
             for p in parts if p.name == FILE_FIELD]
    if not files:
        raise BadRequest("multipart body has no 'file' field")
    return files
