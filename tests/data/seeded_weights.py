"""Seeded random weights that two different venvs regenerate bit for bit, with NumPy only.

The reference fixtures for `efficientnet_pytorch` checkpoints are recorded in a side venv (a different
torch, with the reference package) and checked here. Committing a whole B0 state dict would cost 21 MB,
so only what cannot be regenerated is recorded (BatchNorm statistics measured by the reference network,
and its logits); every other tensor comes from this module on both sides.

torch's RNG is not promised to be stable across releases; a NumPy BitGenerator's raw stream is. So each
tensor is drawn from `PCG64(SeedSequence([seed, crc32(key)])).random_raw()`, turned into floats by hand,
and the fixture records a sha256 per tensor so a change in any of this fails loudly, not subtly.
"""

from __future__ import annotations

import hashlib
import math
import zlib

import numpy as np

_MANTISSA = float(2**-53)


def uniform(seed: int, key: str, shape: tuple[int, ...], low: float, high: float) -> np.ndarray:
    """float32 uniform in [low, high): the top 53 bits of each raw 64-bit draw, scaled."""
    n = int(np.prod(shape)) if shape else 1
    raw = np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(key.encode())])).random_raw(n)
    unit = (raw >> np.uint64(11)).astype(np.float64) * _MANTISSA
    return (low + (high - low) * unit).astype(np.float32).reshape(shape)


def tensor_for(seed: int, key: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """The value of one state-dict entry, by its lukemelas-style key; None for BatchNorm statistics
    (the reference measures those) and counters.

    Convolutions and the classifier: He-uniform on fan-in, so a signal keeps its scale; BatchNorm
    affines near identity; biases small. The scheme only has to give a non-degenerate network.
    """
    leaf = key.rsplit(".", 1)[-1]
    if leaf in ("running_mean", "running_var", "num_batches_tracked"):
        return None
    is_bn = key.startswith("_bn") or "._bn" in key
    if is_bn and leaf == "weight":
        return uniform(seed, key, shape, 0.5, 1.5)
    if leaf == "bias":
        return uniform(seed, key, shape, -0.1, 0.1)
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    bound = math.sqrt(6.0 / fan_in)
    return uniform(seed, key, shape, -bound, bound)


def digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


def seeded_input(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """An input batch of unit variance (uniform on [-sqrt 3, sqrt 3]), like a normalised image."""
    r = math.sqrt(3.0)
    return uniform(seed, "input", shape, -r, r)
