"""Configuration: paper defaults, presets, and one clear line for every kind of bad value."""

import dataclasses

import pytest

from dupr.config import PRESETS, ConfigError, DUPRConfig, ModelConfig, preset, validate


@pytest.mark.parametrize("name", PRESETS)
def test_presets_are_valid(name):
    validate(preset(name))


def test_paper_defaults():
    cfg = DUPRConfig()
    m, o = cfg.model, cfg.optim
    assert m.alpha == (0.1, 0.4, 0.7, 1.0) and m.beta == (0, 0, 1, 1)
    assert m.roi_size[2] == 14 and m.roi_size[3] == 7
    assert (m.tau, m.queue_size, m.momentum, m.embed_dim, m.patch_keys_per_enqueue) == (
        0.2,
        65536,
        0.999,
        128,
        32,
    )
    assert (o.lr, o.momentum, o.weight_decay, o.batch_size, o.epochs) == (0.06, 0.9, 1e-4, 256, 200)
    assert (
        preset("dupr").model.tau == 0.15 and preset("dupr").augment.preset == "mocov2_randaugment"
    )
    assert preset("dupr_ablation").model.tau == 0.2
    moco = preset("mocov2").model
    assert moco.alpha == (0, 0, 0, 1) and moco.beta == (0, 0, 0, 0)


def with_model(**kw) -> DUPRConfig:
    return DUPRConfig(model=dataclasses.replace(ModelConfig(), **kw))


BAD = [
    (with_model(alpha=(1, 1, 1)), "model.alpha=(1, 1, 1)"),
    (with_model(beta=(0, 0, 1, 1, 1)), "model.beta="),
    (with_model(roi_size=(7, 7)), "model.roi_size="),
    (with_model(roi_size=(14, 14, 0, 7)), "S for conv4"),
    (with_model(tau=0.0), "model.tau=0.0"),
    (with_model(tau=-0.2), "model.tau=-0.2"),
    (with_model(queue_size=0), "model.queue_size=0"),
    (with_model(alpha=(0.1, -0.4, 0.7, 1.0)), "weight for conv3 must be >= 0"),
    (with_model(beta=(0, 0, float("nan"), 1)), "model.beta"),
    (with_model(alpha=(0, 0, 0, 0), beta=(0, 0, 0, 0)), "all loss weights are zero"),
    (with_model(backbone="vgg16"), "model.backbone='vgg16'"),
    (with_model(image_size=48), "model.image_size=48: too small for conv5"),
    (with_model(bn_mode="group"), "model.bn_mode='group'"),
    (with_model(momentum=1.0), "model.momentum=1.0"),
    (with_model(patch_logits="float16"), "model.patch_logits='float16'"),
    (with_model(patch_loss_kernel="flash"), "model.patch_loss_kernel='flash'"),
    (
        with_model(patch_loss_kernel="cudnn_attention"),
        "model.patch_loss_kernel='cudnn_attention': needs model.patch_logits=bfloat16",
    ),
    (with_model(roi_align_kernel="cuda"), "model.roi_align_kernel='cuda'"),
    (DUPRConfig(optim=dataclasses.replace(DUPRConfig().optim, epochs=0)), "optim.epochs=0"),
    (
        DUPRConfig(
            optim=dataclasses.replace(DUPRConfig().optim, cuda_graph=True, amp_dtype="float16")
        ),
        "optim.cuda_graph=True: needs amp_dtype=bfloat16",
    ),
    (
        DUPRConfig(augment=dataclasses.replace(DUPRConfig().augment, photometric_on="gpu")),
        "augment.photometric_on='gpu': unknown (valid: loader, device)",
    ),
]


@pytest.mark.parametrize("cfg,needle", BAD, ids=[b[1] for b in BAD])
def test_bad_values_fail_with_one_line_naming_the_field(cfg, needle):
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    message = str(err.value)
    assert needle in message
    assert "\n" not in message


def test_small_image_is_fine_when_deep_levels_are_unused():
    validate(with_model(alpha=(1, 1, 0, 0), beta=(0, 0, 0, 0), image_size=32))


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"preset='dupr2'.*dupr, dupr_ablation, mocov2, cpu_demo"):
        preset("dupr2")


def test_round_trip_through_plain_dict_and_unknown_fields():
    cfg = preset("cpu_demo")
    assert DUPRConfig.from_dict(cfg.to_dict()) == cfg
    d = cfg.to_dict()
    d["model"]["temperature"] = 0.1
    with pytest.raises(ConfigError, match=r"^model.temperature: unknown field"):
        DUPRConfig.from_dict(d)
