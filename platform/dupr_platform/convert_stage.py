"""The convert stage: a pre-training checkpoint -> torchvision and detectron2 weights.

Runs inside a Ray task like every stage body (see `dupr_platform.pipeline`). Its inputs are a
pre-training checkpoint folder of this platform or a .pth/.pt file from elsewhere (a baseline),
checked before anything runs (`check_inputs`); its outputs are the torchvision state_dict, the
detectron2 .pkl and the detectron2 config files of the paper's settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dupr.config import ConfigError
from dupr.convert import (
    ConversionError,
    backbone_from_checkpoint,
    save_detectron2,
    to_detectron2,
)
from dupr.detectron2_config import SETTINGS, detectron2_config
from dupr_platform.ray_pretrain import STATE_FILE
from dupr_platform.stages import StageContext, StageOutput, local_input
from dupr_platform.storage import open_storage, uri_exists

CONVERT_METRICS = ("parameters", "tensors")


def load_checkpoint_file(uri: str) -> dict[str, Any]:
    """A checkpoint's state: a pre-training checkpoint folder (state.pt) or a .pth/.pt file."""
    path = Path(local_input(uri))
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise ConfigError(f"checkpoint {uri!r}: no {STATE_FILE} in the folder and not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # any unreadable file is the same user error
        raise ConfigError(f"checkpoint {uri!r}: not a PyTorch checkpoint ({exc})") from None


def convert(ctx: StageContext, out: Path) -> StageOutput:
    """Checkpoint → torchvision state_dict, detectron2 .pkl and the detectron2 config lines."""
    uri = ctx.inputs["checkpoint"]
    if uri is None:  # a Ref to a pre-training's checkpoint, or a URI the config names
        raise ValueError(f"{ctx.name}: no checkpoint to convert")
    arch, state = backbone_from_checkpoint(load_checkpoint_file(uri), source=uri)
    torch.save(state, out / "backbone_torchvision.pth")
    d2_path = save_detectron2(to_detectron2(state), out / "backbone_detectron2.pkl")
    d2_uri = open_storage(ctx.storage_uri).uri_for(ctx.folder, d2_path.name)
    files = {"torchvision": "backbone_torchvision.pth", "detectron2": d2_path.name}
    for setting in SETTINGS:
        try:
            text = detectron2_config(arch, setting, weights=d2_uri)
        except ConversionError:
            continue  # e.g. detectron2's C4 head builds bottleneck blocks only: no R18/R34
        name = f"detectron2_{setting}.yaml"
        (out / name).write_text(text)
        files[f"detectron2_config_{setting}"] = name
    parameters = sum(v.numel() for k, v in state.items() if not k.endswith("running_mean"))
    return StageOutput(
        files=files,
        metrics=dict(zip(CONVERT_METRICS, (float(parameters), float(len(state))), strict=True)),
        values={"arch": arch},
        artifacts=[f for k, f in files.items() if k.startswith("detectron2_config")],
    )


def check_inputs(kind: str, inputs: dict[str, Any]) -> None:
    """A stage's literal checkpoint input exists and holds a ResNet backbone (data is checked
    once for all stages by `check_eval_data`)."""
    uri = inputs.get("checkpoint")
    if kind != "convert" or not isinstance(uri, str):
        return  # a Ref to another stage's output, or no checkpoint
    if not uri_exists(uri):
        raise ConfigError(f"{kind} input checkpoint: {uri!r} does not exist")
    # A baseline checkpoint: refuse it now, not after pre-training.
    backbone_from_checkpoint(load_checkpoint_file(uri), source=uri)
