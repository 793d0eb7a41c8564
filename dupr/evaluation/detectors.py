"""Detectors for the downstream fine-tuning of paper §4.1–4.2 (Tables I–III), from torchvision parts.

A pre-trained ResNet (torchvision names conv1/bn1/layer1..4, `fc` optional) initialises one of
four detectors: Faster/Mask R-CNN and RetinaNet on a ResNet-FPN, and Faster R-CNN R50-C4, which
torchvision has no builder for and which we assemble from `FasterRCNN` as MoCo's detectron2
configuration does (RPN on conv4_x, res5 as the RoI box head). Nothing is ever downloaded: every
torchvision constructor gets `weights=None`, and `backbone_state=None` is the random-init baseline.

Two ways of treating BatchNorm while fine-tuning (§4.1: "we train and synchronize all batch
normalization layers"): `sync_bn` trains the ResNet's BN with statistics over the global batch
(`dupr.sync_batchnorm.SyncBatchNorm`, plain BN in a single process); `frozen_bn` keeps the
pre-trained statistics and affine fixed (torchvision's FrozenBatchNorm2d), the supervised-ImageNet
convention. The paper (§4.2.1, following MoCo) also puts BN into the newly initialised FPN; torchvision's
FPN detectors have no norm there and we keep them as they are.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn
import torchvision
from torch import Tensor
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from dupr.config import BACKBONES
from dupr.photometric import IMAGENET_MEAN, IMAGENET_STD
from dupr.sync_batchnorm import SyncBatchNorm

DETECTORS = ("faster_rcnn_fpn", "retinanet_fpn", "faster_rcnn_c4", "mask_rcnn_fpn")
NORMS = ("sync_bn", "frozen_bn")

_CLASSES: dict[str, type[nn.Module]] = {
    "faster_rcnn_fpn": FasterRCNN,
    "retinanet_fpn": RetinaNet,
    "faster_rcnn_c4": FasterRCNN,
    "mask_rcnn_fpn": MaskRCNN,
}
# Constructor arguments that build_detector sets itself; overriding them would bypass the builder.
_OWN_ARGS = {
    "self",
    "backbone",
    "num_classes",
    "min_size",
    "max_size",
    "image_mean",
    "image_std",
    "kwargs",
}
_C4_PARTS = {"rpn_anchor_generator", "box_roi_pool", "box_head", "box_predictor"}
# detectron2's RPN proposal counts for single-map (C4) detectors; torchvision's defaults
# (2000/1000) are per FPN level.
_C4_RPN = dict(
    rpn_pre_nms_top_n_train=12000,
    rpn_post_nms_top_n_train=2000,
    rpn_pre_nms_top_n_test=6000,
    rpn_post_nms_top_n_test=1000,
)


def norm_layer(norm: str) -> Callable[..., nn.Module]:
    """The BatchNorm class the ResNet is built with for a fine-tuning norm mode."""
    if norm == "sync_bn":
        return SyncBatchNorm
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    raise ValueError(f"norm={norm!r}: unknown (valid: {', '.join(NORMS)})")


def load_trunk(module: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load a torchvision-named ResNet state into `module`, strictly except for `fc.*`.

    `num_batches_tracked` is bookkeeping, not a weight: FrozenBatchNorm2d has none and a
    FrozenBN-exported state lacks it, so it is neither required nor rejected.
    """
    own = module.state_dict()
    given = {k: v for k, v in state.items() if not k.startswith("fc.")}

    def counted(k: str) -> bool:
        return not k.endswith("num_batches_tracked")

    missing = sorted(k for k in own if k not in given and counted(k))
    unexpected = sorted(k for k in given if k not in own and counted(k))
    if missing or unexpected:
        raise ValueError(
            f"backbone_state: {len(missing)} missing keys {_some(missing)}, "
            f"{len(unexpected)} unexpected keys {_some(unexpected)}"
        )
    for k in own:
        if k in given and counted(k) and tuple(given[k].shape) != tuple(own[k].shape):
            raise ValueError(
                f"backbone_state[{k!r}]: shape {tuple(given[k].shape)}, "
                f"the model expects {tuple(own[k].shape)}"
            )
    # Keep each side's own BN counters: drop the given ones the module lacks, fill the absent ones.
    loadable = {k: v for k, v in given.items() if k in own}
    loadable.update({k: v for k, v in own.items() if k not in loadable})
    module.load_state_dict(loadable, strict=True)


