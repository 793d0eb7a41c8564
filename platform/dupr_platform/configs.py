"""The pipelines' configuration: a typed schema of dataclasses, composed by Hydra.

The schema is made of the project's dataclasses: the method (`dupr.config.DUPRConfig`), the
pre-training job (`dupr_platform.ray_pretrain.PretrainSettings`), the fine-tuning recipe
(`dupr.evaluation.finetune.DetectionConfig`) and the pipeline's own sections below. They are
registered in Hydra's ConfigStore, so the YAML files in configs/ only set values: Hydra checks the
type of every value, from a file or the command line, and refuses unknown keys while it composes.
`validate_pipeline` and `validate_sweep` then check every value's range. Every error is one
`ConfigError` line that names the field.

Hydra's compose API is used instead of `@hydra.main`, so a pipeline can report a bad override as
one line before anything starts, and no output folder or working-directory change happens.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dupr.config import (
    BASELINES,
    LEVELS,
    PRESETS,
    STRIDES,
    ConfigError,
    DUPRConfig,
    check_bool,
    check_choice,
    check_int,
    check_name,
    check_number,
    field_prefix,
    preset,
)
from dupr.evaluation.detectors import DETECTORS
from dupr.evaluation.finetune import DetectionConfig
from dupr_platform.ray_pretrain import (
    EXECUTION_ONLY,
    PretrainJob,
    PretrainSettings,
    RunLocation,
    check_uris,
)
from dupr_platform.storage import AWS_CREDENTIALS, check_no_password

STAGE_KINDS = (
    "pretrain",
    "convert",
    "detection",
    "spatial",
    "correspondence",
    "probe",
    "object_probe",
)
DETECTION_DATA = ("train_images", "train_annotations", "val_images", "val_annotations")
CLASSIFICATION_DATA = ("train", "val")


# ---------------------------------------------------------------------------------------------
# Schema: configs/pretrain_and_eval.yaml


@dataclass
class PipelinePretrainConfig(PretrainSettings):
    """`pretrain`: the pre-training stage (name, storage and tracking come from the pipeline)."""

    label: str = "dupr"  # how the pre-trained model is called in results


@dataclass
class BaselinesConfig:
    """What the pre-trained model is compared with, side by side in every table."""

    random: bool = True  # evaluate a randomly initialised backbone too
    # Baseline methods pre-trained with the same data, backbone, budget and seeds as the
    # model (`dupr.config.baseline_method`; valid: `dupr.config.BASELINES`), e.g. [mocov2].
    pretrain: list[str] = field(default_factory=list)
    # label: URI of another checkpoint to evaluate side by side: a pre-training checkpoint
    # folder (state.pt), or a .pth with a torchvision ResNet or MoCo-style state_dict.
    checkpoints: dict[str, str] = field(default_factory=dict)
    # The row the others are compared with (paired differences over seeds); None: the
    # pre-trained model (`pretrain.label`).
    reference: str | None = None


@dataclass
class ResourcesConfig:
    """Per evaluation task. gpus: a number, or "auto" (one each when the cluster has GPUs)."""

    cpus: float = 1.0
    gpus: Any = "auto"  # Any: a number or "auto" (OmegaConf has no unions)


@dataclass
class DetectionDataConfig:
    """A COCO-format detection set (the four COCO fields), or a VOCdevkit root as distributed
    (`voc_root`: VOC2007 + VOC2012 trainval for training, VOC2007 test for evaluation, the
    paper's §4.1; `dupr.data.voc`), not both. All null: the bundled set built offline."""

    train_images: str | None = None
    train_annotations: str | None = None
    val_images: str | None = None
    val_annotations: str | None = None
    voc_root: str | None = None  # a local or shared-filesystem path, not s3://


@dataclass
class ClassificationDataConfig:
    """ImageFolder roots, one sub-folder per class (both null: the bundled set)."""

    train: str | None = None
    val: str | None = None


@dataclass
class EvalDataConfig:
    detection: DetectionDataConfig = field(default_factory=DetectionDataConfig)
    classification: ClassificationDataConfig = field(default_factory=ClassificationDataConfig)


def _detection_eval_schema() -> type:
    """`eval.detection`: one fine-tuning recipe, every field of `DetectionConfig` but the
    detector, applied to each detector in `detectors`; plus the VOC metric switch, logging and
    checkpoints.

    Built from DetectionConfig's own fields so that the recipe is defined once. `min_size`
    (an int or a list of ints) is typed Any because OmegaConf has no unions;
    `DetectionConfig.validate` checks it.
    """
    hints = typing.get_type_hints(DetectionConfig)
    recipe = [
        (f.name, Any if f.name == "min_size" else hints[f.name], f)
        for f in dataclasses.fields(DetectionConfig)
        if f.name != "detector"
    ]
    return dataclasses.make_dataclass(
        "DetectionEvalConfig",
        [
            ("detectors", list[str], field(default_factory=lambda: ["faster_rcnn_c4"])),
            ("voc_metric", bool, field(default=True)),
            ("log_every", int, field(default=10, metadata=EXECUTION_ONLY)),
            # Minutes between the fine-tuning's checkpoints (and one at its end, if it ran
            # longer), from which a rerun resumes.
            ("checkpoint_minutes", float, field(default=10.0, metadata=EXECUTION_ONLY)),
            *recipe,
        ],
        namespace={"__doc__": _detection_eval_schema.__doc__, "__module__": __name__},
    )


DetectionEvalConfig = _detection_eval_schema()


@dataclass
class SpatialConfig:
    """`eval.spatial`: the IoU–similarity curve of §4.6.1 (Eq. 9)."""

    level: int = 2  # 0..3 for conv2..conv5
    roi_size: int = 7
    rois_per_box: int = 20
    bins: int = 10
    max_images: int = 32
    seed: int = 0


@dataclass
class CorrespondenceConfig:
    """`eval.correspondence`: patch matching between two views (§4.6.2, Fig. 7)."""

    level: int = 2
    image_size: int | None = None  # None: the pre-training image size (the views it learnt on)
    max_images: int = 16
    pairs_per_image: int = 1
    seed: int = 0


@dataclass
class ProbeConfig:
    """`eval.probe`: the per-level linear probe (Table VI b)."""

    image_size: int | None = None  # None: the pre-training image size
    batch_size: int = 32
    # Per split, spread evenly over the folder's class-sorted order (every class keeps
    # images); None: all.
    max_images: int | None = None
    seed: int = 0


@dataclass
class ObjectProbeConfig:
    """`eval.object_probe`: a linear probe on frozen RoI features of the detection set's
    ground-truth boxes, per level (`dupr.evaluation.object_probe`)."""

    roi_size: int = 2  # cells per box side (RoIAlign, as the patch head pools)
    # None: the images as they are, near the scale the detector fine-tunes at (an int resizes
    # the shorter side). Not the pre-training size: shrunk to 96 px the demo's objects cover
    # 2-5 conv3 cells, and a 4x-budget DUPR backbone's conv3 lead over random was +0.02-0.05
    # at 96 px and +0.035-0.11 as they are, at C 0.01 (README, "Evaluation choices to review").
    image_size: int | None = None
    max_images: int = 1000  # per split, the first in annotation order (COCO train has 118k)
    # The linear SVM's regularisation. 0.01 converges in seconds on thousands of wide RoI
    # features, where C = 1 took minutes per fit without converging, and it ranked backbones
    # more consistently in the measurement above.
    C: float = 0.01
    seed: int = 0


@dataclass
class EvalConfig:
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    # Relaunches of an evaluation stage whose worker or node was lost, or which Ray's memory
    # monitor killed (dupr_platform.pipeline.LOST_WORKER); a fine-tuning resumes from its
    # checkpoint. Not part of any stage's key.
    max_failures: int = 3
    # How long an evaluation that no alive node can place (its node was lost) waits for one
    # that fits, an autoscaler's replacement or one the user starts, before it fails; the rerun
    # then resumes it. Like pretrain.worker_group_start_minutes. Not part of any stage's key.
    node_wait_minutes: float = 15.0
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    detection: DetectionEvalConfig = field(default_factory=DetectionEvalConfig)  # type: ignore[valid-type]
    spatial: SpatialConfig = field(default_factory=SpatialConfig)
    correspondence: CorrespondenceConfig = field(default_factory=CorrespondenceConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    object_probe: ObjectProbeConfig = field(default_factory=ObjectProbeConfig)


@dataclass
class EstimateConfig:
    """What the smoke run (`smoke=true`, `dupr_platform.smoke`) assumes for its estimate of the
    full run and for its memory check."""

    # Images in one pre-training epoch when pretrain.data is absent and stood in for (the
    # paper presets: ImageNet-1k train, 1,281,167); None: counted from the data.
    pretrain_images: int | None = None
    # The memory of one device of the full run, in GB: every stage's peak, projected to its
    # full per-device batch, must fit (GiB). None: the GPU's own memory when the smoke run has one;
    # no check on a CPU.
    device_memory_gib: float | None = None
    # TFLOP/s one GPU is assumed to achieve when the smoke run has none and times come from
    # counted FLOPs: about 10 % of an H100's bf16 peak (989), what convolutional nets' mixed-
    # precision training reaches there. A GPU smoke run uses its measured step times instead.
    device_tflops: float = 100.0


@dataclass
class PipelineConfig(RunLocation):
    """configs/pretrain_and_eval.yaml: storage, tracking, the stages and their settings."""

    name: str = "dupr-study"  # the MLflow parent run's name
    # Which stages run: all, or a list of STAGE_KINDS (Any: a word or a list).
    stages: Any = "all"
    # Run the study once per seed (pre-training's method.seed and every evaluation's seed set
    # to it), e.g. [0, 1, 2]; tables show means and 95 % intervals. None: once, with the seeds
    # as configured. Seed 0's stages are those of a run without seeds (shared in the cache);
    # the others' stage names end in @seed<N>.
    seeds: list[int] | None = None
    # A smoke run: every stage of this exact configuration for a few steps on a small slice of
    # the data (stand-ins for absent data) on whatever device is there; prints each stage's
    # step time and peak memory and an estimate of the full run (dupr_platform.smoke).
    smoke: bool = False
    estimate: EstimateConfig = field(default_factory=EstimateConfig)
    pretrain: PipelinePretrainConfig = field(default_factory=PipelinePretrainConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------------------------
# Schema: configs/ablate.yaml


@dataclass
class AshaConfig:
    grace_period: int = 1
    reduction_factor: float = 2.0


@dataclass
class SweepConfig:
    name: str | None = None  # default: ablation-<grid>; the sweep's MLflow run and folder
    max_concurrent_trials: int = 1
    trial_retries: int = 1  # a crashed trial is retried this often, then marked failed
    # The trial's own driver process (its stages request their own resources). 0: it holds
    # memory only (trial_memory_gib), so a fraction of a CPU does not keep a whole 1-CPU
    # stage waiting: with 0.1, a 2-CPU node ran one evaluation at a time.
    trial_cpus: float = 0.0
    trial_memory_gib: float = 1.0  # the driver imports torch: about 1 GiB resident
    # The row the table calls best. None: the first detector's box AP,
    # detection/<eval.detection.detectors[0]>/bbox/AP (sweeps.best_metric).
    metric: str | None = None
    mode: str = "max"
    early_stopping: bool = False  # ASHA on the pre-training loss reported every epoch
    asha: AshaConfig = field(default_factory=AshaConfig)


@dataclass
class AblateConfig(PipelineConfig):
    sweep: SweepConfig = field(default_factory=SweepConfig)


# configs/pretrain.yaml (pipelines/pretrain.py) uses the pre-training job itself as its schema.
SCHEMAS: dict[str, type] = {
    "pipeline": PipelineConfig,
    "ablate": AblateConfig,
    "pretrain": PretrainJob,
}


def register() -> None:
    """Put the schemas and the method presets into Hydra's ConfigStore (idempotent).

    configs/*.yaml select them in their defaults lists: `schema: pipeline` (`ablate`,
    `pretrain`) and `method: <preset>`, the presets of `dupr.config.preset` stored at
    `pretrain.method` (configs/pretrain.yaml places them at `method` with `method@method`).
    """
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        store.store(group="schema", name=name, node=schema, package="_global_")
    for name in PRESETS:
        store.store(group="method", name=name, node=preset(name), package="pretrain.method")


# ---------------------------------------------------------------------------------------------
# Composition and typed updates


def compose(config_dir: str | Path, config_name: str, overrides: list[str]) -> dict[str, Any]:
    """The resolved config `config_name` with Hydra-syntax `overrides`, as plain containers."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register()
    config_dir = Path(config_dir).resolve()
    groups = _groups(config_dir, config_name)
    for override in overrides:
        group, sep, value = override.partition("=")
        if not sep or group not in ("preset", "method"):
            continue
        options = PRESETS if group == "method" else _yaml_options(config_dir / group)
        if group not in groups:  # `preset`: a whole study, which a pre-training alone is not
            raise ConfigError(
                f"{override}: {config_name} has no {group} option (a whole-study preset is for "
                f"pipelines/pretrain_and_eval.py and ablate.py; the method is method=NAME, "
                f"valid: {', '.join(PRESETS)})"
            )
        if value not in options:
            raise ConfigError(f"{group}={value!r}: unknown (valid: {', '.join(options)})")
    try:
        with initialize_config_dir(str(config_dir), version_base="1.3", job_name=config_name):
            cfg = hydra_compose(config_name=config_name, overrides=overrides)
        if cfg.get("smoke"):
            _stand_in_for_unset_env(cfg)
        values = plain(cfg)
    except (HydraException, OmegaConfBaseException) as exc:
        raise config_error(exc) from None
    return values


def _stand_in_for_unset_env(node: Any) -> None:
    """A smoke run of a preset whose data lives at `${oc.env:VAR}` with VAR unset: those
    values become null, which every data field reads as its bundled stand-in (a preset's data
    is often absent where its smoke run is tried first, e.g. on a laptop or in CI)."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import InterpolationResolutionError

    for key in list(node.keys()):
        if OmegaConf.is_interpolation(node, key):
            text = str(node._get_node(key)._value())
            try:
                node[key]
            except InterpolationResolutionError:
                if "oc.env:" not in text:
                    raise
                node[key] = None
        elif isinstance(node.get(key), DictConfig):
            _stand_in_for_unset_env(node[key])


def _groups(config_dir: Path, config_name: str) -> set[str]:
    """The config groups config `config_name`'s defaults list selects (and those it includes)."""
    from omegaconf import DictConfig, OmegaConf

    groups: set[str] = set()
    config = OmegaConf.load(config_dir / f"{config_name}.yaml")
    for entry in config.get("defaults", []) if isinstance(config, DictConfig) else []:
        if isinstance(entry, str) and entry != "_self_":
            groups |= _groups(config_dir, entry)
        elif not isinstance(entry, str):
            (key,) = entry.keys()
            groups.add(key.removeprefix("override ").split("@")[0].strip())
    return groups


def pretrain_job(values: dict[str, Any]) -> PretrainJob:
    """The checked pre-training job of a composed configs/pretrain.yaml."""
    values = dict(values)
    method = DUPRConfig.from_dict(values.pop("method"))
    return PretrainJob(method=method, **values).validate()


def _yaml_options(folder: Path) -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in folder.glob("*.yaml")))


def typed(values: dict[str, Any], schema: type) -> Any:
    """`values` checked against `schema` (types and keys): an OmegaConf DictConfig."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.merge(OmegaConf.structured(schema), values)
    except OmegaConfBaseException as exc:
        raise config_error(exc) from None


def plain(cfg: Any) -> dict[str, Any]:
    """A DictConfig as plain dicts and lists, with its interpolations resolved."""
    from omegaconf import OmegaConf

    return typing.cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))


_MISSING = object()

# Keys that a release renamed: a configuration written for the old name gets the new one in its
# error line instead of only "unknown".
RENAMED = {
    "ray_data_actors": "ray_data_decoders",  # Ray Data decodes in tasks, not actors
    "ray_data_cpus_per_actor": "ray_data_cpus_per_decoder",
}


def unknown_key(dotted: str) -> ConfigError:
    """The error line for a key no schema has, naming the new key if it was renamed."""
    head, _, last = dotted.rpartition(".")
    if last in RENAMED:
        new = f"{head}.{RENAMED[last]}" if head else RENAMED[last]
        return ConfigError(f"{dotted}: unknown configuration key (renamed: {new})")
    return ConfigError(f"{dotted}: unknown configuration key")


def update(cfg: Any, dotted: str, value: Any) -> None:
    """Set `dotted` in a typed DictConfig: an unknown key or a wrong type is a ConfigError."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if OmegaConf.select(cfg, dotted, default=_MISSING) is _MISSING:
        raise unknown_key(dotted)
    try:
        OmegaConf.update(cfg, dotted, value, merge=False)
    except OmegaConfBaseException as exc:
        raise config_error(exc) from None


_TYPE_NAMES = {
    "Float": "a number",
    "Integer": "an integer",
    "Boolean": "true or false",
    "String": "a string",
}


def config_error(exc: BaseException) -> ConfigError:
    """Hydra's or OmegaConf's error as one line: `field=value: what is wrong`.

    Hydra wraps the OmegaConf error that names the field (`full_key`) in its own exception;
    the innermost one with a key is the one that helps.
    """
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    inner: Any = next((e for e in chain if getattr(e, "full_key", None)), None)
    if inner is not None:
        key = inner.full_key
        text = " ".join(str(inner.msg if hasattr(inner, "msg") else inner).split())
        text = text.split(" full_key:")[0]
        converted = re.match(
            r"Value '(.*)' of type '(\w+)' could not be converted to (\w+)", text, re.S
        )
        if converted:
            value, wanted = converted.group(1), converted.group(3)
            return ConfigError(f"{key}={value!r}: must be {_TYPE_NAMES.get(wanted, wanted)}")
        not_bool = re.match(r"Value '(.*)' is not a valid bool", text, re.S)
        if not_bool:
            return ConfigError(f"{key}={not_bool.group(1)!r}: must be true or false")
        unset = re.search(r"Environment variable '(\w+)' not found", text)
        if unset:
            return ConfigError(
                f"{key}: the environment variable {unset.group(1)} is not set (set it to the "
                "data's location; smoke=true runs on stand-ins without it)"
            )
        if re.match(r"Key '.*' (not in|is not in struct)", text):
            return unknown_key(key)
        invalid = re.match(
            r"Invalid type assigned: (\w+) is not a subclass of (\w+)\. value: (.*)", text
        )
        if invalid:
            return ConfigError(f"{key}={invalid.group(3)}: must be a {invalid.group(2)} mapping")
        return ConfigError(f"{key}: {text}")
    lines = [" ".join(line.split()) for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines[:2]) or type(exc).__name__
    override = getattr(exc, "override", None)
    if override is not None or "no viable alternative" in text or "mismatched input" in text:
        what = next((x for x in lines if "input" in x), text).split(" See https")[0]
        shown = f"{override}: " if isinstance(override, str) else ""
        return ConfigError(
            f"{shown}cannot parse the override ({what}; see Hydra's override syntax)"
        )
    missing = re.search(r"Could not override '([^']+)'", text)
    if missing:
        return unknown_key(missing.group(1))
    return ConfigError(text)


def to_schema(values: dict[str, Any], schema: type) -> Any:
    """`values` as instances of the schema's dataclasses (types checked on the way)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(typed(values, schema))


# ---------------------------------------------------------------------------------------------
# Value checks


def selected_kinds(stages: Any) -> list[str]:
    """`stages`: "all", a comma-separated string or a list of stage kinds."""
    kinds = stages
    if isinstance(kinds, str):
        kinds = list(STAGE_KINDS) if kinds == "all" else [k.strip() for k in kinds.split(",")]
    if not isinstance(kinds, list | tuple) or not kinds:
        raise ConfigError(
            f"stages={stages!r}: needs all or a non-empty list of {', '.join(STAGE_KINDS)}"
        )
    for kind in kinds:
        if kind not in STAGE_KINDS:
            raise ConfigError(
                f"stages: unknown stage {kind!r} (valid: all, {', '.join(STAGE_KINDS)})"
            )
    return list(kinds)


def validate_pipeline(values: dict[str, Any]) -> Any:
    """Every field of a pipeline config (configs/pretrain_and_eval.yaml), no I/O: the parsed
    `PipelineConfig`, or one ConfigError line naming the first bad field and value."""
    cfg = to_schema(values, AblateConfig if "sweep" in values else PipelineConfig)
    check_name("name", cfg.name)
    check_name("experiment", cfg.experiment, slash_ok=True)
    for key in ("storage", "tracking_uri"):
        check_name(key, getattr(cfg, key), slash_ok=True)
    check_uris(cfg.storage, cfg.tracking_uri, {"pretrain.data": cfg.pretrain.data})
    for key, uri in cfg.baselines.checkpoints.items():
        check_no_password(f"baselines.checkpoints.{key}", uri, " and ".join(AWS_CREDENTIALS[:2]))
    data = cfg.eval.data
    for section in ("detection", "classification"):
        given = getattr(data, section)
        for f in dataclasses.fields(given):
            uri = getattr(given, f.name)
            where = f"eval.data.{section}.{f.name}"
            check_no_password(where, uri, " and ".join(AWS_CREDENTIALS[:2]))
    selected_kinds(cfg.stages)
    with field_prefix("pretrain."):
        cfg.pretrain.validate()
        check_name("label", cfg.pretrain.label)
        if cfg.pretrain.label == "random":
            raise ConfigError("label='random': reserved for the randomly initialised baseline")
    check_bool("baselines.random", cfg.baselines.random)
    if cfg.seeds is not None:
        if not cfg.seeds:
            raise ConfigError("seeds=[]: give at least one seed, or null for the configured ones")
        for seed in cfg.seeds:
            check_int("seeds", seed, low=0)
        if len(set(cfg.seeds)) != len(cfg.seeds):
            raise ConfigError(f"seeds={list(cfg.seeds)}: a seed is given twice")
    for name in cfg.baselines.pretrain:
        check_choice("baselines.pretrain", name, BASELINES, "baseline method")
        if name == cfg.pretrain.label:
            raise ConfigError(
                f"baselines.pretrain: {name!r} is also pretrain.label (the model under study)"
            )
    if len(set(cfg.baselines.pretrain)) != len(cfg.baselines.pretrain):
        raise ConfigError(f"baselines.pretrain={list(cfg.baselines.pretrain)}: a name is twice")
    for label, uri in cfg.baselines.checkpoints.items():
        where = f"baselines.checkpoints.{label}"
        if (
            label in ("random", cfg.pretrain.label, *cfg.baselines.pretrain)
            or "/" in label
            or "@" in label
            or not label.strip()
        ):
            raise ConfigError(f"{where}: reserved or invalid label")
        check_name(where, uri, slash_ok=True)
    check_bool("smoke", cfg.smoke)
    with field_prefix("estimate."):
        est = cfg.estimate
        if est.pretrain_images is not None:
            check_int("pretrain_images", est.pretrain_images, low=1)
        if est.device_memory_gib is not None:
            check_number("device_memory_gib", est.device_memory_gib, above=0)
        check_number("device_tflops", est.device_tflops, above=0)
    rows = initialisations(cfg)
    if cfg.baselines.reference is not None and cfg.baselines.reference not in rows:
        raise ConfigError(
            f"baselines.reference={cfg.baselines.reference!r}: not a row of this study "
            f"(rows: {', '.join(rows)})"
        )
    with field_prefix("eval."):
        _validate_eval(cfg.eval)
    return cfg


def initialisations(cfg: Any) -> list[str]:
    """The study's rows, in table order: the pre-trained model, the pre-trained baselines,
    the baseline checkpoints, random initialisation."""
    b = cfg.baselines
    return [cfg.pretrain.label, *b.pretrain, *b.checkpoints] + (["random"] if b.random else [])


def _validate_eval(ev: Any) -> None:
    gpus = ev.resources.gpus
    check_number("resources.cpus", ev.resources.cpus, above=0)
    check_int("max_failures", ev.max_failures, low=0)
    check_number("node_wait_minutes", ev.node_wait_minutes, above=0)
    if gpus != "auto":
        check_number("resources.gpus", gpus, at_least=0)
    _check_detection_data(ev.data.detection, ev.detection.detectors)
    _all_or_none(ev.data.classification, CLASSIFICATION_DATA, "data.classification")

    det = ev.detection
    if not det.detectors:
        raise ConfigError(f"detection.detectors: empty (valid: {', '.join(DETECTORS)})")
    for detector in det.detectors:
        check_choice("detection.detectors", detector, DETECTORS, "detector")
        detection_recipe(dataclasses.asdict(det), detector)  # its errors name detection.*
    check_bool("detection.voc_metric", det.voc_metric)
    check_int("detection.log_every", det.log_every, low=1)
    check_number("detection.checkpoint_minutes", det.checkpoint_minutes, above=0)

    for section in ("spatial", "correspondence"):
        level = getattr(ev, section).level
        check_int(f"{section}.level", level, low=0, high=len(LEVELS) - 1)
    check_int("spatial.roi_size", ev.spatial.roi_size, low=1)
    check_int("spatial.rois_per_box", ev.spatial.rois_per_box, low=1)
    check_int("spatial.bins", ev.spatial.bins, low=1)
    check_int("spatial.max_images", ev.spatial.max_images, low=1)
    stride = STRIDES[ev.correspondence.level]
    if ev.correspondence.image_size is not None:
        check_int("correspondence.image_size", ev.correspondence.image_size, low=2 * stride)
    check_int("correspondence.max_images", ev.correspondence.max_images, low=1)
    check_int("correspondence.pairs_per_image", ev.correspondence.pairs_per_image, low=1)
    # The probe reads every level down to conv5 (stride 32): at least one cell there.
    if ev.probe.image_size is not None:
        check_int("probe.image_size", ev.probe.image_size, low=STRIDES[-1])
    check_int("probe.batch_size", ev.probe.batch_size, low=1)
    if ev.probe.max_images is not None:
        check_int("probe.max_images", ev.probe.max_images, low=1)
    check_int("object_probe.roi_size", ev.object_probe.roi_size, low=1)
    check_int("object_probe.max_images", ev.object_probe.max_images, low=1)
    if ev.object_probe.image_size is not None:
        check_int("object_probe.image_size", ev.object_probe.image_size, low=STRIDES[-1])
    check_number("object_probe.C", ev.object_probe.C, above=0)
    for section in ("spatial", "correspondence", "probe", "object_probe"):
        check_int(f"{section}.seed", getattr(ev, section).seed, low=0)


def detection_recipe(values: dict[str, Any], detector: str) -> DetectionConfig:
    """The checked DetectionConfig of one detector from `eval.detection`'s recipe fields."""
    known = {f.name for f in dataclasses.fields(DetectionConfig)}
    recipe = {k: v for k, v in values.items() if k in known}
    for key in ("min_size", "lr_steps"):
        if isinstance(recipe.get(key), list):
            recipe[key] = tuple(recipe[key])
    return DetectionConfig(**{**recipe, "detector": detector}).validate()


def _check_detection_data(given: Any, detectors: list[str]) -> None:
    """A VOCdevkit root or the four COCO fields (all or none), not both; a devkit on a path
    every node reads (its XMLs are read in place, not copied from object storage); and no
    mask detector on VOC, whose detection annotations have boxes only."""
    root = given.voc_root
    if not root:
        _all_or_none(given, DETECTION_DATA, "data.detection")
        return
    coco = [k for k in DETECTION_DATA if getattr(given, k)]
    if coco:
        raise ConfigError(
            f"data.detection: voc_root and {', '.join(coco)} exclude each other (give a "
            f"VOCdevkit root or the four COCO fields {', '.join(DETECTION_DATA)}, not both)"
        )
    if "://" in root:
        raise ConfigError(
            f"data.detection.voc_root={root!r}: must be a local or shared-filesystem path (a "
            "VOCdevkit on object storage is not supported; copy it where every node can read it)"
        )
    if "mask_rcnn_fpn" in detectors:
        raise ConfigError(
            "detection.detectors: mask_rcnn_fpn needs instance masks, which PASCAL VOC "
            "detection (data.detection.voc_root) does not have"
        )


def _all_or_none(given: Any, keys: tuple[str, ...], where: str) -> None:
    """All of `keys` given, or none (the bundled set)."""
    values = {k: getattr(given, k) for k in keys}
    if not any(values.values()):
        return
    missing = [k for k, v in values.items() if not v]
    if missing:
        raise ConfigError(f"{where}: needs all of {', '.join(keys)}; missing {', '.join(missing)}")


def best_metric(values: dict[str, Any]) -> str:
    """The metric whose best row a sweep's table marks: `sweep.metric`, or by default the
    first detector's box AP (so a preset with another detector needs no override)."""
    detector = values["eval"]["detection"]["detectors"][0]
    return values["sweep"].get("metric") or f"detection/{detector}/bbox/AP"


def validate_sweep(values: dict[str, Any], metrics: list[str]) -> Any:
    """The `sweep` section of configs/ablate.yaml; `metrics` are the names a trial produces."""
    sw = to_schema(values, AblateConfig).sweep
    with field_prefix("sweep."):
        if sw.name is not None:
            check_name("name", sw.name)
        check_int("max_concurrent_trials", sw.max_concurrent_trials, low=1)
        check_int("trial_retries", sw.trial_retries, low=0)
        check_number("trial_cpus", sw.trial_cpus, at_least=0)
        check_number("trial_memory_gib", sw.trial_memory_gib, above=0)
        check_choice("mode", sw.mode, ("max", "min"))
        sw.metric = best_metric(values)
        if sw.metric not in metrics:
            shown = ", ".join(metrics[:12]) + (", ..." if len(metrics) > 12 else "")
            raise ConfigError(
                f"metric={sw.metric!r}: not a metric of this sweep's trials (e.g. {shown})"
            )
        check_int("asha.grace_period", sw.asha.grace_period, low=1)
        check_number("asha.reduction_factor", sw.asha.reduction_factor, above=1)
    return sw
