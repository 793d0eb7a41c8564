"""detectron2 config files for fine-tuning exported DUPR weights in the paper's settings (§4.2).

The weights themselves are written by `dupr.convert`; this module only says how detectron2
must read them (input normalisation, ResNet variant) and which paper setting to train.
"""

from __future__ import annotations

from typing import Any

import yaml

from dupr.config import BACKBONES
from dupr.convert import ConversionError

SETTINGS = ("voc_c4", "coco_fpn")
_DEPTH = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101, "resnet152": 152}
_BASIC_BLOCK = ("resnet18", "resnet34")
_PIXEL_MEAN = (123.675, 116.280, 103.530)  # torchvision's normalisation in 0..255 RGB units
_PIXEL_STD = (58.395, 57.120, 57.375)


class _Dumper(yaml.SafeDumper):
    """Lists inline (`[480, 512, …]`), mappings as blocks: how detectron2's own configs read."""


_Dumper.add_representer(
    list, lambda dumper, v: dumper.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True)
)


def _setting(setting: str) -> dict[str, Any]:
    """The config entries of one paper setting, over detectron2's stock base file."""
    if setting == "voc_c4":
        # Faster R-CNN R50-C4 on VOC07+12 (paper §4.1.1, MoCo's pascal_voc_R_50_C4_24k): SyncBN
        # everywhere, an extra norm after res5 in the RoI head, 24k iterations, 480–800 px.
        return {
            "_BASE_": "PascalVOC-Detection/faster_rcnn_R_50_C4.yaml",
            "MODEL": {
                "MASK_ON": False,
                "BACKBONE": {"FREEZE_AT": 0},
                "RESNETS": {"NORM": "SyncBN"},
                "RPN": {"PRE_NMS_TOPK_TEST": 6000, "POST_NMS_TOPK_TEST": 1000},
                # Registered by MoCo's train_net.py: Res5ROIHeads plus a norm after res5.
                "ROI_HEADS": {"NAME": "Res5ROIHeadsExtraNorm", "NUM_CLASSES": 20},
            },
            "INPUT": {
                "MIN_SIZE_TRAIN": [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800],
                "MIN_SIZE_TEST": 800,
            },
            "DATASETS": {
                "TRAIN": ["voc_2007_trainval", "voc_2012_trainval"],
                "TEST": ["voc_2007_test"],
            },
            "SOLVER": {
                "IMS_PER_BATCH": 16,
                "BASE_LR": 0.02,
                "STEPS": [18000, 22000],
                "MAX_ITER": 24000,
                "WARMUP_ITERS": 100,
            },
            "TEST": {"PRECISE_BN": {"ENABLED": True}},
        }
    if setting == "coco_fpn":
        # Mask R-CNN R50-FPN 1× on COCO (paper §4.2.2): SyncBN in the backbone and the new FPN.
        return {
            "_BASE_": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
            "MODEL": {
                "MASK_ON": True,
                "BACKBONE": {"FREEZE_AT": 0},
                "RESNETS": {"NORM": "SyncBN"},
                "FPN": {"NORM": "SyncBN"},
            },
            "INPUT": {"MIN_SIZE_TRAIN": [640, 672, 704, 736, 768, 800], "MIN_SIZE_TEST": 800},
            "TEST": {"PRECISE_BN": {"ENABLED": True}},
        }
    raise ConversionError(f"setting={setting!r}: unknown (valid: {', '.join(SETTINGS)})")


def detectron2_config_dict(arch: str, setting: str, weights: str) -> dict[str, Any]:
    """The nested config that `detectron2_config` writes (see there)."""
    if arch not in BACKBONES:
        raise ConversionError(f"arch={arch!r}: unknown (valid: {', '.join(BACKBONES)})")
    if not isinstance(weights, str) or not weights.strip():
        raise ConversionError(f"weights={weights!r}: must be a non-empty path or URI")
    cfg = _setting(setting)
    if setting == "voc_c4" and arch in _BASIC_BLOCK:
        # detectron2's Res5ROIHeads always builds bottleneck res5 blocks: a basic-block res5
        # would be skipped by the checkpointer (shape mismatch) with only a warning.
        raise ConversionError(
            f"arch={arch!r}: setting voc_c4 needs a bottleneck ResNet (resnet50/101/152)"
        )
    model = cfg["MODEL"] = {
        "WEIGHTS": weights,
        "PIXEL_MEAN": list(_PIXEL_MEAN),
        "PIXEL_STD": list(_PIXEL_STD),
        **cfg["MODEL"],
    }
    model["RESNETS"] |= {"DEPTH": _DEPTH[arch], "STRIDE_IN_1X1": False}
    if arch in _BASIC_BLOCK:
        model["RESNETS"]["RES2_OUT_CHANNELS"] = 64  # detectron2 requires it for R18/R34
    cfg["INPUT"]["FORMAT"] = "RGB"
    return cfg


def detectron2_config(arch: str, setting: str, weights: str) -> str:
    """YAML for detectron2 fine-tuning from exported weights in one of the paper's settings.

    `_BASE_` is relative to detectron2's `configs/` folder, so save the text there or edit it.
    The input is RGB normalised as in torchvision and STRIDE_IN_1X1 is False: torchvision's
    bottleneck strides in the 3×3 conv, unlike MSRA's Caffe2 ResNets (MoCo's *_moco.yaml).
    Keys keep their order (`_BASE_` and WEIGHTS first).
    """
    cfg = detectron2_config_dict(arch, setting, weights)
    return yaml.dump(cfg, Dumper=_Dumper, sort_keys=False)
