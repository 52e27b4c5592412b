"""Where the front ends find the data plane: set by the app factory's lifespan, read per request."""

from __future__ import annotations

from starlette.requests import HTTPConnection

from ..engine.facade import Plane


def plane_of(conn: HTTPConnection) -> Plane:
    return conn.app.state.plane