def _some(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")
    return f"[{shown}]"


class C4Trunk(nn.Module):
    """Stem + conv2_x..conv4_x (stride 16): the shared feature map of R50-C4 (RPN and RoIs)."""

    def __init__(self, resnet: torchvision.models.ResNet, out_channels: int) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = (
            resnet.conv1,
            resnet.bn1,
            resnet.relu,
            resnet.maxpool,
        )
        self.layer1, self.layer2, self.layer3 = resnet.layer1, resnet.layer2, resnet.layer3
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return OrderedDict([("0", self.layer3(self.layer2(self.layer1(x))))])


class Res5BoxHead(nn.Module):
    """conv5_x on 14×14 RoI features (first block stride 2 -> 7×7), then global average pooling.

    With `extra_norm`, a BatchNorm follows res5 as in MoCo's Res5ROIHeadsExtraNorm: the box
    predictor is newly initialised and sees features whose scale after unsupervised pre-training
    differs from supervised features, so they are normalised first (paper §4.1: "batch
    normalization is used in the newly initialized RoI head layer").
    """

    def __init__(self, layer4: nn.Module, out_channels: int, extra_norm: nn.Module | None) -> None:
        super().__init__()
        self.layer4 = layer4
        self.norm = extra_norm if extra_norm is not None else nn.Identity()
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.layer4(x)).mean(dim=(2, 3))


def _resnet(arch: str, norm: str) -> torchvision.models.ResNet:
    if arch not in BACKBONES:
        raise ValueError(f"arch={arch!r}: unknown (valid: {', '.join(BACKBONES)})")
    return getattr(torchvision.models, arch)(weights=None, norm_layer=norm_layer(norm))


def check_overrides(name: str, overrides: Mapping[str, Any]) -> None:
    """Raise a ValueError naming the `overrides` that detector `name`'s constructor refuses.

    Checked before training starts: torchvision would only refuse them when the model is built.
    """
    valid = set(inspect.signature(_CLASSES[name].__init__).parameters) - _OWN_ARGS
    valid |= set(inspect.signature(GeneralizedRCNNTransform.__init__).parameters) - _OWN_ARGS
    if name == "faster_rcnn_c4":
        valid -= _C4_PARTS
    bad = sorted(set(overrides) - valid)
    if bad:
        raise ValueError(
            f"overrides {bad} not accepted by {name} (valid: {', '.join(sorted(valid))})"
        )


def build_detector(
    name: str,
    arch: str,
    num_classes: int,
    backbone_state: Mapping[str, Tensor] | None = None,
    norm: str = "sync_bn",
    min_size: int | tuple[int, ...] = 800,
    max_size: int = 1333,
    **overrides: Any,
) -> nn.Module:
    """A torchvision detector for `num_classes` foreground classes (labels 1..C, 0 = background).

    `min_size` may be a tuple: torchvision then picks one at random per training batch
    (detectron2's multi-scale training, e.g. 480..800 in §4.1) and tests at the last one.
    `overrides` go to the torchvision constructor (RoI/proposal counts, thresholds, ...).
    All backbone stages are trainable, as in the paper's end-to-end fine-tuning. Under
    autocast the boxes stay float32 (`box_maths_in_float32`).
    """
    if name not in DETECTORS:
        raise ValueError(f"detector={name!r}: unknown (valid: {', '.join(DETECTORS)})")
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r}: unknown (valid: {', '.join(NORMS)})")
    if arch not in BACKBONES:
        raise ValueError(f"arch={arch!r}: unknown (valid: {', '.join(BACKBONES)})")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r}: must be an integer >= 1")
    check_overrides(name, overrides)
    common: dict[str, Any] = dict(
        min_size=min_size,
        max_size=max_size,
        image_mean=list(IMAGENET_MEAN),  # the normalisation of pre-training (dupr.photometric)
        image_std=list(IMAGENET_STD),
    )
    if name == "faster_rcnn_c4":
        model = _faster_rcnn_c4(arch, num_classes, backbone_state, norm, common, overrides)
        return box_maths_in_float32(model)

    if name == "retinanet_fpn":
        # P3–P7 with P6/P7 from P5, as torchvision's retinanet_resnet50_fpn.
        returned, extra = [2, 3, 4], LastLevelP6P7(256, 256)
    else:
        returned, extra = [1, 2, 3, 4], None  # P2–P5 plus max-pooled P6 (LastLevelMaxPool)
    backbone = resnet_fpn_backbone(
        backbone_name=arch,
        weights=None,
        norm_layer=norm_layer(norm),
        trainable_layers=5,
        returned_layers=returned,
        extra_blocks=extra,
    )
    if backbone_state is not None:
        load_trunk(backbone.body, backbone_state)
    # torchvision counts the background in num_classes; RetinaNet's sigmoid head simply never
    # uses class 0, which keeps labels 1..C the same for all four detectors.
    model = _CLASSES[name](backbone, num_classes + 1, **common, **overrides)
    if name != "retinanet_fpn":  # RetinaNet's heads already use detectron2's initialisation
        init_predictors(model)
    return box_maths_in_float32(model)


