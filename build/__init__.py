"""Build step: EfficientNet variants in PyTorch, exported to an ONNX model repository."""

__version__ = "0.1.0"
