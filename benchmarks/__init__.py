"""The benchmark behind `docs/benchmarks.md`: raw ONNX Runtime vs the service vs its peers.

Entry point: `python -m benchmarks.run [--quick]`. Not part of the product (nothing in `app/` imports it).
"""
