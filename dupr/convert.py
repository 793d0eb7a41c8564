"""Export pre-trained DUPR weights for torchvision and detectron2 (paper §4.1–4.2: "as MoCo").

Only the QUERY encoder's backbone f₁ is exported, as MoCo does: the key encoder is a lagging
momentum average of it, and the heads h₁, g₁ exist only for the losses of Eq. 2, 7 and 8.
BatchNorm running statistics are kept: detectron2 initialises FrozenBN and SyncBN from
running_mean/running_var, so dropping them would start fine-tuning from unit statistics that
do not match the pre-trained weights.

The detectron2 file follows MoCo's public conversion rules (stem., layerN→res{N+1},
bnK→convK.norm, downsample.0/1→shortcut/shortcut.norm) but, unlike MoCo's script, checks the
full key set and shapes, so a silently empty or partial export is impossible. The detectron2
config file that fine-tunes from these weights is written by `dupr.detectron2_config`.
"""

from __future__ import annotations

import functools
import os
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import Tensor

from dupr.config import BACKBONES
from dupr.io import write_atomically

DDP_PREFIX = "module."
QUERY_BACKBONE = "encoder_q.backbone."
AUTHOR = "DUPR"
_COUNTER = "num_batches_tracked"


class ConversionError(ValueError):
    """Weights that cannot be exported; the message is one line naming the source and keys."""

    def __init__(self, message: str) -> None:
        super().__init__(message.replace("\n", "\\n"))


def _some(keys: list[str], n: int = 3) -> str:
    """`count (k1, k2, k3, …)`: the first few offending keys and how many there are."""
    shown = ", ".join(keys[:n]) + (", …" if len(keys) > n else "")
    return f"{len(keys)} ({shown})"


# ---------------------------------------------------------------- torchvision


def query_backbone(
    model_state: Mapping[str, Tensor], source: str = "checkpoint"
) -> dict[str, Tensor]:
    """The query backbone's entries under torchvision names (`module.` and prefix stripped)."""
    if not isinstance(model_state, Mapping):
        raise ConversionError(
            f"{source}: expected a model state_dict mapping, got {type(model_state).__name__}"
        )
    out: dict[str, Tensor] = {}
    for key, value in model_state.items():
        if not isinstance(key, str):
            continue
        name = key.removeprefix(DDP_PREFIX)
        if not name.startswith(QUERY_BACKBONE):
            continue
        tv_name = name.removeprefix(QUERY_BACKBONE)
        if tv_name in out:
            raise ConversionError(f"{source}: {key}: given both with and without {DDP_PREFIX!r}")
        if not isinstance(value, Tensor):
            raise ConversionError(f"{source}: {key}: not a tensor ({type(value).__name__})")
        out[tv_name] = value
    if not out:
        raise ConversionError(
            f"{source}: no key starts with {QUERY_BACKBONE!r} (optionally after {DDP_PREFIX!r}); "
            f"keys: {_some(sorted(map(str, model_state)))}"
        )
    return out


@functools.cache
def _torchvision_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Shapes of every parameter and buffer of torchvision's `arch` except `fc.*`.

    Built on the meta device: no memory is allocated, so even resnet152 costs milliseconds.
    """
    if arch not in BACKBONES:
        raise ConversionError(f"arch={arch!r}: unknown (valid: {', '.join(BACKBONES)})")
    with torch.device("meta"):
        net = getattr(torchvision.models, arch)(weights=None)
    return {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.startswith("fc.")}


def _problems(
    shapes: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]
) -> str:
    """One line listing missing, unexpected and wrongly shaped keys; empty when all match."""
    missing = sorted(k for k in expected if k not in shapes)
    unexpected = sorted(k for k in shapes if k not in expected)
    wrong = sorted(
        f"{k} {list(shapes[k])} != {list(expected[k])}"
        for k in expected
        if k in shapes and tuple(shapes[k]) != expected[k]
    )
    parts = [
        f"{what} {_some(keys)}"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        if keys
    ]
    return "; ".join(parts)


def _closest_arch(
    shapes: Mapping[str, tuple[int, ...]],
    expected_of: Callable[[str], dict[str, tuple[int, ...]]],
    what: str,
    source: str,
) -> str:
    """The architecture whose expected shapes match exactly, or an error naming the closest."""
    report = {arch: _problems(shapes, expected_of(arch)) for arch in BACKBONES}
    for arch, problems in report.items():
        if not problems:
            return arch
    closest = min(BACKBONES, key=lambda a: len(set(shapes) ^ set(expected_of(a))))
    raise ConversionError(
        f"{source}: {what} matches none of {', '.join(BACKBONES)}; "
        f"closest {closest}: {report[closest]}"
    )


def infer_arch(state: Mapping[str, Tensor], source: str = "checkpoint") -> str:
    """Which of BACKBONES a torchvision-named backbone state is, from its keys and shapes."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    return _closest_arch(shapes, _torchvision_shapes, "backbone", source)


