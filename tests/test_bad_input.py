"""Every bad input, at every entry point, is one line and exit status 2 before Ray starts.

The table calls each entry point's `main` as the command line does (`pipelines/*.py`) and
checks the exit status, that stderr is one line that names the field, file or value, that no
traceback is printed, and that Ray was not started.
A few cases also run as real processes, with their own Ray temp folder, which must stay empty.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import ray

from drivers import ABLATE, PIPELINE, PRETRAIN, files_under, main_of, ray_tmpdir, run
from dupr.data import bundled_image_folder
from dupr.data.bundled_eval import bundled_detection_set

ROOT = Path(__file__).resolve().parent.parent


PIPELINE_MAIN = main_of(PIPELINE)
ABLATE_MAIN = main_of(ABLATE)
PRETRAIN_MAIN = main_of(PRETRAIN)


# (override, text the one line must contain) for pipelines/pretrain_and_eval.py.
PIPELINE_CASES = [
    # types
    ("pretrain.method.model.tau=abc", "pretrain.method.model.tau='abc': must be a number"),
    ("pretrain.method.model.tau=[1]", "pretrain.method.model.tau"),
    ("pretrain.method.optim.epochs=abc", "pretrain.method.optim.epochs='abc': must be an integer"),
    ("pretrain.method.optim.epochs=1.5", "pretrain.method.optim.epochs='1.5': must be an integer"),
    ("pretrain.method.optim.batch_size=abc", "pretrain.method.optim.batch_size='abc'"),
    ("pretrain.method.optim.batch_size=32.5", "pretrain.method.optim.batch_size='32.5'"),
    ("pretrain.method.optim.amp=maybe", "pretrain.method.optim.amp='maybe': must be true or"),
    ("pretrain.method.model.image_size=abc", "pretrain.method.model.image_size='abc'"),
    ("pretrain.method.model.embed_dim=abc", "pretrain.method.model.embed_dim='abc'"),
    ("pretrain.method.model.alpha=[a,b,c,d]", "pretrain.method.model.alpha"),
    ("pretrain.method=5", "pretrain.method=5: must be a DUPRConfig mapping"),
    ("pretrain.num_workers=abc", "pretrain.num_workers='abc': must be an integer"),
    ("pretrain.use_gpu=perhaps", "pretrain.use_gpu='perhaps'"),
    ("eval.spatial.bins=abc", "eval.spatial.bins='abc': must be an integer"),
    ("eval.probe.batch_size=1.5", "eval.probe.batch_size='1.5'"),
    ("eval.detection.iterations=many", "eval.detection.iterations='many'"),
    ("eval.resources.cpus=abc", "eval.resources.cpus='abc': must be a number"),
    ("baselines.random=sometimes", "baselines.random='sometimes'"),
    # values
    ("pretrain.method.model.tau=nan", "pretrain.method.model.tau=nan"),
    ("pretrain.method.model.tau=-0.2", "pretrain.method.model.tau=-0.2"),
    ("pretrain.method.model.tau=inf", "pretrain.method.model.tau=inf"),
    ("pretrain.method.optim.epochs=0", "pretrain.method.optim.epochs=0"),
    ("pretrain.method.optim.lr=-0.1", "pretrain.method.optim.lr=-0.1"),
    ("pretrain.method.optim.lr=nan", "pretrain.method.optim.lr=nan"),
    ("pretrain.method.optim.weight_decay=-1", "pretrain.method.optim.weight_decay=-1"),
    ("pretrain.method.optim.warmup_epochs=99", "pretrain.method.optim.warmup_epochs=99"),
    ("pretrain.method.optim.amp_dtype=fp8", "pretrain.method.optim.amp_dtype='fp8'"),
    ("pretrain.method.optim.batch_size=1", "pretrain.method.optim.batch_size=1"),
    ("pretrain.method.model.image_size=16", "pretrain.method.model.image_size=16"),
    ("pretrain.method.model.embed_dim=0", "pretrain.method.model.embed_dim=0"),
    ("pretrain.method.model.alpha=[1,2]", "pretrain.method.model.alpha"),
    ("pretrain.method.model.beta=[0,0,-1,1]", "pretrain.method.model.beta"),
    ("pretrain.method.model.roi_size=[7,7,0,3]", "pretrain.method.model.roi_size"),
    ("pretrain.method.model.queue_size=0", "pretrain.method.model.queue_size=0"),
    ("pretrain.method.model.momentum=1.5", "pretrain.method.model.momentum=1.5"),
    ("pretrain.method.model.backbone=vgg16", "pretrain.method.model.backbone='vgg16'"),
    ("pretrain.method.model.bn_mode=group", "pretrain.method.model.bn_mode='group'"),
    ("pretrain.method.augment.crop_scale=[0.5,0.1]", "pretrain.method.augment.crop_scale"),
    ("pretrain.method.augment.preset=simclr", "pretrain.method.augment.preset='simclr'"),
    ("pretrain.method.seed=-1", "pretrain.method.seed=-1"),
    ("pretrain.num_workers=0", "pretrain.num_workers=0"),
    ("pretrain.num_workers=3", "num_workers=3"),
    ("pretrain.cpus_per_worker=0", "pretrain.cpus_per_worker=0"),
    ("pretrain.loader_workers=-1", "pretrain.loader_workers=-1"),
    ("pretrain.data_loader=spark", "pretrain.data_loader='spark'"),
    ("pretrain.max_failures=-1", "pretrain.max_failures=-1"),
    ("pretrain.keep_checkpoints=0", "pretrain.keep_checkpoints=0"),
    ("pretrain.log_every=0", "pretrain.log_every=0"),
    ("pretrain.worker_group_start_minutes=0", "pretrain.worker_group_start_minutes=0"),
    ("pretrain.label=random", "pretrain.label='random'"),
    ("pretrain.label=a/b", "pretrain.label='a/b'"),
    ("eval.max_failures=-1", "eval.max_failures=-1"),
    ("eval.node_wait_minutes=0", "eval.node_wait_minutes=0"),
    ("eval.spatial.roi_size=0", "eval.spatial.roi_size=0"),
    ("eval.spatial.rois_per_box=0", "eval.spatial.rois_per_box=0"),
    ("eval.spatial.level=4", "eval.spatial.level=4"),
    ("eval.spatial.max_images=0", "eval.spatial.max_images=0"),
    ("eval.correspondence.image_size=0", "eval.correspondence.image_size=0"),
    ("eval.correspondence.max_images=0", "eval.correspondence.max_images=0"),
    ("eval.correspondence.pairs_per_image=0", "eval.correspondence.pairs_per_image=0"),
    ("eval.probe.batch_size=0", "eval.probe.batch_size=0"),
    ("eval.probe.image_size=8", "eval.probe.image_size=8"),
    ("eval.detection.iterations=0", "eval.detection.iterations=0"),
    ("eval.detection.lr=-1", "eval.detection.lr=-1"),
    ("eval.detection.detectors=[yolo]", "'yolo'"),
    ("eval.detection.detectors=[]", "eval.detection.detectors"),
    ("eval.detection.min_size=[0]", "eval.detection.min_size"),
    ("eval.detection.norm=group_norm", "eval.detection.norm='group_norm'"),
    ("eval.detection.lr_steps=[0.9,0.5]", "eval.detection.lr_steps"),
    ("eval.detection.warmup_iters=1000", "eval.detection.warmup_iters=1000"),
    ("eval.detection.checkpoint_minutes=0", "eval.detection.checkpoint_minutes=0"),
    # the default overrides are R-CNN arguments; RetinaNet's constructor refuses them
    ("eval.detection.detectors=[retinanet_fpn]", "not accepted by retinanet_fpn"),
    ("+eval.detection.overrides.nms=0.5", "['nms'] not accepted by faster_rcnn_fpn"),
    ("eval.resources.cpus=0", "eval.resources.cpus=0"),
    ("eval.resources.gpus=lots", "eval.resources.gpus='lots'"),
    ("eval.data.detection.train_images=/data/x", "eval.data.detection: needs all of"),
    ("eval.data.classification.val=/data/x", "eval.data.classification: needs all of"),
    ("eval.data.detection.voc_root=/no/such", "eval.data.detection.voc_root: '/no/such' does not"),
    ("eval.data.detection.voc_root=s3://b/voc", "eval.data.detection.voc_root='s3://b/voc': must"),
    (
        "eval.data.detection={voc_root:/x,train_images:/y}",
        "eval.data.detection: voc_root and train_images exclude each other",
    ),
    ("stages=[]", "stages=[]"),
    ("stages=[pretrain,evaluate]", "'evaluate'"),
    ("stages=[pretrain", "stages=[pretrain: cannot parse"),
    ("name=a/b", "name='a/b'"),
    ("experiment=", "experiment=''"),
    ("storage=gs://bucket/x", "gs://bucket/x"),
    ("storage=s3://KEY:SECRET@bucket/x", "storage='s3://***REDACTED***@bucket/x'"),
    ("tracking_uri=http://user:hunter22@127.0.0.1:9", "MLFLOW_TRACKING_PASSWORD"),
    # Every other location too: the data, the evaluation sets, a baseline's checkpoint.
    ("pretrain.data=s3://KEY:SECRET@bucket/x", "pretrain.data='s3://***REDACTED***@bucket/x'"),
    (
        "eval.data.detection.voc_root=s3://KEY:SECRET@b/voc",
        "eval.data.detection.voc_root='s3://***REDACTED***@b/voc': holds credentials",
    ),
    (
        "+baselines.checkpoints.moco=s3://KEY:SECRET@b/moco.pth",
        "baselines.checkpoints.moco='s3://***REDACTED***@b/moco.pth': holds credentials",
    ),
    ("tracking_uri=file:///tmp/mlruns", "file store"),
    ("tracking_uri=http://127.0.0.1:9", "127.0.0.1:9"),
    ("nope=1", "nope: unknown configuration key"),
    ("eval.detection.nope=1", "eval.detection.nope: unknown configuration key"),
    (
        "pretrain.ray_data_actors=4",
        "pretrain.ray_data_actors: unknown configuration key (renamed: pretrain.ray_data_decoders)",
    ),
    ("preset=nope", "preset='nope': unknown"),
    ("method=nope", "method='nope': unknown"),
    ("+baselines.checkpoints.random=/x", "baselines.checkpoints.random"),
    ("+baselines.checkpoints.moco=/no/such.pth", "/no/such.pth"),
    ("pretrain.data=/no/such/folder", "/no/such/folder"),
]

# (arguments, text) for pipelines/ablate.py; "{grid:NAME}" is a grid file written by the test.
ABLATE_CASES = [
    (["--grid", "gamma"], "--grid 'gamma': unknown grid"),
    ([], "--grid"),
    (["--grid", "beta", "sweep.metric=detection/yolo/bbox/AP"], "sweep.metric="),
    (["--grid", "beta", "sweep.mode=best"], "sweep.mode='best'"),
    (["--grid", "beta", "sweep.max_concurrent_trials=0"], "sweep.max_concurrent_trials=0"),
    (["--grid", "beta", "sweep.trial_cpus=-1"], "sweep.trial_cpus=-1"),
    (["--grid", "beta", "sweep.trial_memory_gib=0"], "sweep.trial_memory_gib=0"),
    (["--grid", "beta", "sweep.trial_retries=abc"], "sweep.trial_retries='abc'"),
    (["--grid", "beta", "sweep.asha.reduction_factor=1"], "sweep.asha.reduction_factor=1"),
    (["--grid", "beta", "sweep.name=a/b"], "sweep.name='a/b'"),
    (["--grid", "beta", "pretrain.method.model.tau=abc"], "pretrain.method.model.tau='abc'"),
    (["--grid", "{grid:abc}"], "value abc: pretrain.method.model.tau='abc': must be a number"),
    (["--grid", "{grid:short}"], "pretrain.method.model.beta="),
    (["--grid", "{grid:unknown}"], "pretrain.method.model.gamma: unknown configuration key"),
    (["--grid", "{grid:notyaml}"], "not YAML"),
    (["--grid", "{grid:empty}"], "needs a non-empty list `values`"),
    (["--grid", "{grid:twins}"], "two values have the same label"),
    (["--grid", "{grid:fixed}"], "eval.spatial.roi_size=0"),
]
GRIDS = {
    "abc": "key: pretrain.method.model.tau\nvalues: [0.2, abc]\n",
    "short": "key: pretrain.method.model.beta\nvalues: [[0, 1], [0, 0, 0, 1]]\n",
    "unknown": "key: pretrain.method.model.gamma\nvalues: [1]\n",
    "notyaml": "key: [unclosed\n",
    "empty": "key: pretrain.method.model.tau\nvalues: []\n",
    "twins": "key: pretrain.method.model.tau\nvalues: [0.2, 0.2]\n",
    "fixed": "key: pretrain.method.model.tau\nfixed: {eval.spatial.roi_size: 0}\nvalues: [0.2]\n",
}

# (overrides, text) for pipelines/pretrain.py.
PRETRAIN_CASES = [
    (["method.model.tau=abc"], "method.model.tau='abc': must be a number"),
    (["method.model.tau=nan"], "method.model.tau=nan"),
    (["method.optim.epochs=1.5"], "method.optim.epochs='1.5'"),
    (["method.optim.batch_size=32.5"], "method.optim.batch_size='32.5'"),
    (
        ["method.model.patch_loss_kernel=cudnn_attention"],
        "method.model.patch_loss_kernel='cudnn_attention': needs model.patch_logits=bfloat16",
    ),
    (["num_workers=abc"], "num_workers='abc'"),
    (
        ["ray_data_cpus_per_actor=2"],
        "unknown configuration key (renamed: ray_data_cpus_per_decoder)",
    ),
    (["num_workers=3"], "not divisible by num_workers=3"),
    (
        ["num_workers=2", "method.optim.cuda_graph=true"],
        "method.optim.cuda_graph=True: one worker only (num_workers=2)",
    ),
    (
        ["num_workers=2", "use_gpu=true", "gpus_per_worker=0.5"],
        "gpus_per_worker=0.5: at least 1 with num_workers=2 (NCCL refuses two ranks on one GPU)",
    ),
    (["method=nope"], "method='nope'"),
    (["preset=mocov2"], "preset=mocov2: pretrain has no preset option"),
    (["nope=1"], "nope: unknown configuration key"),
    (["tau"], "cannot parse the override"),
    (["storage="], "storage='': must not be empty"),
    (["tracking_uri=http://u:pw@127.0.0.1:9"], "MLFLOW_TRACKING_PASSWORD"),
    (["data=s3://KEY:SECRET@bucket/x"], "data='s3://***REDACTED***@bucket/x': holds credentials"),
    (["data=/no/such/folder"], "/no/such/folder"),
    (["data_loader=ray", "data=/tmp"], "data_loader=ray needs Parquet shards"),
]


@pytest.fixture
def where(tmp_path, monkeypatch):
    """Storage and tracking in tmp_path; logs there too; nothing in the repository."""
    monkeypatch.setenv("DUPR_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.chdir(tmp_path)
    return [f"storage={tmp_path / 'storage'}", f"tracking_uri=sqlite:///{tmp_path / 'm.db'}"]


def _one_line_exit_2(main, argv: list[str], needle: str, capsys) -> str:
    assert not ray.is_initialized()
    status = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert status == 2, (argv, captured.out[-2000:], captured.err[-2000:])
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and needle in lines[0], (needle, lines[0])
    assert "Traceback" not in captured.out + captured.err
    assert not ray.is_initialized(), "bad input must be found before Ray starts"
    return lines[0]


@pytest.mark.parametrize("override, needle", PIPELINE_CASES, ids=[c[0] for c in PIPELINE_CASES])
def test_pipeline_bad_input(where, override, needle, capsys):
    line = _one_line_exit_2(PIPELINE_MAIN, [*where, override], needle, capsys)
    assert "hunter22" not in line and "KEY:" not in line and ":SECRET@" not in line


@pytest.mark.parametrize("argv, needle", ABLATE_CASES, ids=[" ".join(c[0]) for c in ABLATE_CASES])
def test_ablate_bad_input(where, tmp_path, argv, needle, capsys):
    for name, text in GRIDS.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    argv = [a.replace("{grid:", str(tmp_path) + "/").replace("}", ".yaml") for a in argv]
    _one_line_exit_2(ABLATE_MAIN, [*argv, *where], needle, capsys)


@pytest.mark.parametrize(
    "argv, needle", PRETRAIN_CASES, ids=[" ".join(c[0]) for c in PRETRAIN_CASES]
)
def test_pretrain_bad_input(where, argv, needle, capsys):
    line = _one_line_exit_2(PRETRAIN_MAIN, [*where, *argv], needle, capsys)
    assert ":pw@" not in line and "KEY:" not in line and ":SECRET@" not in line


def _detection_copy(tmp_path: Path) -> Path:
    data = tmp_path / "detection"
    shutil.copytree(bundled_detection_set(), data)
    return data


def _detection_overrides(data: Path) -> list[str]:
    return [
        f"eval.data.detection.train_images={data / 'train'}",
        f"eval.data.detection.train_annotations={data / 'annotations' / 'instances_train.json'}",
        f"eval.data.detection.val_images={data / 'val'}",
        f"eval.data.detection.val_annotations={data / 'annotations' / 'instances_val.json'}",
    ]


def test_data_certain_to_fail_is_found_in_preflight(where, tmp_path, capsys):
    """Data that cannot work fails before Ray starts, with the file and the cause."""
    undecodable = tmp_path / "undecodable"
    undecodable.mkdir()
    for i in range(40):
        (undecodable / f"img{i:02d}.jpg").write_bytes(b"not a jpeg at all")
    _one_line_exit_2(
        PIPELINE_MAIN,
        [*where, f"pretrain.data={undecodable}"],
        f"pretrain.data={str(undecodable)!r}: none of the 16 images sampled decodes (first: "
        "cannot decode image",
        capsys,
    )
    few = bundled_image_folder(16).resolve()
    _one_line_exit_2(
        PIPELINE_MAIN,
        [*where, f"pretrain.data={few}"],
        f"pretrain.data={str(few)!r}: 16 images, less than one batch per worker "
        "(method.optim.batch_size=32 over num_workers=1)",
        capsys,
    )
    _one_line_exit_2(
        PRETRAIN_MAIN,
        [*where, f"data={few}", "num_workers=2", "method.optim.batch_size=64"],
        f"data={str(few)!r}: 16 images, less than one batch per worker",
        capsys,
    )

    broken_json = _detection_copy(tmp_path / "a")
    train_json = broken_json / "annotations" / "instances_train.json"
    train_json.write_text('{"images": [], "annotations": [}')
    line = _one_line_exit_2(
        PIPELINE_MAIN, [*where, *_detection_overrides(broken_json)], "not a valid JSON file", capsys
    )
    assert str(train_json) in line and "line 1, column" in line

    missing = _detection_copy(tmp_path / "b")
    coco = json.loads((missing / "annotations" / "instances_val.json").read_text())
    gone = coco["images"][2]["file_name"]
    (missing / "val" / gone).unlink()
    line = _one_line_exit_2(
        PIPELINE_MAIN,
        [*where, *_detection_overrides(missing)],
        "eval.data.detection.val_images",
        capsys,
    )
    assert repr(gone) in line

    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(next(bundled_image_folder(16).rglob("*.jpg")), flat / "one.jpg")
    _one_line_exit_2(
        PIPELINE_MAIN,
        [*where, f"eval.data.classification.train={flat}", f"eval.data.classification.val={flat}"],
        "eval.data.classification.train",
        capsys,
    )


@pytest.mark.parametrize(
    "script, argv, needle",
    [
        (PIPELINE, ["pretrain.method.model.tau=abc"], "pretrain.method.model.tau='abc'"),
        (ABLATE, ["--grid", "beta", "sweep.metric=nope"], "sweep.metric='nope'"),
        (PRETRAIN, ["num_workers=abc"], "num_workers='abc'"),
    ],
    ids=["pretrain_and_eval", "ablate", "pretrain"],
)
def test_the_commands_as_processes(tmp_path, script, argv, needle):
    """The real commands: status 2, one line on the console, no Ray session folder."""
    args = [script, *argv]
    where = [f"storage={tmp_path / 'storage'}", f"tracking_uri=sqlite:///{tmp_path / 'm.db'}"]
    ray_tmp = ray_tmpdir()
    status, output = run([*args, *where], tmp_path / "out.txt", timeout=300, ray_tmp=ray_tmp)
    lines = [line for line in output.splitlines() if line.strip()]
    assert status == 2, output[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert not files_under(ray_tmp), "Ray wrote a session: it was started"
    shutil.rmtree(ray_tmp)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_is_the_usage_not_a_bad_override(flag, capsys):
    """`--help` is what a user types first: the usage, exit status 0, for every entry point
    (ablate.py's comes from argparse)."""
    for main, script in ((PIPELINE_MAIN, "pretrain_and_eval"), (PRETRAIN_MAIN, "pretrain")):
        assert main([flag, "name=x"]) == 0
        out = capsys.readouterr().out
        assert f"python pipelines/{script}.py" in out and f"configs/{script}.yaml" in out
        assert "Overrides are key=value" in out
    with pytest.raises(SystemExit) as done:
        ABLATE_MAIN([flag])
    assert done.value.code == 0 and "--grid" in capsys.readouterr().out
