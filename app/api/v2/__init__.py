"""The Open Inference Protocol (KServe V2) over HTTP: codec.py (bodies) and routes.py (endpoints)."""