def _faster_rcnn_c4(
    arch: str,
    num_classes: int,
    backbone_state: Mapping[str, Tensor] | None,
    norm: str,
    common: dict[str, Any],
    overrides: Mapping[str, Any],
) -> FasterRCNN:
    """R50-C4: RPN and 14×14 RoIAlign on conv4_x, res5 (the pre-trained layer4) as box head."""
    resnet = _resnet(arch, norm)
    del resnet.fc, resnet.avgpool  # so that the strict load sees exactly the trunk
    if backbone_state is not None:
        load_trunk(resnet, backbone_state)
    c4, c5 = resnet.layer3[-1], resnet.layer4[-1]
    c4_channels = _block_out_channels(c4)
    c5_channels = _block_out_channels(c5)
    extra_norm = SyncBatchNorm(c5_channels) if norm == "sync_bn" else None
    # One anchor set on the single map: 5 sizes × 3 ratios, as detectron2's C4 RPN.
    anchors = AnchorGenerator(sizes=((32, 64, 128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),))
    kwargs = {**_C4_RPN, **overrides}
    model = FasterRCNN(
        C4Trunk(resnet, c4_channels),
        num_classes=None,
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(["0"], output_size=14, sampling_ratio=0),
        box_head=Res5BoxHead(resnet.layer4, c5_channels, extra_norm),
        box_predictor=FastRCNNPredictor(c5_channels, num_classes + 1),
        **common,
        **kwargs,
    )
    init_predictors(model)
    return model


def box_maths_in_float32(model: FasterRCNN | RetinaNet) -> FasterRCNN | RetinaNet:
    """Anchors, box decoding, NMS and box matching in float32 under autocast, as detectron2
    does them (its anchors are float32; `Box2BoxTransform.apply_deltas` casts deltas to float).

    torchvision makes the anchors in the feature maps' dtype and decodes boxes in the box
    regression's: bfloat16 under autocast (fine-tuning on a GPU), whose 8 significant bits
    place a coordinate near 1,000 only to the nearest 4 px, and the per-level offsets of
    batched NMS to 16-32 px. Forward hooks (the state dict is unchanged) show the anchor
    generator float32 stand-ins for the feature maps and cast the heads' outputs to float32;
    the convolutions keep autocast's precision. Without autocast every cast is a no-op.
    """
    if isinstance(model, RetinaNet):
        model.anchor_generator.register_forward_pre_hook(_float32_feature_maps)
        model.head.register_forward_hook(_float32_head_outputs)
    else:
        model.rpn.anchor_generator.register_forward_pre_hook(_float32_feature_maps)
        model.rpn.head.register_forward_hook(_float32_head_outputs)
        model.roi_heads.box_predictor.register_forward_hook(_float32_head_outputs)
    return model


def _float32_feature_maps(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The anchor generator reads only the maps' sizes, dtype and device: float32 stand-ins of
    their shape, one element each in memory (a float32 copy of P2 is 70 MB per 800×1333 image).
    """
    image_list, feature_maps = args
    return image_list, [f.new_zeros((), dtype=torch.float32).expand(f.shape) for f in feature_maps]


def _float32_head_outputs(_module: nn.Module, _args: Any, out: Any) -> Any:
    """A head's outputs as float32: RPN (objectness, deltas) lists, the box predictor's
    (scores, deltas) pair, RetinaNet's dict of them."""
    if isinstance(out, dict):
        return {k: v.float() for k, v in out.items()}
    return tuple(
        [t.float() for t in part] if isinstance(part, list) else part.float() for part in out
    )


def init_predictors(model: FasterRCNN) -> None:
    """Initialise the new output layers of a two-stage detector (Faster or Mask R-CNN) as
    detectron2 (the paper's framework) does.

    torchvision's MaskRCNNPredictor uses Kaiming init with fan_out = number of classes, which
    gives mask logits of tens at the start; with small batches that diverges within a few
    iterations. detectron2 draws the class scores with std 0.01, box deltas and mask logits
    with std 0.001, biases zero.
    """
    box = model.roi_heads.box_predictor
    for layer, std in ((box.cls_score, 0.01), (box.bbox_pred, 0.001)):
        nn.init.normal_(layer.weight, std=std)
        nn.init.zeros_(layer.bias)
    mask = getattr(model.roi_heads, "mask_predictor", None)
    if mask is not None:
        nn.init.normal_(mask.mask_fcn_logits.weight, std=0.001)
        nn.init.zeros_(mask.mask_fcn_logits.bias)


def _block_out_channels(block: BasicBlock | Bottleneck) -> int:
    """Output channels of a torchvision BasicBlock/Bottleneck (its last conv)."""
    last = block.conv3 if hasattr(block, "conv3") else block.conv2
    return int(last.out_channels)


def trunk_norms(model: FasterRCNN | RetinaNet) -> list[nn.Module]:
    """The normalisation modules of the ResNet trunk of a built detector (for checks and tests)."""
    body = getattr(model.backbone, "body", None)  # FPN detectors wrap the ResNet in .body
    trunk: list[nn.Module] = [body if body is not None else model.backbone]
    head = getattr(getattr(model, "roi_heads", None), "box_head", None)
    if isinstance(head, Res5BoxHead):
        trunk.append(head.layer4)
    kinds = (nn.modules.batchnorm._NormBase, FrozenBatchNorm2d, nn.GroupNorm, nn.LayerNorm)
    return [m for part in trunk for m in part.modules() if isinstance(m, kinds)]
