"""Weight export: query backbone → torchvision state → detectron2 pickle and config."""

import json
import pickle

import numpy as np
import pytest
import torch
import torchvision
import yaml

from dupr.config import BACKBONES
from dupr.convert import (
    ConversionError,
    backbone_from_checkpoint,
    check_detectron2,
    check_torchvision_state,
    detectron2_name,
    from_detectron2,
    infer_arch,
    load_detectron2,
    query_backbone,
    save_detectron2,
    to_detectron2,
    to_torchvision,
    torchvision_name,
)
from dupr.detectron2_config import SETTINGS, detectron2_config, detectron2_config_dict
from dupr.model import DUPR
from helpers import tiny_model_config


@pytest.fixture(scope="module")
def model() -> DUPR:
    """A tiny DUPR whose BN statistics are not the defaults and whose key encoder differs."""
    torch.manual_seed(0)
    net = DUPR(tiny_model_config())
    with torch.no_grad():
        for name, buf in net.encoder_q.backbone.named_buffers():
            if "running" in name:
                buf.copy_(torch.rand_like(buf) + 0.5)
        for p in net.encoder_k.parameters():
            p.add_(1.0)
    return net


@pytest.fixture(scope="module")
def exported(model):
    return to_torchvision(model.state_dict(), "run-1/checkpoint.pt")


def _one_line_error(fn, *args, match: str) -> str:
    with pytest.raises(ConversionError, match=match) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_exported_state_loads_into_torchvision_and_computes_the_same(model, exported):
    arch, state = exported
    assert arch == "resnet18"
    net = torchvision.models.resnet18(weights=None)
    result = net.load_state_dict(state, strict=False)
    assert result.missing_keys == ["fc.weight", "fc.bias"]
    assert result.unexpected_keys == []
    source = model.encoder_q.backbone.state_dict()
    assert set(state) == set(source)
    for k, v in source.items():
        assert torch.equal(net.state_dict()[k], v), k
        assert state[k].is_contiguous() and state[k].data_ptr() != v.data_ptr()
        assert state[k].dtype == (torch.float32 if v.is_floating_point() else v.dtype)
    # The query encoder, not the (different) key encoder.
    assert not torch.equal(state["conv1.weight"], model.encoder_k.backbone.conv1.weight)
    x = torch.randn(2, 3, 64, 64)
    net.eval(), model.encoder_q.backbone.eval()
    with torch.no_grad():
        body = torch.nn.Sequential(*list(net.children())[:-2])
        assert torch.allclose(body(x), model.encoder_q.backbone(x, up_to=3)[-1])


def test_ddp_prefix_and_low_precision_are_handled(model, exported):
    ddp = {
        f"module.{k}": v.to(torch.bfloat16) if v.is_floating_point() else v
        for k, v in model.state_dict().items()
    }
    arch, state = to_torchvision(ddp, "ddp.pt")
    assert arch == "resnet18"
    for k, v in exported[1].items():
        assert state[k].dtype == v.dtype
        assert torch.equal(state[k], v.to(torch.bfloat16).to(v.dtype)), k


def test_bad_checkpoints_are_refused_with_key_and_source(model):
    full = model.state_dict()
    no_backbone = {k: v for k, v in full.items() if not k.startswith("encoder_q.backbone.")}
    msg = _one_line_error(to_torchvision, no_backbone, "a.pt", match="encoder_q.backbone")
    assert msg.startswith("a.pt:")

    missing = dict(full)
    del missing["encoder_q.backbone.layer2.0.conv1.weight"]
    msg = _one_line_error(to_torchvision, missing, "b.pt", match="layer2.0.conv1.weight")
    assert msg.startswith("b.pt:") and "missing 1" in msg

    wrong = dict(full)
    wrong["encoder_q.backbone.layer3.1.conv2.weight"] = torch.zeros(256, 256, 1, 1)
    msg = _one_line_error(to_torchvision, wrong, "c.pt", match="layer3.1.conv2.weight")
    assert msg.startswith("c.pt:") and "wrong shape" in msg

    extra = dict(full) | {"encoder_q.backbone.fc.weight": torch.zeros(1000, 512)}
    _one_line_error(to_torchvision, extra, "d.pt", match="unexpected 1 \\(fc.weight\\)")

    diverged = dict(full) | {"encoder_q.backbone.bn1.weight": torch.full((64,), float("nan"))}
    _one_line_error(to_torchvision, diverged, "e.pt", match="non-finite.*bn1.weight")


def test_every_backbone_is_recognised_on_meta_and_names_round_trip():
    for arch in BACKBONES:
        with torch.device("meta"):
            net = getattr(torchvision.models, arch)(weights=None)
        state = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
        assert infer_arch(state, arch) == arch
        check_torchvision_state(state, arch, arch)
        for k in state:
            d2 = detectron2_name(k)
            assert torchvision_name(d2) == k
            assert not any(s in d2 for s in ("layer", "bn", "downsample"))
    with torch.device("meta"):
        r50 = torchvision.models.resnet50(weights=None).state_dict()
    r50 = {k: v for k, v in r50.items() if not k.startswith("fc.")}
    _one_line_error(check_torchvision_state, r50, "resnet101", "r50.pt", match="r50.pt: .*missing")


