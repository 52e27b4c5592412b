"""Accuracy evaluation of served models (`effnet eval`): datasets, metrics and the runner.

Torch-free: it runs in the runtime image, through the same manifest, session and
preprocessing code as `effnet serve`.
"""

from .datasets import Dataset, DatasetError, LabelResolver, Sample, open_dataset
from .metrics import Tally, topk, wilson
from .runner import EvalError, EvalResult, evaluate, write_measured

__all__ = [
    "Dataset", "DatasetError", "EvalError", "EvalResult", "LabelResolver", "Sample", "Tally",
    "evaluate", "open_dataset", "topk", "wilson", "write_measured",
]
