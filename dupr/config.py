"""One typed configuration for the DUPR method, with the paper's defaults and presets.

The defaults are those of §3.2.3 of the paper; `preset()` returns the named settings that the
rest of the project refers to (`dupr`, `dupr_ablation`, `mocov2`, `cpu_demo`). `validate()` turns
every invalid value into one `ConfigError` line that names the field, before anything is built.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

LEVELS = ("conv2", "conv3", "conv4", "conv5")
STRIDES = (4, 8, 16, 32)
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
AUGMENTATIONS = ("mocov2", "mocov2_randaugment")
BN_MODES = ("shuffle", "sync", "none")
AMP_DTYPES = ("bfloat16", "float16")


class ConfigError(ValueError):
    """An invalid configuration value; the message is one line naming the field and value."""


@dataclass
class ModelConfig:
    """The network and the loss of Eq. 2 (paper §3.2)."""

    backbone: str = "resnet50"
    image_size: int = 224
    # Eq. 2 weights per level conv2..conv5: α for the image-level, β for the patch-level loss.
    alpha: tuple[float, ...] = (0.1, 0.4, 0.7, 1.0)
    beta: tuple[float, ...] = (0.0, 0.0, 1.0, 1.0)
    # RoI size S per level. The paper fixes S=14 on conv4 and S=7 on conv5 (§3.2.3, memory-bank
    # paragraph); it is silent on conv2/conv3, where we use 14.
    roi_size: tuple[int, ...] = (14, 14, 14, 7)
    tau: float = 0.2
    queue_size: int = 65536  # K, keys per memory bank
    momentum: float = 0.999  # m of the key encoder
    embed_dim: int = 128
    # Hidden width of the image and patch MLPs; None = the level's channel count (MoCo v2).
    hidden_dim: int | None = None
    # Patch keys enqueued per bank per step, for the global batch (paper: 32 per batch).
    patch_keys_per_enqueue: int = 32
    # Key-encoder BatchNorm under DDP: Shuffle BN (MoCo), SyncBN on both encoders, or plain BN.
    bn_mode: str = "shuffle"
    # torchvision roi_align flags. aligned=False matches torchvision ResNet cell centres (s·o);
    # tests/test_geometry.py checks it.
    roi_aligned: bool = False
    roi_sampling_ratio: int = 2
    # The patch logits (queries × K) are computed in chunks when they would exceed this budget.
    loss_memory_mb: float = 256.0

    def image_levels(self) -> list[int]:
        return [m for m, a in enumerate(self.alpha) if a > 0]

    def patch_levels(self) -> list[int]:
        return [m for m, b in enumerate(self.beta) if b > 0]

    def deepest_level(self) -> int:
        return max(self.image_levels() + self.patch_levels())


@dataclass
class AugmentConfig:
    """Two-view augmentation (MoCo v2, optionally with RandAugment as in the main experiments)."""

    preset: str = "mocov2"
    crop_scale: tuple[float, float] = (0.2, 1.0)
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9


@dataclass
class OptimConfig:
    """SGD with cosine decay (paper §3.2.3), per-step schedule with optional linear warm-up."""

    lr: float = 0.06
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 256  # global batch over all workers
    epochs: int = 200
    warmup_epochs: float = 0.0
    amp: bool = True  # autocast on GPU only; ignored on CPU
    amp_dtype: str = "bfloat16"
    channels_last: bool = False
    # TF32 tensor cores for float32 matmuls/convolutions on GPU (the losses run in float32).
    tf32: bool = True


@dataclass
class DUPRConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DUPRConfig:
        """Build from nested plain values (e.g. a resolved Hydra/OmegaConf container)."""
        sections = {"model": ModelConfig, "augment": AugmentConfig, "optim": OptimConfig}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in sections:
                if not isinstance(value, dict):
                    raise ConfigError(f"{key}: expected a mapping, got {value!r}")
                kwargs[key] = _build(sections[key], value, prefix=key)
            elif key == "seed":
                kwargs[key] = value
            else:
                raise ConfigError(f"{key}: unknown configuration section")
        return cls(**kwargs)


def _build(klass: type, values: dict[str, Any], prefix: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(klass)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{prefix}.{key}: unknown field (valid: {', '.join(known)})")
        if isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return klass(**kwargs)


def _fail(name: str, value: Any, why: str) -> None:
    raise ConfigError(f"{name}={value!r}: {why}")


def validate(cfg: DUPRConfig) -> DUPRConfig:
    """Check every field; raise one-line ConfigError naming the first bad field and value."""
    m, a, o = cfg.model, cfg.augment, cfg.optim
    if m.backbone not in BACKBONES:
        _fail("model.backbone", m.backbone, f"unknown backbone (valid: {', '.join(BACKBONES)})")
    for name in ("alpha", "beta", "roi_size"):
        value = getattr(m, name)
        if not isinstance(value, tuple | list) or len(value) != len(LEVELS):
            _fail(f"model.{name}", value, f"needs {len(LEVELS)} values, one per level {LEVELS}")
    for name in ("alpha", "beta"):
        for level, w in zip(LEVELS, getattr(m, name), strict=True):
            if not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
                _fail(f"model.{name}", getattr(m, name), f"weight for {level} must be >= 0")
    if not m.image_levels() and not m.patch_levels():
        _fail("model.alpha/beta", (m.alpha, m.beta), "all loss weights are zero")
    for level, s in zip(LEVELS, m.roi_size, strict=True):
        if not isinstance(s, int) or s < 1:
            _fail("model.roi_size", m.roi_size, f"S for {level} must be an integer >= 1")
    if not m.tau > 0:
        _fail("model.tau", m.tau, "temperature must be > 0")
    if not isinstance(m.queue_size, int) or m.queue_size < 1:
        _fail("model.queue_size", m.queue_size, "K must be an integer >= 1")
    if not 0 <= m.momentum < 1:
        _fail("model.momentum", m.momentum, "must be in [0, 1)")
    if m.embed_dim < 1:
        _fail("model.embed_dim", m.embed_dim, "must be >= 1")
    if m.hidden_dim is not None and m.hidden_dim < 1:
        _fail("model.hidden_dim", m.hidden_dim, "must be >= 1 or null")
    if m.patch_keys_per_enqueue < 1:
        _fail("model.patch_keys_per_enqueue", m.patch_keys_per_enqueue, "must be >= 1")
    if m.bn_mode not in BN_MODES:
        _fail("model.bn_mode", m.bn_mode, f"valid: {', '.join(BN_MODES)}")
    if m.roi_sampling_ratio < 1:
        _fail("model.roi_sampling_ratio", m.roi_sampling_ratio, "must be >= 1")
    if m.loss_memory_mb <= 0:
        _fail("model.loss_memory_mb", m.loss_memory_mb, "must be > 0")
    # The deepest level used needs a feature map of at least 2×2 cells.
    deepest = m.deepest_level()
    min_size = 2 * STRIDES[deepest]
    if m.image_size < min_size:
        _fail(
            "model.image_size",
            m.image_size,
            f"too small for {LEVELS[deepest]} (stride {STRIDES[deepest]}): needs >= {min_size}",
        )
    if a.preset not in AUGMENTATIONS:
        _fail(
            "augment.preset", a.preset, f"unknown augmentation (valid: {', '.join(AUGMENTATIONS)})"
        )
    lo, hi = a.crop_scale
    if not 0 < lo <= hi <= 1:
        _fail("augment.crop_scale", a.crop_scale, "needs 0 < min <= max <= 1")
    if o.lr <= 0:
        _fail("optim.lr", o.lr, "must be > 0")
    if o.weight_decay < 0:
        _fail("optim.weight_decay", o.weight_decay, "must be >= 0")
    if o.batch_size < 2:
        _fail("optim.batch_size", o.batch_size, "must be >= 2")
    if o.epochs < 1:
        _fail("optim.epochs", o.epochs, "must be >= 1")
    if not 0 <= o.warmup_epochs < o.epochs:
        _fail("optim.warmup_epochs", o.warmup_epochs, "must be in [0, epochs)")
    if o.amp_dtype not in AMP_DTYPES:
        _fail("optim.amp_dtype", o.amp_dtype, f"valid: {', '.join(AMP_DTYPES)}")
    return cfg


PRESETS = ("dupr", "dupr_ablation", "mocov2", "cpu_demo")


def preset(name: str) -> DUPRConfig:
    """Named settings: the paper's main run, its ablation setting, MoCo v2, and a CPU demo."""
    if name == "dupr":
        # Main experiments: τ = 0.15 and RandAugment added (§3.2.3).
        return DUPRConfig(model=ModelConfig(tau=0.15), augment=AugmentConfig("mocov2_randaugment"))
    if name == "dupr_ablation":
        return DUPRConfig(model=ModelConfig(tau=0.2))
    if name == "mocov2":
        # MoCo v2: one image-level loss on conv5, τ = 0.2, lr 0.03 for batch 256 (MoCo v2 recipe).
        return DUPRConfig(
            model=ModelConfig(alpha=(0.0, 0.0, 0.0, 1.0), beta=(0.0, 0.0, 0.0, 0.0), tau=0.2),
            optim=OptimConfig(lr=0.03),
        )
    if name == "cpu_demo":
        # Small enough to pre-train for a few epochs on 2 CPU cores in about a minute; lr follows
        # the linear scaling of 0.06 per 256 images, K is well below the 512 embedded images.
        return DUPRConfig(
            model=ModelConfig(
                backbone="resnet18",
                image_size=96,
                roi_size=(7, 7, 7, 3),
                queue_size=256,
                momentum=0.99,
                hidden_dim=256,
            ),
            optim=OptimConfig(lr=0.01, batch_size=32, epochs=5, warmup_epochs=0.5),
        )
    raise ConfigError(f"preset={name!r}: unknown preset (valid: {', '.join(PRESETS)})")