def check_torchvision_state(
    state: Mapping[str, Tensor], arch: str, source: str = "checkpoint"
) -> None:
    """Every parameter and buffer of torchvision `arch` but `fc.*`, right shapes, nothing else."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    problems = _problems(shapes, _torchvision_shapes(arch))
    if problems:
        raise ConversionError(f"{source}: not a torchvision {arch} backbone: {problems}")


def _export(value: Tensor) -> Tensor:
    """A CPU float32 (floating) contiguous copy that shares no memory with the model."""
    value = value.detach().to("cpu")
    if value.is_floating_point():
        value = value.to(torch.float32)
    return value.clone(memory_format=torch.contiguous_format)


def to_torchvision(
    model_state: Mapping[str, Tensor], source: str = "checkpoint"
) -> tuple[str, dict[str, Tensor]]:
    """(arch, backbone state): cloned, contiguous, floating tensors as float32.

    `torchvision.models.<arch>(weights=None).load_state_dict(state, strict=False)` then reports
    exactly fc.weight and fc.bias missing and nothing unexpected.

    Non-finite weights are refused: a diverged run must not be exported as if it were fine.
    """
    state = {k: _export(v) for k, v in query_backbone(model_state, source).items()}
    arch = infer_arch(state, source)
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all())
    if bad:
        raise ConversionError(f"{source}: non-finite values in {_some(bad)}")
    return arch, state


# Where other projects keep a ResNet trunk, tried in order after DUPR's own layout: MoCo's
# released checkpoints (module.encoder_q.*, with its MLP head under fc.*), a bare backbone
# module, and a plain torchvision state_dict (supervised weights, or an earlier export).
_FOREIGN_PREFIXES = ("encoder_q.", "backbone.", "")


def backbone_from_checkpoint(
    checkpoint: Mapping[str, Any], source: str = "checkpoint"
) -> tuple[str, dict[str, Tensor]]:
    """(arch, torchvision backbone state) from any checkpoint a user is likely to have.

    Accepts this project's training state ({"model": ...}), a DUPR model state_dict, a MoCo
    checkpoint ({"state_dict": {"module.encoder_q.conv1.weight", ...}}) and a torchvision
    ResNet state_dict; `fc.*` (a classifier or MoCo's projection head) is dropped.
    """
    if not isinstance(checkpoint, Mapping):
        raise ConversionError(f"{source}: expected a mapping, got {type(checkpoint).__name__}")
    for wrapper in ("model", "state_dict"):
        if isinstance(checkpoint.get(wrapper), Mapping):
            checkpoint = checkpoint[wrapper]
            break
    keys = [k.removeprefix(DDP_PREFIX) for k in checkpoint if isinstance(k, str)]
    if any(k.startswith(QUERY_BACKBONE) for k in keys):
        return to_torchvision(checkpoint, source)
    for prefix in _FOREIGN_PREFIXES:
        if prefix + "conv1.weight" in keys:
            renamed = {
                QUERY_BACKBONE + k.removeprefix(DDP_PREFIX).removeprefix(prefix): v
                for k, v in checkpoint.items()
                if isinstance(k, str)
                and k.removeprefix(DDP_PREFIX).startswith(prefix)
                and not k.removeprefix(DDP_PREFIX).removeprefix(prefix).startswith("fc.")
            }
            return to_torchvision(renamed, source)
    raise ConversionError(
        f"{source}: no ResNet backbone found (looked for {QUERY_BACKBONE!r}, "
        f"{', '.join(repr(p + 'conv1.weight') for p in _FOREIGN_PREFIXES)}); "
        f"keys: {_some(sorted(map(str, checkpoint)))}"
    )


# ------------------------------------------------------------------ detectron2

_LAYER = re.compile(r"layer([1-4])")
_RES = re.compile(r"res([2-5])")
_BN = re.compile(r"bn([1-3])")
_CONV = re.compile(r"conv([1-3])")


def detectron2_name(tv_name: str) -> str:
    """MoCo's renaming of one torchvision ResNet key, done on dotted parts, not substrings."""
    parts = tv_name.split(".")
    layer = _LAYER.fullmatch(parts[0])
    parts = [f"res{int(layer[1]) + 1}", *parts[1:]] if layer else ["stem", *parts]
    out: list[str] = []
    i = 0
    while i < len(parts):
        part, nxt = parts[i], parts[i + 1] if i + 1 < len(parts) else None
        bn = _BN.fullmatch(part)
        if bn:
            out += [f"conv{bn[1]}", "norm"]
        elif part == "downsample" and nxt in ("0", "1"):
            out += ["shortcut"] if nxt == "0" else ["shortcut", "norm"]
            i += 1
        else:
            out.append(part)
        i += 1
    return ".".join(out)


def torchvision_name(d2_name: str) -> str:
    """Inverse of `detectron2_name`. `shortcut.norm` is matched before `shortcut`, and
    `convK.norm` (never a bare `convK`) becomes `bnK`."""
    parts = d2_name.split(".")
    res = _RES.fullmatch(parts[0])
    if parts[0] == "stem":
        parts = parts[1:]
    elif res:
        parts = [f"layer{int(res[1]) - 1}", *parts[1:]]
    out: list[str] = []
    i = 0
    while i < len(parts):
        part, nxt = parts[i], parts[i + 1] if i + 1 < len(parts) else None
        conv = _CONV.fullmatch(part)
        if part == "shortcut":
            out += ["downsample", "1"] if nxt == "norm" else ["downsample", "0"]
            i += 2 if nxt == "norm" else 1
        elif conv and nxt == "norm":
            out.append(f"bn{conv[1]}")
            i += 2
        else:
            out.append(part)
            i += 1
    return ".".join(out)


@functools.cache
def _detectron2_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Expected detectron2 names and shapes for `arch` (BN counters are not exported)."""
    return {
        detectron2_name(k): s
        for k, s in _torchvision_shapes(arch).items()
        if not k.endswith(_COUNTER)
    }


def to_detectron2(
    tv_state: Mapping[str, Tensor], source: str = "torchvision state"
) -> dict[str, Any]:
    """The detectron2 checkpoint object for a torchvision-named backbone state (see module doc).

    `__author__` must not be "Caffe2" (detectron2 would apply Caffe2 renames) and
    `matching_heuristics` lets detectron2 match `res2.*` to `backbone.bottom_up.res2.*` (FPN) or
    `roi_heads.res5.*` (C4).
    """
    arch = infer_arch(tv_state, source)
    model = {
        detectron2_name(k): _export(v).numpy()
        for k, v in tv_state.items()
        if not k.endswith(_COUNTER)
    }
    obj = {"model": model, "__author__": AUTHOR, "matching_heuristics": True}
    check_detectron2(obj, arch, source)
    return obj


def _detectron2_model(obj: Any, source: str) -> dict[str, Any]:
    """The `model` dict after the structural checks that do not depend on the architecture."""
    if not isinstance(obj, dict):
        raise ConversionError(f"{source}: expected a dict, got {type(obj).__name__}")
    missing = [k for k in ("model", "__author__", "matching_heuristics") if k not in obj]
    if missing:
        raise ConversionError(f"{source}: missing top-level keys {_some(missing)}")
    author = obj["__author__"]
    if not isinstance(author, str) or author == "Caffe2":
        raise ConversionError(
            f"{source}: __author__={author!r}: must be a string other than 'Caffe2'"
        )
    if obj["matching_heuristics"] is not True:
        raise ConversionError(
            f"{source}: matching_heuristics={obj['matching_heuristics']!r}: must be True"
        )
    model = obj["model"]
    if not isinstance(model, dict):
        raise ConversionError(f"{source}: model: expected a dict, got {type(model).__name__}")
    if not model:
        raise ConversionError(f"{source}: model is empty (nothing was exported)")
    bad = sorted(
        f"{k} ({type(v).__name__}{'' if not isinstance(v, np.ndarray) else ' ' + str(v.dtype)})"
        for k, v in model.items()
        if not isinstance(v, np.ndarray) or v.dtype != np.float32
    )
    if bad:
        raise ConversionError(f"{source}: values must be float32 numpy arrays: {_some(bad)}")
    return model


def check_detectron2(obj: Any, arch: str, source: str = "detectron2 weights") -> None:
    """Structure, author, heuristics flag, and the complete key set of `arch` with shapes."""
    model = _detectron2_model(obj, source)
    problems = _problems({k: v.shape for k, v in model.items()}, _detectron2_shapes(arch))
    if problems:
        raise ConversionError(f"{source}: not a detectron2 {arch} backbone: {problems}")


def detectron2_arch(obj: Any, source: str = "detectron2 weights") -> str:
    """Which of BACKBONES a detectron2 checkpoint object holds; raises if it is not valid."""
    model = _detectron2_model(obj, source)
    shapes = {k: v.shape for k, v in model.items()}
    return _closest_arch(shapes, _detectron2_shapes, "detectron2 backbone", source)


def from_detectron2(obj: Any, source: str = "detectron2 weights") -> dict[str, Tensor]:
    """Exact inverse of `to_detectron2`, as a torchvision-named state.

    BN counters (`num_batches_tracked`) are not stored in the file; they come back as 0, which
    only matters for BatchNorm with momentum=None.
    """
    detectron2_arch(obj, source)
    state = {
        torchvision_name(k): torch.from_numpy(np.array(v, copy=True))
        for k, v in obj["model"].items()
    }
    for key in [k for k in state if k.endswith(".running_mean")]:
        state[key.removesuffix("running_mean") + _COUNTER] = torch.tensor(0, dtype=torch.long)
    return state


def save_detectron2(obj: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Validate, then write the plain pickle atomically (`write_atomically`, with fsync)."""
    path = Path(path)
    if path.suffix != ".pkl":
        raise ConversionError(f"{path}: detectron2 loads pickled weights only from a .pkl file")
    detectron2_arch(obj, str(path))
    return write_atomically(path, lambda f: pickle.dump(obj, f))


def load_detectron2(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a file written by `save_detectron2` (pickle runs code: trusted files)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")  # as detectron2 reads .pkl files
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ConversionError(f"{path}: cannot read a pickle: {type(e).__name__}: {e}") from e
    detectron2_arch(obj, str(path))
    return obj
