"""Where the front ends find the data plane: set by the app factory's lifespan, read per request."""

from __future__ import annotations

from starlette.requests import HTTPConnection

from app.engine.dataplane import DataPlane


def plane_of(conn: HTTPConnection) -> DataPlane:
    return conn.app.state.plane