@pytest.mark.parametrize(
    ("tv", "d2"),
    [
        ("conv1.weight", "stem.conv1.weight"),
        ("bn1.running_mean", "stem.conv1.norm.running_mean"),
        ("layer1.0.downsample.0.weight", "res2.0.shortcut.weight"),
        ("layer1.0.downsample.1.bias", "res2.0.shortcut.norm.bias"),
        ("layer4.1.bn2.weight", "res5.1.conv2.norm.weight"),
        ("layer3.5.bn3.running_var", "res4.5.conv3.norm.running_var"),
        ("layer2.0.conv3.weight", "res3.0.conv3.weight"),
    ],
)
def test_detectron2_names(tv, d2):
    assert detectron2_name(tv) == d2
    assert torchvision_name(d2) == tv


def test_detectron2_export_round_trips_through_the_pickle(exported, tmp_path):
    arch, state = exported
    obj = to_detectron2(state)
    assert obj["__author__"] == "DUPR" and obj["matching_heuristics"] is True
    model = obj["model"]
    kept = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert len(model) == len(kept) > 0
    for k, v in kept.items():
        array = model[detectron2_name(k)]
        assert isinstance(array, np.ndarray) and array.dtype == np.float32
        assert array.shape == tuple(v.shape) and np.array_equal(array, v.numpy())
    for name in model:
        assert not any(s in name for s in ("layer", "bn", "downsample", "num_batches_tracked"))
    check_detectron2(obj, arch, "x")

    path = save_detectron2(obj, tmp_path / "sub" / "dupr_r18.pkl")
    assert [p.name for p in path.parent.iterdir()] == ["dupr_r18.pkl"]  # no temp file left
    with open(path, "rb") as f:
        assert set(pickle.load(f)) == {"model", "__author__", "matching_heuristics"}
    back = from_detectron2(load_detectron2(path), str(path))
    assert set(back) == set(state)
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):
            assert back[k].dtype == torch.long
        else:
            assert back[k].dtype == torch.float32 and torch.equal(back[k], v), k
    again = to_detectron2(back)["model"]
    assert all(np.array_equal(again[k], model[k]) for k in model)


def test_detectron2_checks_reject_bad_objects(exported, tmp_path):
    arch, state = exported
    good = to_detectron2(state)

    def variant(**changes):
        return {**good, **changes}

    # MoCo's script writes an empty model without complaint when no key matches.
    _one_line_error(
        check_detectron2, variant(model={}), arch, "e.pkl", match="e.pkl: model is empty"
    )
    _one_line_error(check_detectron2, variant(__author__="Caffe2"), arch, "a.pkl", match="Caffe2")
    _one_line_error(
        check_detectron2, variant(matching_heuristics=False), arch, "h.pkl", match="heuristics"
    )
    model = dict(good["model"])
    model["res3.0.conv1.weight"] = model["res3.0.conv1.weight"].astype(np.float64)
    _one_line_error(check_detectron2, variant(model=model), arch, "d.pkl", match="res3.0.conv1")
    model = {k: v for k, v in good["model"].items() if k != "res5.1.conv2.norm.weight"}
    _one_line_error(check_detectron2, variant(model=model), arch, "m.pkl", match="res5.1.conv2")
    _one_line_error(check_detectron2, good, "resnet34", "r34.pkl", match="r34.pkl: .*missing")

    _one_line_error(save_detectron2, good, tmp_path / "w.pth", match="w.pth: .*\\.pkl")
    assert not (tmp_path / "w.pth").exists()
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    _one_line_error(load_detectron2, tmp_path / "junk.pkl", match="junk.pkl")


def test_real_resnet50_exports_completely():
    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None)
    ckpt = {f"encoder_q.backbone.{k}": v for k, v in net.state_dict().items() if "fc." not in k}
    arch, state = to_torchvision(ckpt, "r50.pt")
    assert arch == "resnet50"
    obj = to_detectron2(state)
    check_detectron2(obj, "resnet50", "r50.pkl")
    assert len(obj["model"]) == len([k for k in state if "num_batches_tracked" not in k]) == 265
    back = from_detectron2(obj)
    assert torch.equal(back["layer4.2.bn3.running_var"], net.layer4[2].bn3.running_var)


