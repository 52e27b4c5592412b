"""What runs a model: manifests, preprocessing, ONNX Runtime sessions, batchers, the registry, metrics,
and the data plane every front end calls (dataplane.py)."""
