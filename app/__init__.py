"""EfficientNet serving: ONNX Runtime sessions behind FastAPI. Never imports torch.

Layers, each importing only the ones below it (import-linter holds this: pyproject.toml):

    cli        the `effnet` command
    api        HTTP front ends: the app factory, /classify, /models, health, the V2 protocol
    tools      offline tools over the engine: `effnet eval`, `effnet report` (independent of api)
    policies   routing (`model=auto`) and cascades, over the data plane
    engine     manifest, preprocessing, sessions, batcher, registry, metrics, the data plane
    core       settings and errors
"""

__version__ = "0.1.0"