@pytest.mark.parametrize(
    ("arch", "setting", "depth"),
    [("resnet50", "voc_c4", 50), ("resnet18", "coco_fpn", 18), ("resnet101", "coco_fpn", 101)],
)
def test_detectron2_config_parses_and_holds_the_paper_settings(arch, setting, depth):
    cfg = yaml.safe_load(detectron2_config(arch, setting, "out/dupr r50.pkl"))
    model = cfg["MODEL"]
    assert model["WEIGHTS"] == "out/dupr r50.pkl"
    assert model["PIXEL_MEAN"] == [123.675, 116.280, 103.530]
    assert model["PIXEL_STD"] == [58.395, 57.120, 57.375]
    assert cfg["INPUT"]["FORMAT"] == "RGB"
    assert model["RESNETS"]["STRIDE_IN_1X1"] is False
    assert model["RESNETS"]["DEPTH"] == depth
    assert model["RESNETS"]["NORM"] == "SyncBN"
    assert model["BACKBONE"]["FREEZE_AT"] == 0
    assert model["RESNETS"].get("RES2_OUT_CHANNELS") == (64 if depth < 50 else None)
    if setting == "voc_c4":
        assert cfg["_BASE_"].endswith("faster_rcnn_R_50_C4.yaml")
        assert model["ROI_HEADS"]["NAME"] == "Res5ROIHeadsExtraNorm"
        assert cfg["SOLVER"]["MAX_ITER"] == 24000
    else:
        assert cfg["_BASE_"].endswith("mask_rcnn_R_50_FPN_1x.yaml")
        assert model["FPN"]["NORM"] == "SyncBN" and model["MASK_ON"] is True


VALID_CONFIGS = [
    (arch, setting)
    for arch in BACKBONES
    for setting in SETTINGS
    if not (setting == "voc_c4" and arch in ("resnet18", "resnet34"))
]
AWKWARD_WEIGHTS = [
    "s3://b/x: y #z.pkl",
    "out/dupr r50.pkl",
    "yes",
    "0.5",
    "~",
    "- [a, b]",
    "'quoted\" 'path'.pkl",
    "  padded  ",
    "ünïcode/w.pkl",
]


@pytest.mark.parametrize(("arch", "setting"), VALID_CONFIGS)
@pytest.mark.parametrize("weights", AWKWARD_WEIGHTS)
def test_detectron2_config_yaml_round_trips_with_the_types_detectron2_expects(
    arch, setting, weights
):
    intended = detectron2_config_dict(arch, setting, weights)
    text = detectron2_config(arch, setting, weights)
    cfg = yaml.safe_load(text)
    assert cfg == json.loads(json.dumps(intended))  # tuples become lists, nothing else changes
    assert text.isascii() and list(cfg) == list(intended)  # `_BASE_` first, as written
    model = cfg["MODEL"]
    assert model["WEIGHTS"] == weights
    assert all(type(v) is float for v in model["PIXEL_MEAN"] + model["PIXEL_STD"])
    assert type(model["RESNETS"]["DEPTH"]) is int and model["RESNETS"]["STRIDE_IN_1X1"] is False
    assert model["BACKBONE"]["FREEZE_AT"] == 0 and type(model["MASK_ON"]) is bool
    assert all(type(v) is int for v in cfg["INPUT"]["MIN_SIZE_TRAIN"])
    assert type(cfg["INPUT"]["MIN_SIZE_TEST"]) is int and cfg["INPUT"]["FORMAT"] == "RGB"
    assert cfg["TEST"]["PRECISE_BN"]["ENABLED"] is True


def test_detectron2_config_rejects_unknown_values():
    _one_line_error(detectron2_config, "resnet50", "voc_fpn", "w.pkl", match="voc_c4, coco_fpn")
    _one_line_error(detectron2_config, "resnet20", "voc_c4", "w.pkl", match="resnet20")
    _one_line_error(detectron2_config, "resnet18", "voc_c4", "w.pkl", match="bottleneck")
    _one_line_error(detectron2_config, "resnet50", "voc_c4", "", match="weights")


def test_query_backbone_strips_prefixes_only_from_the_query_encoder(model):
    state = query_backbone({f"module.{k}": v for k, v in model.state_dict().items()})
    assert set(state) == set(model.encoder_q.backbone.state_dict())
    both = {"encoder_q.backbone.conv1.weight": torch.zeros(1)}
    both["module.encoder_q.backbone.conv1.weight"] = torch.zeros(1)
    _one_line_error(query_backbone, both, "dup.pt", match="dup.pt: .*module")
    _one_line_error(query_backbone, [1, 2], "list.pt", match="list.pt: expected")


def test_backbone_from_checkpoint_reads_the_layouts_users_have(model, exported):
    """Our training state, a MoCo release (module.encoder_q.* with its MLP head under fc.*)
    and a plain torchvision state_dict all give the same backbone; fc.* is dropped."""
    arch, state = exported
    ours = {"model": model.state_dict(), "optimizer": {}, "epoch": 3}
    moco = {"state_dict": {f"module.encoder_q.{k}": v for k, v in state.items()}}
    moco["state_dict"]["module.encoder_q.fc.0.weight"] = torch.zeros(8, 512)
    moco["state_dict"]["module.encoder_k.conv1.weight"] = torch.ones(64, 3, 7, 7)
    plain = torchvision.models.resnet18().state_dict()
    for checkpoint, expected in ((ours, state), (moco, state), (plain, plain)):
        got_arch, got = backbone_from_checkpoint(checkpoint, source="ckpt.pth")
        assert got_arch == "resnet18"
        assert set(got) == {k for k in expected if not k.startswith("fc.")}
        assert torch.equal(got["layer4.1.bn2.weight"], expected["layer4.1.bn2.weight"])
    message = _one_line_error(
        backbone_from_checkpoint, {"weights": torch.zeros(2)}, match="no ResNet backbone"
    )
    assert "weights" in message
