"""One typed configuration for the DUPR method, with the paper's defaults and presets.

The defaults are §3.2.3's ablation setting (τ = 0.2, MoCo v2's views), with MoCo v2's m, SGD
momentum and weight decay, which the paper does not state; `preset()` returns the named settings
that the rest of the project refers to (`dupr`, `dupr_ablation`, `mocov2`, `cpu_demo`).
`validate()` turns every invalid value into one `ConfigError` line that names the field, before
anything is built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

LEVELS = ("conv2", "conv3", "conv4", "conv5")
STRIDES = (4, 8, 16, 32)
# The revision of what the method's code trains from a configuration. A pipeline's cache key
# for a pre-training includes it, so a change of the method (not only of its configuration)
# trains anew. 2: a patch pair counts at a level only where B spans one of its cells. 3: the
# losses run in float32 under autocast too (before, autocast ran the logits in bfloat16 on GPUs).
METHOD_REVISION = 3
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
AUGMENTATIONS = ("mocov2", "mocov2_randaugment")
BN_MODES = ("shuffle", "sync", "none")
AMP_DTYPES = ("bfloat16", "float16")
PATCH_LOGITS = ("float32", "bfloat16")
PATCH_LOSS_KERNELS = ("matmul", "attention", "cudnn_attention")
ROI_ALIGN_KERNELS = ("torchvision", "matmul")
PHOTOMETRIC_ON = ("loader", "device")


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
    # How RoIAlign runs: torchvision's kernel, or as two matmuls in the map's own dtype and
    # memory layout (dupr.roi_align; the same values in float32, bf16 rounding under autocast).
    roi_align_kernel: str = "torchvision"
    # The patch logits (queries × K) are computed in chunks when they would exceed this budget.
    loss_memory_mb: float = 256.0
    # How the patch losses' (queries × K) logits are computed (dupr.losses). bfloat16: the
    # matmuls on bf16 tensor cores, log-sum-exp and gradient accumulated in float32 (within
    # dupr.losses.BF16_LOGITS_BOUNDS of float32: tests/test_losses.py). attention: a fused
    # attention kernel that never stores the logits (same values; accuracy from a sample);
    # cudnn_attention: the same with cuDNN's attention kernel on a GPU (bfloat16 logits only;
    # on a CPU it runs as attention).
    patch_logits: str = "float32"
    patch_loss_kernel: str = "matmul"

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
    # Where the colour steps run (dupr.photometric): per image with PIL in the loader, or
    # batched on the training device, which frees the loader's CPU cores on a GPU node.
    photometric_on: str = "loader"


@dataclass
class OptimConfig:
    """SGD with cosine decay (§3.2.3: lr 0.06; momentum and weight decay are MoCo v2's), per-step
    schedule with optional linear warm-up."""

    lr: float = 0.06
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 256  # global batch over all workers
    epochs: int = 200
    warmup_epochs: float = 0.0
    amp: bool = True  # autocast on GPU only; ignored on CPU
    # float16 takes a loss scaler (dupr.train adds it) and runs BatchNorm in cuDNN's kernels,
    # which PyTorch gives float16 inputs but not bfloat16 ones; which dtype steps faster on a
    # card, benchmarks/gpu_step.py's float16 rows measure.
    amp_dtype: str = "bfloat16"
    channels_last: bool = False
    # TF32 tensor cores for float32 matmuls/convolutions on GPU (the losses run in float32).
    tf32: bool = True
    # torch.compile of the heads and losses (`dupr.train.compile_model`) and, with
    # augment.photometric_on=device, of the colour steps (`dupr.photometric.apply_photometric`):
    # faster steps on a GPU after a first minute or two of compiling; the results are those of
    # the eager model up to summation order.
    compile: bool = False
    # Replay the whole step (forward, backward, SGD) as one CUDA graph (`dupr.train.StepGraph`):
    # the host launches one graph instead of every kernel, for when it cannot keep up with the
    # GPU. Same results as the eager step; one process only; bfloat16 or no autocast.
    cuda_graph: bool = False


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


# Field checks shared by every configuration of the project (the method here, the platform's
# jobs, pipelines and sweeps): each raises one ConfigError line naming the field and value.
# Types are checked too, because values may come from code or files that bypassed a schema.


@contextlib.contextmanager
def field_prefix(prefix: str) -> Iterator[None]:
    """Prefix the field named by a ConfigError raised inside: `method.` + `model.tau=0`."""
    try:
        yield
    except ConfigError as err:
        raise ConfigError(f"{prefix}{err}") from None


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> None:
    """An integer (not a bool) in [low, high]."""
    if not isinstance(value, int) or isinstance(value, bool):
        _fail(name, value, "must be an integer")
    if low is not None and value < low:
        _fail(name, value, f"must be >= {low}")
    if high is not None and value > high:
        _fail(name, value, f"must be <= {high}")


def check_number(
    name: str,
    value: Any,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
) -> None:
    """A finite real number (not a bool) with the given strict or inclusive bounds."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        _fail(name, value, "must be a finite number")
    if above is not None and not value > above:
        _fail(name, value, f"must be > {above:g}")
    if at_least is not None and not value >= at_least:
        _fail(name, value, f"must be >= {at_least:g}")
    if below is not None and not value < below:
        _fail(name, value, f"must be < {below:g}")
    if at_most is not None and not value <= at_most:
        _fail(name, value, f"must be <= {at_most:g}")


def check_choice(name: str, value: Any, valid: tuple[str, ...], what: str = "") -> None:
    if value not in valid:
        _fail(name, value, f"{what + ' ' if what else ''}unknown (valid: {', '.join(valid)})")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(name, value, "must be true or false")


def check_name(name: str, value: Any, slash_ok: bool = False) -> None:
    """A non-empty name (of a run, an experiment, a label); without '/' unless `slash_ok`."""
    if not isinstance(value, str) or not value.strip() or (not slash_ok and "/" in value):
        _fail(
            name, value, "must not be empty" if slash_ok else "must be a non-empty name without '/'"
        )


def validate(cfg: DUPRConfig) -> DUPRConfig:
    """Check every field; raise one-line ConfigError naming the first bad field and value."""
    m, a, o = cfg.model, cfg.augment, cfg.optim
    check_choice("model.backbone", m.backbone, BACKBONES, "backbone")
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
        if not isinstance(s, int) or isinstance(s, bool) or s < 1:
            _fail("model.roi_size", m.roi_size, f"S for {level} must be an integer >= 1")
    if not isinstance(m.tau, int | float) or not math.isfinite(m.tau) or not m.tau > 0:
        _fail("model.tau", m.tau, "temperature must be > 0")
    if not isinstance(m.queue_size, int) or m.queue_size < 1:
        _fail("model.queue_size", m.queue_size, "K must be an integer >= 1")
    check_number("model.momentum", m.momentum, at_least=0, below=1)
    check_int("model.embed_dim", m.embed_dim, low=1)
    if m.hidden_dim is not None:
        check_int("model.hidden_dim", m.hidden_dim, low=1)
    check_int("model.patch_keys_per_enqueue", m.patch_keys_per_enqueue, low=1)
    check_choice("model.bn_mode", m.bn_mode, BN_MODES)
    check_bool("model.roi_aligned", m.roi_aligned)
    check_int("model.roi_sampling_ratio", m.roi_sampling_ratio, low=1)
    check_choice("model.roi_align_kernel", m.roi_align_kernel, ROI_ALIGN_KERNELS)
    check_number("model.loss_memory_mb", m.loss_memory_mb, above=0)
    check_choice("model.patch_logits", m.patch_logits, PATCH_LOGITS)
    check_choice("model.patch_loss_kernel", m.patch_loss_kernel, PATCH_LOSS_KERNELS)
    if m.patch_loss_kernel == "cudnn_attention" and m.patch_logits != "bfloat16":
        # cuDNN's attention takes bf16/fp16 inputs only.
        _fail("model.patch_loss_kernel", m.patch_loss_kernel, "needs model.patch_logits=bfloat16")
    check_int("model.image_size", m.image_size, low=1)
    # The deepest level used needs a feature map of at least 2×2 cells.
    deepest = m.deepest_level()
    min_size = 2 * STRIDES[deepest]
    if m.image_size < min_size:
        _fail(
            "model.image_size",
            m.image_size,
            f"too small for {LEVELS[deepest]} (stride {STRIDES[deepest]}): needs >= {min_size}",
        )
    check_choice("augment.preset", a.preset, AUGMENTATIONS, "augmentation")
    if not isinstance(a.crop_scale, tuple | list) or len(a.crop_scale) != 2:
        _fail("augment.crop_scale", a.crop_scale, "needs two values (min, max)")
    lo, hi = a.crop_scale
    if not all(isinstance(v, int | float) for v in (lo, hi)) or not 0 < lo <= hi <= 1:
        _fail("augment.crop_scale", a.crop_scale, "needs 0 < min <= max <= 1")
    check_int("augment.randaugment_ops", a.randaugment_ops, low=0)
    check_int("augment.randaugment_magnitude", a.randaugment_magnitude, low=0, high=30)
    check_choice("augment.photometric_on", a.photometric_on, PHOTOMETRIC_ON)
    check_number("optim.lr", o.lr, above=0)
    check_number("optim.momentum", o.momentum, at_least=0, below=1)
    check_number("optim.weight_decay", o.weight_decay, at_least=0)
    check_int("optim.batch_size", o.batch_size, low=2)
    check_int("optim.epochs", o.epochs, low=1)
    check_number("optim.warmup_epochs", o.warmup_epochs, at_least=0)
    if not o.warmup_epochs < o.epochs:
        _fail("optim.warmup_epochs", o.warmup_epochs, "must be in [0, epochs)")
    for name in ("amp", "channels_last", "tf32", "compile", "cuda_graph"):
        check_bool(f"optim.{name}", getattr(o, name))
    check_choice("optim.amp_dtype", o.amp_dtype, AMP_DTYPES)
    if o.cuda_graph and o.amp and o.amp_dtype == "float16":
        # The loss scaler decides on the host, from the gradients, whether to skip a step.
        _fail("optim.cuda_graph", o.cuda_graph, "needs amp_dtype=bfloat16 (or amp=false)")
    check_int("seed", cfg.seed, low=0)
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
        # the linear scaling of 0.06 per 256 images, K is well below the 512 bundled images.
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


# The paper's pre-training baselines that `baseline_method` derives from a DUPR configuration.
BASELINES = ("mocov2",)


def baseline_method(method: DUPRConfig, name: str) -> DUPRConfig:
    """Baseline `name` trained like `method`: same backbone, views, data order, bank size,
    schedule and budget, only the loss differs (the paper's comparison, Tables I–III).

    MoCo v2 is Eq. 2 with the image-level loss on conv5 alone (α = 0, 0, 0, 1; β = 0) at its
    τ = 0.2. Its learning rate keeps the two recipes' ratio (MoCo v2 0.03, DUPR 0.06 per 256
    images): DUPR's Eq. 2 sums several weighted losses, so its gradients are larger.
    """
    if name not in BASELINES:
        raise ConfigError(f"{name!r}: unknown baseline method (valid: {', '.join(BASELINES)})")
    reference, mocov2 = preset("dupr"), preset(name)
    model = dataclasses.replace(
        method.model, alpha=mocov2.model.alpha, beta=mocov2.model.beta, tau=mocov2.model.tau
    )
    lr = method.optim.lr * mocov2.optim.lr / reference.optim.lr
    return dataclasses.replace(method, model=model, optim=dataclasses.replace(method.optim, lr=lr))
