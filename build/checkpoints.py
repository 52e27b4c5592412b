"""Checkpoint layouts people actually have, recognised from their state-dict keys.

Each layout comes from one library, and a checkpoint computes what that library computes only with that
library's padding and BatchNorm settings, so the format decides them, not the variant:

| format               | library (PyPI)                                  | keys                              | padding   | BN eps           |
| -------------------- | ----------------------------------------------- | --------------------------------- | --------- | ---------------- |
| torchvision          | torchvision `efficientnet_b0..b7`               | features.*, classifier.1.*        | symmetric | the variant's    |
| efficientnet_pytorch | efficientnet-pytorch (lukemelas), B0..B8/AdvProp | _conv_stem, _blocks.N.*, _se_*   | same      | 1e-3             |
| efficientnet_lite    | efficientnet-lite-pytorch, Lite0..4             | as above, no squeeze-excitation   | same      | 1e-3             |

(torchvision's own variants already carry the eps torchvision uses: 1e-5 for B0..B4, 1e-3 for B5..B7.)
BatchNorm momentum only matters when training; it is set to the library's anyway (torch convention:
lukemelas converts TF's 0.99 to 0.01) so that the built PyTorch module fine-tunes like the original.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .efficientnet import Padding
from .scaling import Variant


class CheckpointError(RuntimeError):
    """The checkpoint's layout is not one we understand or does not fit the variant; one line says why."""


@dataclass(frozen=True)
class CheckpointFormat:
    name: str  # recorded in the manifest as weights.format
    library: str
    padding: Padding
    bn_eps: float | None  # None: the variant's own
    bn_momentum: float
    squeeze_excitation: bool | None  # what the layout has; None: not a layout (random weights)


TORCHVISION = CheckpointFormat("torchvision", "torchvision efficientnet_b0..b7", "symmetric", None, 0.1, True)
EFFICIENTNET_PYTORCH = CheckpointFormat(
    "efficientnet_pytorch", "efficientnet_pytorch (lukemelas) B0..B8", "same", 1e-3, 0.01, True
)
EFFICIENTNET_LITE = CheckpointFormat("efficientnet_lite", "efficientnet-lite-pytorch Lite0..4", "same", 1e-3, 0.01, False)
SEEDED = CheckpointFormat("random", "seeded random weights", "symmetric", None, 0.1, None)

_TORCHVISION_KEY = re.compile(r"(features\.\d+\.|classifier\.1\.)\S+")
_LUKEMELAS_KEY = re.compile(r"(_conv_stem|_bn0|_conv_head|_bn1|_fc|_blocks\.\d+\.\w+)\.\w+")
_UNDERSTOOD = (
    "torchvision (features.*, classifier.1.*), efficientnet_pytorch and efficientnet-lite-pytorch "
    "(_conv_stem.*, _blocks.N.*, _fc.*)"
)


def _strip_wrapper_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """nn.DataParallel / DistributedDataParallel save every key under `module.`."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def detect(state: dict[str, torch.Tensor]) -> tuple[CheckpointFormat, dict[str, torch.Tensor]]:
    """(format, state with wrapper prefixes removed); CheckpointError when no understood layout fits every key."""
    state = _strip_wrapper_prefix(state)
    if not state:
        raise CheckpointError("the checkpoint holds no tensors")
    keys = list(state)
    candidates = {"torchvision": _TORCHVISION_KEY, "lukemelas": _LUKEMELAS_KEY}
    misses = {name: [k for k in keys if not pattern.fullmatch(k)] for name, pattern in candidates.items()}
    if not misses["torchvision"]:
        return TORCHVISION, state
    if not misses["lukemelas"]:
        has_se = any("._se_reduce." in k for k in keys)
        return (EFFICIENTNET_PYTORCH if has_se else EFFICIENTNET_LITE), state
    closest = min(misses.values(), key=len)
    shown = ", ".join(repr(k) for k in closest[:3])
    raise CheckpointError(
        f"unknown checkpoint layout: {len(closest)} of {len(keys)} keys fit no understood format "
        f"({_UNDERSTOOD}); first keys that did not match: {shown}"
    )


def check_fits(fmt: CheckpointFormat, variant: Variant) -> None:
    """A layout with squeeze-excitation cannot load into EfficientNet-Lite (which has none), and vice versa."""
    if fmt.squeeze_excitation is not None and fmt.squeeze_excitation != variant.squeeze_excitation:
        kind = "EfficientNet-Lite" if variant.is_lite else "EfficientNet (B-series)"
        raise CheckpointError(f"a {fmt.library} checkpoint does not fit {variant.name}, which is {kind}")


def to_our_names(fmt: CheckpointFormat, state: dict[str, torch.Tensor], variant: Variant) -> dict[str, torch.Tensor]:
    """Rename into build.efficientnet's (torchvision's) parameter names; BatchNorm counters are dropped."""
    if fmt is TORCHVISION:
        return state
    return convert_lukemelas(state, variant)


# --- lukemelas naming (efficientnet_pytorch and the Lite packages) -> torchvision naming ---------------

_LUKEMELAS_TOP = {
    "_conv_stem.weight": "features.0.0.weight",
    "_fc.weight": "classifier.1.weight",
    "_fc.bias": "classifier.1.bias",
    "_conv_head.weight": "{head}.0.weight",
}


def convert_lukemelas(state: dict[str, torch.Tensor], variant: Variant) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style state dict (`_blocks.N._depthwise_conv…`) to our torchvision-style names."""
    blocks = variant.blocks()
    head = f"features.{blocks[-1].stage + 1}"
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        new = _rename_lukemelas(key, blocks, head)
        if new is None:
            raise CheckpointError(f"checkpoint key {key!r} has no place in {variant.name} (a different depth?)")
        out[new] = value
    return out


def _rename_lukemelas(key: str, blocks, head: str) -> str | None:
    if key in _LUKEMELAS_TOP:
        return _LUKEMELAS_TOP[key].format(head=head)
    m = re.fullmatch(r"_bn([01])\.(.+)", key)
    if m:
        return f"features.0.1.{m.group(2)}" if m.group(1) == "0" else f"{head}.1.{m.group(2)}"
    m = re.fullmatch(r"_blocks\.(\d+)\.(\w+?)\.(\w+)", key)
    if not m:
        return None
    idx, part, leaf = int(m.group(1)), m.group(2), m.group(3)
    if idx >= len(blocks):
        return None
    b = blocks[idx]
    has_expand = b.expanded_channels != b.in_channels
    dw = 1 if has_expand else 0
    se = dw + 1
    project = se + (1 if b.se_channels else 0)
    prefix = f"features.{b.stage}.{b.index}.block"
    table = {
        "_expand_conv": f"{prefix}.0.0",
        "_bn0": f"{prefix}.0.1",
        "_depthwise_conv": f"{prefix}.{dw}.0",
        "_bn1": f"{prefix}.{dw}.1",
        "_se_reduce": f"{prefix}.{se}.fc1",
        "_se_expand": f"{prefix}.{se}.fc2",
        "_project_conv": f"{prefix}.{project}.0",
        "_bn2": f"{prefix}.{project}.1",
    }
    return f"{table[part]}.{leaf}" if part in table else None
