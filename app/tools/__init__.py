"""Offline tools over the engine: `effnet eval` and `effnet report`."""
