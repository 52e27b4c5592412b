"""EfficientNet serving: ONNX Runtime sessions behind FastAPI. Never imports torch."""

__version__ = "0.1.0"
