"""The whole pre-train → convert → evaluate pipeline at toy scale on a real local Ray instance,
with stage outputs on a real S3 server (moto) and tracking on a real MLflow server process."""

import contextlib
import io
import os
import pickle
import re
import shutil
import signal
import time
from importlib import metadata
from pathlib import Path

import pytest
import torch
import torchvision
from mlflow.tracking import MlflowClient

from dupr.data import bundled_image_folder
from dupr.data.bundled_eval import bundled_detection_set
from dupr_platform import software
from dupr_platform.configs import compose
from dupr_platform.pipeline import build_stages, run_pipeline
from dupr_platform.storage import open_storage
from helpers import TOY_PIPELINE, until, waiting_requests
from services import list_keys, make_bucket

# Starts a local Ray instance, an S3 and an MLflow server.
pytestmark = pytest.mark.slow

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def toy_config(name: str, storage: str, tracking: str, *extra: str) -> dict:
    data = bundled_image_folder(16)
    overrides = [
        f"name={name}",
        f"storage={storage}",
        f"tracking_uri={tracking}",
        "experiment=pipeline-tests",
        f"pretrain.data={data}",
        *TOY_PIPELINE,
        *extra,
    ]
    return compose(CONFIGS, "pretrain_and_eval", overrides)


def toy_runner(tmp_path: Path, name: str, *extra: str):
    """The pipeline's runner over the toy study's stages (SQLite tracking in tmp_path, outside
    run_pipeline), for tests that drive its launches and collections one by one: (runner,
    its stages, the SQLite tracking URI)."""
    from dupr_platform import pipeline
    from dupr_platform.tracking import RunLogger

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = toy_config(name, str(tmp_path / "storage"), tracking, *extra)
    stages = build_stages(cfg)
    pipeline.resolve_gpus(stages)
    parent = RunLogger.start(tracking, cfg["experiment"], name)
    return pipeline._Runner(cfg, stages, parent), stages, tracking


def children(client: MlflowClient, parent_id: str) -> dict[str, object]:
    exp = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return {r.data.tags.get("dupr.stage", "pretrain"): r for r in runs}


def test_pipeline_runs_every_stage_then_is_all_cache_hits(
    local_ray, s3_env, s3_server, mlflow_server, tmp_path
):
    make_bucket(s3_server.endpoint_url, "study")
    cfg = toy_config("toy-study", "s3://study/runs", mlflow_server.uri)
    names = [s.name for s in build_stages(cfg)]
    assert names == [
        "pretrain",
        "convert/dupr",
        "spatial/dupr",
        "correspondence/dupr",
        "object_probe/dupr",
        "probe/dupr",
        "detection/faster_rcnn_fpn/dupr",
        "spatial/random",
        "correspondence/random",
        "object_probe/random",
        "probe/random",
        "detection/faster_rcnn_fpn/random",
    ]

    first = run_pipeline(cfg)
    assert first.ok, [(r.name, r.status, r.error) for r in first.reports]
    assert {r.name: r.status for r in first.reports} == dict.fromkeys(names, "done")

    client = MlflowClient(mlflow_server.uri)
    parent = client.get_run(first.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["mlflow.runName"] == "toy-study"
    assert parent.data.params["eval.detection.iterations"] == "3"
    parent_files = {a.path for a in client.list_artifacts(first.parent_run_id)}
    assert {"config", "summary.md", "results.md", "results.csv", "iou_similarity.png"} <= (
        parent_files
    )
    # The releases the results were computed with: one line on every run, the full list on the
    # parent (and on the pre-training's run, from its worker).
    versions = software.summary()
    assert f"torch={torch.__version__.split('+')[0]}" in versions
    assert f"cpu={torch.backends.cpu.get_cpu_capability()}" in versions.split()  # AVX2, AVX512
    assert parent.data.tags[software.TAG] == versions and software.ARTIFACT in parent_files
    installed = Path(
        client.download_artifacts(first.parent_run_id, software.ARTIFACT, str(tmp_path))
    )
    assert f"torch=={metadata.version('torch')}" in installed.read_text().splitlines()
    assert f"# cpu {software.cpu_model()}" in installed.read_text().splitlines()
    assert "dupr/detection/faster_rcnn_fpn/bbox/AP" in parent.data.metrics
    assert 0.0 <= parent.data.metrics["dupr/correspondence/accuracy"] <= 1.0

    # One child run per stage, nested under the parent, each with its metrics.
    runs = children(client, first.parent_run_id)
    assert set(runs) == set(names)
    for name, run in runs.items():
        assert run.info.status == "FINISHED", name
        assert run.data.tags.get("dupr.cache_hit", "false") == "false", name
        # Stage tasks and training workers ran at normal priority (Ray's default is 15).
        assert run.data.tags["dupr.worker_niceness"] == "0", name
        assert run.data.tags[software.TAG] == versions, name
    assert {"bbox/AP", "bbox/AP50", "bbox/AP75", "voc/AP", "voc/AP50", "voc/AP75"} <= set(
        runs["detection/faster_rcnn_fpn/dupr"].data.metrics
    )
    detection_run = runs["detection/faster_rcnn_fpn/dupr"].info.run_id
    assert len(client.get_metric_history(detection_run, "train/loss")) >= 1
    # The random backbone's fine-tuning ran on the second core while pre-training ran on the
    # first (README, "Scheduling"), not after it.
    random_run = runs["detection/faster_rcnn_fpn/random"].info.run_id
    random_losses = client.get_metric_history(random_run, "train/loss")
    assert min(m.timestamp for m in random_losses) < runs["pretrain"].info.end_time
    assert set(runs["probe/random"].data.metrics) >= {"conv2", "conv3", "conv4", "conv5"}
    assert "slope" in runs["spatial/dupr"].data.metrics
    spatial_files = {a.path for a in client.list_artifacts(runs["spatial/dupr"].info.run_id)}
    assert {"iou_similarity.png", "iou_similarity.csv"} <= spatial_files
    assert runs["pretrain"].data.metrics["loss"] > 0  # the launcher's run, nested here too

    # Converted weights in the bucket: torchvision loads them with only fc missing; the
    # detectron2 pickle has MoCo's names.
    convert = first.records["convert/dupr"]["outputs"]
    storage = open_storage("s3://study/runs")
    rel = convert["torchvision"].removeprefix("s3://study/runs/")
    state = torch.load(
        __import__("io").BytesIO(storage.read_bytes(rel)), map_location="cpu", weights_only=True
    )
    missing, unexpected = torchvision.models.resnet18().load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    d2 = pickle.loads(storage.read_bytes(convert["detectron2"].removeprefix("s3://study/runs/")))
    assert "stem.conv1.weight" in d2["model"] and d2["matching_heuristics"] is True
    keys = list_keys(s3_server.endpoint_url, "study", "runs/stages/")
    assert sum(k.endswith("/_COMPLETE.json") for k in keys) == len(names)

    # Again: nothing is recomputed, and MLflow shows every stage as a cache hit.
    second = run_pipeline(cfg)
    assert second.ok
    assert {r.status for r in second.reports} == {"cached"}
    runs2 = children(client, second.parent_run_id)
    assert set(runs2) == set(names)
    assert all(r.data.tags["dupr.cache_hit"] == "true" for r in runs2.values())
    hit = runs2["detection/faster_rcnn_fpn/dupr"]
    assert (
        hit.data.tags["dupr.cached_from_run"] == runs["detection/faster_rcnn_fpn/dupr"].info.run_id
    )
    assert (
        hit.data.metrics["bbox/AP"]
        == runs["detection/faster_rcnn_fpn/dupr"].data.metrics["bbox/AP"]
    )


def test_a_failed_evaluation_resumes_without_pretraining_again(local_ray, tmp_path):
    """A corrupt validation image makes the evaluations that read it fail; once the file is
    repaired, the next run runs only those stages: pre-training and conversion are cache hits.
    A baseline given by URI (a MoCo-style checkpoint file) is converted and evaluated too."""
    torch.manual_seed(1)
    moco = tmp_path / "moco_v2.pth.tar"
    state = torchvision.models.resnet18().state_dict()
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in state.items()}}, moco)
    data = tmp_path / "detection"
    shutil.copytree(bundled_detection_set(), data)
    image = sorted((data / "val").iterdir())[0]
    good = image.read_bytes()
    image.write_bytes(b"not a jpeg")
    storage, tracking = str(tmp_path / "storage"), f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = toy_config(
        "toy-failure",
        storage,
        tracking,
        "baselines.random=false",
        f"+baselines.checkpoints.moco={moco}",
        f"eval.data.detection.train_images={data / 'train'}",
        f"eval.data.detection.train_annotations={data / 'annotations' / 'instances_train.json'}",
        f"eval.data.detection.val_images={data / 'val'}",
        f"eval.data.detection.val_annotations={data / 'annotations' / 'instances_val.json'}",
        # Both of the cluster's CPUs: nothing fits beside the pre-training.
        "pretrain.cpus_per_worker=2",
    )

    first = run_pipeline(cfg)
    status = {r.name: r.status for r in first.reports}
    assert not first.ok
    assert status == {
        "pretrain": "done",
        "convert/dupr": "done",
        "convert/moco": "done",
        "detection/faster_rcnn_fpn/dupr": "failed",
        "spatial/dupr": "failed",
        "correspondence/dupr": "failed",
        "object_probe/dupr": "failed",
        "probe/dupr": "done",
        "detection/faster_rcnn_fpn/moco": "failed",
        "spatial/moco": "failed",
        "correspondence/moco": "failed",
        "object_probe/moco": "failed",
        "probe/moco": "done",
    }
    converted = torch.load(first.records["convert/moco"]["outputs"]["torchvision"])
    assert torch.equal(converted["layer3.0.conv1.weight"], state["layer3.0.conv1.weight"])
    failed = next(r for r in first.reports if r.name == "spatial/dupr")
    assert image.name in failed.error and "\n" not in failed.error
    client = MlflowClient(tracking)
    assert client.get_run(first.parent_run_id).info.status == "FAILED"
    runs = children(client, first.parent_run_id)
    failed_run = runs["spatial/dupr"]
    assert failed_run.info.status == "FAILED" and image.name in failed_run.data.tags["dupr.error"]
    # The checkpoint baseline's conversion was ready from the start, but waited for the cores
    # the pre-training took (README, "Scheduling").
    assert runs["convert/moco"].info.start_time >= runs["pretrain"].info.end_time

    image.write_bytes(good)
    second = run_pipeline(cfg)
    assert second.ok
    assert {r.name: r.status for r in second.reports} == {
        "pretrain": "cached",
        "convert/dupr": "cached",
        "convert/moco": "cached",
        "detection/faster_rcnn_fpn/dupr": "done",
        "spatial/dupr": "done",
        "correspondence/dupr": "done",
        "object_probe/dupr": "done",
        "probe/dupr": "cached",
        "detection/faster_rcnn_fpn/moco": "done",
        "spatial/moco": "done",
        "correspondence/moco": "done",
        "object_probe/moco": "done",
        "probe/moco": "cached",
    }
    # The results table puts the pre-trained model and the baseline side by side.
    results = MlflowClient(tracking).get_run(second.parent_run_id).data.metrics
    assert {"dupr/spatial/slope", "moco/spatial/slope", "moco/probe/conv5"} <= set(results)
    pretrain_run = first.records["pretrain"]["run_id"]
    assert second.records["pretrain"]["run_id"] == pretrain_run

    # Only some stages: the selected ones run or are cached; the rest are left alone.
    cfg_selected = {**cfg, "stages": ["probe"], "eval": {**cfg["eval"]}}
    cfg_selected["eval"]["probe"] = {**cfg["eval"]["probe"], "batch_size": 16}
    third = run_pipeline(cfg_selected)
    assert {r.name: r.status for r in third.reports}["probe/dupr"] == "done"
    assert {r.name: r.status for r in third.reports}["detection/faster_rcnn_fpn/dupr"] == "cached"


def test_an_evaluation_whose_worker_dies_is_launched_again_then_fails(
    local_ray, tmp_path, monkeypatch
):
    """A stage's worker that dies (a real one, killed) makes the runner launch the stage again
    in the same MLflow run, `eval.max_failures` times; then the stage fails, saying so.
    (tests/test_crash_resume.py kills a fine-tuning's worker in a whole pipeline.)"""
    import ray

    from dupr_platform import pipeline

    runner, stages, tracking = toy_runner(tmp_path, "toy-lost", "eval.max_failures=2")
    stage = next(s for s in stages if s.kind != "pretrain" and not s.upstream())
    crash = ray.remote(max_retries=0)(lambda: os.kill(os.getpid(), signal.SIGKILL))
    monkeypatch.setattr(pipeline._Runner, "submit", staticmethod(lambda *_: crash.remote()))
    monkeypatch.setattr(pipeline, "RELAUNCH_AFTER_S", 0.0)

    running = {runner.launch(stage): stage}
    while running:
        ref = next(iter(running))
        runner.collect(ref, running.pop(ref), running)
    report = runner.reports[stage.name]
    assert report.status == "failed" and report.retryable  # a sweep's trial may try again
    assert report.error.startswith("WorkerCrashedError: ")
    assert report.error.endswith(" (after 2 relaunches)"), report.error
    run = MlflowClient(tracking).get_run(report.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["dupr.stage_attempt"] == "3"


def test_a_stage_that_ends_while_tracking_is_unreachable_stays_done(
    local_ray, tmp_path, monkeypatch, capsys
):
    """An evaluation that ends while the tracking server cannot be reached (here: its run's
    client pointed at a port with nothing on it, no MLflow retries) is done: its outputs are
    marked complete first. Its run is ended once the server answers again within the
    patience; after it, one line says the run could not be ended, and the driver goes on."""
    import threading

    import ray

    from dupr_platform import pipeline, tracking
    from dupr_platform.stages import StageOutput, read_marker
    from services import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(tracking, "RETRY_S", 0.1)
    monkeypatch.setattr(tracking, "PATIENCE_S", 3.0)
    runner, stages, tracking_uri = toy_runner(tmp_path, "toy-untracked")
    done = StageOutput(files={}, values={}, metrics={"accuracy": 0.5})
    monkeypatch.setattr(pipeline._Runner, "submit", staticmethod(lambda *_: ray.put(done)))
    first, second = [s for s in stages if s.kind != "pretrain" and not s.upstream()][:2]
    running: dict = {}
    for stage, back_after_s in ((first, 0.5), (second, None)):
        ref = runner.launch(stage)
        run = runner.loggers[stage.name]
        live, run.client = run.client, MlflowClient(f"http://127.0.0.1:{free_port()}")
        if back_after_s is not None:  # the server answers again within the patience
            threading.Timer(back_after_s, lambda r=run, c=live: setattr(r, "client", c)).start()
        runner.collect(ref, stage, running)
        assert runner.reports[stage.name].status == "done"
        assert read_marker(runner.storage, stage) is not None

    client = MlflowClient(tracking_uri)
    ended = client.get_run(runner.reports[first.name].run_id)
    assert ended.info.status == "FINISHED" and "dupr.outputs" in ended.data.tags
    lines = [line for line in capsys.readouterr().out.splitlines() if "could not" in line]
    unended = runner.reports[second.name].run_id
    assert lines == [
        f"[pipeline] {second.name}: its MLflow run {unended} could not be ended ([Errno 111] "
        "Connection refused); the stage's outputs are complete"
    ]
    runner.parent.end()

    # The driver exits; the next invocation's `close_orphans` ends that run KILLED. The stage
    # is complete: its cache hit ends the run FINISHED, with its outputs.
    client.set_tag(unended, tracking.CONTINUED_BY_TAG, "0" * 32)
    client.set_terminated(unended, "KILLED")
    rerun, _, _ = toy_runner(tmp_path, "toy-untracked")
    rerun.record_cache_hit(second, read_marker(rerun.storage, second))
    closed = client.get_run(unended)
    assert closed.info.status == "FINISHED" and "dupr.outputs" in closed.data.tags
    assert tracking.CONTINUED_BY_TAG not in closed.data.tags
    rerun.parent.end()


def test_a_stage_launched_or_failed_while_tracking_is_unreachable_waits_for_it(
    local_ray, tmp_path, monkeypatch, capsys
):
    """Launching a stage opens its MLflow run: while the tracking server cannot be reached,
    the launch waits for it (here 1 s) instead of failing the stage. A stage that fails
    while the server stays unreachable past the patience is FAILED, in one line that says
    its run could not be ended; the driver goes on."""
    import threading

    import ray

    from dupr_platform import pipeline, tracking
    from services import OutageClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(tracking, "RETRY_S", 0.1)
    monkeypatch.setattr(tracking, "PATIENCE_S", 1.0)
    runner, stages, tracking_uri = toy_runner(tmp_path, "toy-launch-unreachable")
    monkeypatch.setattr(pipeline._Runner, "submit", staticmethod(lambda *_: ray.put(None)))
    back = threading.Event()
    live = tracking.MlflowClient
    monkeypatch.setattr(tracking, "MlflowClient", lambda uri: OutageClient(live(uri), back))
    stage = next(s for s in stages if s.kind != "pretrain" and not s.upstream())
    threading.Timer(0.5, back.set).start()
    began = time.monotonic()
    runner.launch(stage)
    assert time.monotonic() - began >= 0.5
    run_id = runner.loggers[stage.name].run_id
    assert live(tracking_uri).get_run(run_id).info.status == "RUNNING"

    back.clear()  # down again, for longer than the patience
    runner.fail(stage, RuntimeError("CUDA error: an illegal memory access"))
    assert runner.reports[stage.name].status == "failed"
    (line,) = [x for x in capsys.readouterr().out.splitlines() if "FAILED" in x]
    assert line == (
        f"[pipeline] {stage.name}: FAILED: RuntimeError: CUDA error: an illegal memory access "
        f"(its MLflow run {run_id} could not be ended: [Errno 111] Connection refused)"
    )
    back.set()
    runner.parent.end()


def test_evaluations_beside_a_pretraining_fit_the_cluster_as_it_is_now(
    local_ray, tmp_path, monkeypatch, capsys
):
    """What the pre-training leaves free (`spare`) is counted once and given back by each
    stage that ends; after a node is lost that count is too much. The evaluations launched
    beside a pre-training also fit what the alive nodes have beyond the pre-training's and the
    running evaluations' (here a ledger of 10 CPUs, as before a loss, on a 2-CPU cluster): else
    they would take what the pre-training's restarted workers wait for."""
    import ray

    from dupr_platform import pipeline

    runner, stages, _ = toy_runner(tmp_path, "toy-shrunk")
    monkeypatch.setattr(pipeline._Runner, "submit", staticmethod(lambda *_: ray.put(None)))
    pretrain = next(s for s in stages if s.kind == "pretrain")
    running: dict = {}
    assert runner.spare(pretrain, running) == {"CPU": 1.0, "GPU": 0.0}  # 2 CPUs, less its 1
    pending = [s for s in stages if s.kind != "pretrain"]  # the random backbone's are ready

    spare = runner.launch_ready(pending, running, {"CPU": 10.0, "GPU": 0.0})
    assert [s.name for s in running.values()] == ["detection/faster_rcnn_fpn/random"]
    assert spare == {"CPU": 9.0, "GPU": 0.0}
    assert runner.launch_ready(pending, running, spare) == spare  # nothing more fits now
    # What waits beside the pre-training is said once, though it is tried again and again.
    (said,) = [x for x in capsys.readouterr().out.splitlines() if "to launch" in x]
    assert said == (
        "[pipeline] to launch once there is room beside the pre-training: spatial/random "
        "(1 CPU), correspondence/random (1 CPU), object_probe/random (1 CPU), probe/random (1 CPU)"
    )

    # The fine-tuning ends and gives its CPU back: the next one fits in its place.
    ended = running.popitem()[1]
    spare = {"CPU": spare["CPU"] + ended.resources["CPU"], "GPU": 0.0}
    spare = runner.launch_ready(pending, running, spare)
    assert len(running) == 1 and spare == {"CPU": 9.0, "GPU": 0.0}
    # And where the count is the smaller, it decides: nothing launched with none spare.
    running.clear()
    before = len(pending)
    assert runner.launch_ready(pending, running, {"CPU": 0.0, "GPU": 0.0})["CPU"] == 0.0
    assert len(pending) == before and not running
    for run in runner.loggers.values():
        run.end("KILLED")


def test_trials_at_once_launch_evaluations_only_into_room_no_other_pretraining_needs(
    local_ray, tmp_path, monkeypatch
):
    """Two pipelines sharing the cluster (a sweep's trials at once, `SharedClaims` in a real
    actor): each states its pre-training's needs before Ray places its workers, and launches
    an evaluation beside its own pre-training only where neither pre-training needs the room.
    Ray's count of what is free does not see a pre-training not yet placed: each would launch
    into the CPU the other's workers then wait for. When the other's pre-training ends, the
    evaluation is launched (tried again every WAIT_CHECK_S while its own pre-training runs)."""
    import ray

    from dupr_platform import pipeline
    from dupr_platform.claims import SharedClaims
    from dupr_platform.stages import StageOutput

    done = ray.put(StageOutput(files={}, values={}, metrics={"accuracy": 0.5}))
    monkeypatch.setattr(pipeline._Runner, "submit", staticmethod(lambda *_: done))
    monkeypatch.setattr(pipeline, "WAIT_CHECK_S", 0.5)
    claims = SharedClaims.create("dupr-claims:test")
    (a, stages, _), (b, _, _) = (toy_runner(tmp_path / x, f"toy-{x}") for x in "ab")
    a.claims = b.claims = SharedClaims.named("dupr-claims:test")
    a.owner, b.owner = "sweep:a", "sweep:b"
    pretrain = next(s for s in stages if s.kind == "pretrain")
    pending = [s for s in stages if s.kind != "pretrain"]  # the random backbone's are ready
    first = "detection/faster_rcnn_fpn/random"
    running: dict = {}
    spare_a = a.spare(pretrain, running)
    assert b.spare(pretrain, {}) == spare_a == {"CPU": 1.0, "GPU": 0.0}  # Ray: 1 CPU free
    assert claims.others("sweep:a") == {"CPU": 1.0, "GPU": 0.0}  # b's pre-training, unplaced
    assert a.launch_ready(pending, running, spare_a) == spare_a and not running

    with a.collecting(pending, running, spare_a):  # a pre-trains
        time.sleep(1.5)
        assert first not in a.reports  # tried again, and still no room
        b.pretrain_need = {}  # b's pre-training ends: its CPU is a's to launch into
        b.publish({})
        until(lambda: first in a.reports, "a's evaluation launched and collected")
    assert a.reports[first].status == "done"
    # A trial that ends (or fails: the sweep's driver does it) holds nothing.
    claims.forget("sweep:a")
    b.spare(pretrain, {})
    assert b.claim(pending[0], {}) and claims.others("sweep:a") == {"CPU": 2.0, "GPU": 0.0}
    for runner in (a, b):
        runner.parent.end()


def test_a_trial_past_its_pretrainings_launches_beside_what_the_others_hold(
    local_ray, tmp_path, monkeypatch, capsys
):
    """A sweep's trial whose pre-trainings are done (here: the random backbone's evaluations
    alone) launches its evaluations where the other trials' claims leave room: not into the
    CPUs of a pre-training that just started, whose workers Ray has not placed yet (they would
    wait behind the evaluations, and Ray Train counts that as failures), but before one that
    waits to start (it asked for room the evaluations give back within hours)."""
    import threading

    import ray

    from dupr_platform import pipeline
    from dupr_platform.claims import SharedClaims
    from dupr_platform.stages import StageOutput

    out = StageOutput(files={}, values={}, metrics={"accuracy": 0.5})
    monkeypatch.setattr(pipeline._Runner, "submit", staticmethod(lambda *_: ray.put(out)))
    monkeypatch.setattr(pipeline, "WAIT_CHECK_S", 0.5)
    claims = SharedClaims.create("dupr-claims:past")  # kept: the actor ends with its handle
    a, stages, _ = toy_runner(tmp_path, "toy-past")
    a.claims, a.owner = SharedClaims.named("dupr-claims:past"), "sweep:a"
    plan = [s for s in stages if s.name.endswith("/random")]
    claims.hold("sweep:b", {"CPU": 2.0})  # b's pre-training started: Ray still shows 2 free
    runs = threading.Thread(target=a.run, args=(plan,))
    runs.start()
    time.sleep(2.0)
    assert not a.reports and ray.available_resources().get("CPU") == 2.0
    claims.want("sweep:b", [{"CPU": 2.0}])  # b's pre-training waits to start instead
    runs.join(timeout=60)
    assert not runs.is_alive()
    assert sorted(a.reports) == sorted(s.name for s in plan)
    assert {r.status for r in a.reports.values()} == {"done"}
    (said,) = [x for x in capsys.readouterr().out.splitlines() if "to launch once" in x]
    assert said.startswith(
        "[pipeline] to launch once there is room beside what the pipelines sharing the "
        "cluster hold: "
    ), said
    for run in a.loggers.values():
        run.end()
    a.parent.end()


def test_trials_at_once_start_their_pretrainings_in_turn(local_ray, tmp_path):
    """Two pipelines sharing the cluster (a sweep's trials at once: Ray tasks, one
    `SharedClaims`) whose pre-trainings each need the whole cluster. The second waits for the
    first in the claims, not in Ray: there Ray Train counts every `worker_group_start_minutes`
    of waiting as a failure and ends the run once `controller_failure_limit` is spent (here
    after 3 s), where a paper-scale pre-training holds the GPUs for days."""
    import ray

    from dupr_platform.claims import SharedClaims

    claims = SharedClaims.create("dupr-claims:turns")  # kept: the actor ends with its handle
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(tracking).search_experiments()  # the store made once, as by a sweep's driver
    configs = [
        toy_config(
            f"toy-{x}",
            str(tmp_path / "storage"),
            tracking,
            "stages=[pretrain]",
            "pretrain.cpus_per_worker=2",
            "pretrain.worker_group_start_minutes=0.05",
            "pretrain.controller_failure_limit=0",
        )
        for x in "ab"
    ]

    @ray.remote(num_cpus=0)
    def trial(cfg: dict, label: str) -> tuple:
        with contextlib.redirect_stdout(io.StringIO()) as console:
            result = run_pipeline(
                cfg,
                run_key=f"turns:{label}",
                claims=SharedClaims.named("dupr-claims:turns"),
                print_summary=False,
                console_tag=f"trial {label}",  # as a sweep's trials say which one speaks
            )
        (report,) = [r for r in result.reports if r.name.startswith("pretrain")]
        return report.status, report.error, report.seconds, report.waited, console.getvalue()

    tasks = [trial.remote(cfg, x) for cfg, x in zip(configs, "ab", strict=True)]
    # While one waits, an autoscaler is asked for room for its worker beside the 2-CPU node.
    until(lambda: waiting_requests() != [], "the waiting worker's room asked")
    assert waiting_requests() == [[{"CPU": 2.0}]]  # the waiting trial's worker alone
    reports = ray.get(tasks)
    assert waiting_requests() == []  # withdrawn: nothing waits
    assert [r[:2] for r in reports] == [("done", "")] * 2, reports
    first, second = sorted(reports, key=lambda r: r[3])
    assert first[3] < 5 and second[3] > 0.5 * first[2], reports  # in turn, not side by side
    assert "waits to start" not in first[4]
    tag = "[trial a]" if "[trial a] pretrain: pre-training" in second[4] else "[trial b]"
    assert all(x.startswith(tag) for x in second[4].splitlines() if x.startswith("[")), second[4]
    (said,) = [x for x in second[4].splitlines() if "waits to start" in x]
    assert re.fullmatch(
        re.escape(f"{tag} pretrain: waits to start until the cluster has room for its 2 CPU (")
        + r"(2 CPU|nothing) free now; the pipelines sharing it hold 2 CPU\)",
        said,
    ), said  # the other's workers placed by Ray, or about to be
    assert claims.others("nobody") == {"CPU": 0.0, "GPU": 0.0}  # both gave everything back


def test_a_pretraining_waits_for_another_jobs_work_to_start(local_ray, tmp_path, capsys):
    """A pipeline whose pre-training needs the whole cluster while another job's work holds
    it (here a task on both CPUs for 12 s): it waits for room before Ray Train starts, which
    would count every `worker_group_start_minutes` of waiting as a failure (3 s here, no
    second try), and asks an autoscaler for its worker's room meanwhile."""
    import ray

    other = ray.remote(num_cpus=2)(lambda: time.sleep(12)).remote()
    until(lambda: ray.available_resources().get("CPU", 0.0) == 0.0, "the other job placed")
    cfg = toy_config(
        "toy-busy",
        str(tmp_path / "storage"),
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "stages=[pretrain]",
        "pretrain.cpus_per_worker=2",
        "pretrain.worker_group_start_minutes=0.05",
        "pretrain.controller_failure_limit=0",
    )
    result = run_pipeline(cfg)
    assert result.ok, result.summary
    (report,) = [r for r in result.reports if r.name == "pretrain"]
    assert report.waited > 5, report  # the other job's 12 s, less its head start
    said = [x for x in capsys.readouterr().out.splitlines() if "waits to start" in x]
    assert said == [
        "[pipeline] pretrain: waits to start until the cluster has room for its 2 CPU "
        "(nothing free now)"
    ]
    assert waiting_requests() == []  # withdrawn once it started
    assert ray.get(other) is None


def test_pretrainings_start_in_the_order_they_asked_where_they_fit():
    """`Claims.start`: a pre-training starts where it fits beside what the others hold, less
    the needs of those that asked after it; one that asked later does not pass one that waits
    (it would keep it waiting for as long as it runs); one alone starts whatever the cluster
    has now (after a lost node Ray Train waits for a new one)."""
    from dupr_platform.claims import Claims

    claims, total = Claims(), {"CPU": 4.0, "GPU": 0.0}
    for owner, workers in [("a", 2), ("b", 4), ("c", 2)]:
        claims.hold(owner, {"CPU": float(workers)})  # as `_Runner.spare` publishes it, then asks
        claims.want(owner, [{"CPU": 1.0}] * workers)
    assert [len(claims.shape(owner)) for owner in "abcd"] == [2, 4, 2, 0]
    assert claims.start("a", total) is None  # b and c asked after it
    assert claims.start("b", total) == {"CPU": 2.0, "GPU": 0.0}  # a's workers
    assert claims.start("c", total) == {"CPU": 6.0, "GPU": 0.0}  # a's, and b's before it
    claims.forget("a")  # a's pipeline ended
    assert claims.start("c", total) is not None and claims.start("b", total) is None
    assert claims.start("c", total) == {"CPU": 4.0, "GPU": 0.0}
    claims.forget("b")
    claims.hold("c", {"CPU": 8.0})
    assert claims.start("c", total) is None  # alone: larger than the cluster is now
    assert claims.start("d", total) is None  # never asked: nothing to wait for
    claims.want("d", [{"CPU": 1.0}])
    claims.forget_wait("d")  # it failed, or was interrupted, while it waited
    assert not claims.waiting and not claims.shape("d")
    # A pipeline past its pre-trainings claims room beside what the others hold, but before
    # the needs of those that wait to start.
    claims.want("c", [{"CPU": 8.0}])  # c holds 8 (its need), and waits
    assert not claims.claim("e", {"CPU": 2.0}, total)
    assert claims.claim("e", {"CPU": 2.0}, total, before_waiting=True)
    assert claims.start("c", total) == {"CPU": 2.0, "GPU": 0.0}  # then c waits for e


def test_the_start_line_holds_room_until_given_back_or_its_job_is_gone(local_ray):
    """`StartLine`: a pre-training let start holds its room against every job's check until
    it gives it back; the reservation of a job that ended (its driver killed before its
    workers started) or that outlived its limit no longer counts."""
    import ray

    from dupr_platform.claims import StartLine

    line, me = StartLine(), ray.get_runtime_context().get_job_id()
    free = {"CPU": 2.0, "GPU": 0.0}
    assert line.reserve("a", me, {"CPU": 2.0}, free, 60)
    assert not line.reserve("b", me, {"CPU": 1.0}, free, 60)  # both saw 2 CPUs free
    assert line.reserved() == {"CPU": 2.0, "GPU": 0.0}
    line.release("a")
    assert line.reserve("b", me, {"CPU": 1.0}, free, 60)
    assert line.reserve("c", "ffff0000", {"CPU": 1.0}, free, 60)  # a job the cluster lacks
    assert line.reserved() == {"CPU": 1.0, "GPU": 0.0}  # b's alone
    line.release("b")
    assert line.reserve("d", me, {"CPU": 2.0}, free, 0.0)  # past its limit at once
    assert line.reserved() == {"CPU": 0.0, "GPU": 0.0}


def test_an_evaluation_leaves_a_waiting_pretraining_its_room(local_ray, tmp_path, monkeypatch):
    """A pipeline started apart (a second `ray job submit`) whose pre-training's workers wait
    to be placed: Ray counts their CPUs as free, and an evaluation launched into them beside
    this pipeline's pre-training would take them first. It waits until that placement group
    is placed or gone, and the same for one let start whose workers Ray has not been asked
    for yet (the cluster's `StartLine`)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from dupr_platform import pipeline
    from dupr_platform.claims import StartLine, free_beside_pending

    monkeypatch.setattr(pipeline._Runner, "submit", staticmethod(lambda *_: ray.put(None)))
    runner, stages, _ = toy_runner(tmp_path, "toy-apart")
    pretrain = next(s for s in stages if s.kind == "pretrain")
    pending = [s for s in stages if s.kind != "pretrain"]
    running: dict = {}
    spare = runner.spare(pretrain, running)  # 1 of the 2 CPUs
    placed = ray.remote(num_cpus=1)(lambda: time.sleep(60)).remote()  # its pre-training
    until(lambda: ray.available_resources().get("CPU", 0.0) == 1.0, "its worker placed")
    other = placement_group([{"CPU": 2.0}])  # the other job's pre-training: waits
    until(lambda: ray.util.placement_group_table(other)["state"] == "PENDING", "pending")
    assert runner.launch_ready(pending, running, spare) == spare and not running
    remove_placement_group(other)  # the other job was stopped
    until(lambda: ray.util.placement_group_table(other)["state"] == "REMOVED", "removed")
    # Another job's pre-training let start into that CPU, its workers not asked for yet.
    key = StartLine.try_reserve({"CPU": 1.0}, free_beside_pending(), 60)
    assert key is not None
    assert runner.launch_ready(pending, running, spare) == spare and not running
    StartLine.release_now(key)  # its worker placed: Ray counts it now
    runner.launch_ready(pending, running, spare)
    assert [s.name for s in running.values()] == ["detection/faster_rcnn_fpn/random"]
    ray.cancel(placed, force=True)
    for run in runner.loggers.values():
        run.end("KILLED")
    runner.parent.end()


def test_a_lost_evaluation_waits_for_room_beside_a_pretraining(
    local_ray, tmp_path, monkeypatch, capsys
):
    """An evaluation beside a pre-training whose worker is lost (a real one, killed) is
    launched again once the cluster as it is now has room for it beside the pre-training's
    workers, not at once: after a lost node those restart and wait for the same resources.
    Here the pre-training needs the whole 2-CPU cluster, then 1 CPU (a node joined), then
    the stage runs."""
    import ray

    from dupr_platform import pipeline
    from dupr_platform.stages import StageOutput

    runner, stages, _ = toy_runner(tmp_path, "toy-held")
    stage = next(s for s in stages if s.kind != "pretrain" and not s.upstream())
    crash = ray.remote(max_retries=0)(lambda: os.kill(os.getpid(), signal.SIGKILL))
    done = StageOutput(files={}, values={}, metrics={"accuracy": 0.5})
    tasks = iter([crash.remote, lambda: ray.put(done)])
    monkeypatch.setattr(pipeline._Runner, "submit", staticmethod(lambda *_: next(tasks)()))
    monkeypatch.setattr(pipeline, "RELAUNCH_AFTER_S", 0.0)
    runner.pretrain_need = {"CPU": 2.0, "GPU": 0.0}

    running = {runner.launch(stage): stage}
    with runner.collecting([], running, {"CPU": 0.0, "GPU": 0.0}):
        until(lambda: runner.held == [stage], "the relaunch held")
        time.sleep(2.0)
        assert not running and runner.held == [stage]  # no room: not launched
        runner.pretrain_need = {"CPU": 1.0, "GPU": 0.0}  # a node joined: room for 1 CPU
        until(lambda: stage.name in runner.reports, "the stage launched again and collected")
    assert runner.reports[stage.name].status == "done" and runner.held is None
    lines = [x for x in capsys.readouterr().out.splitlines() if stage.name in x]
    assert lines[1].startswith(f"[pipeline] {stage.name}: lost its worker (WorkerCrashedError")
    assert lines[1].endswith(
        "to be launched again (1 of 3) once the cluster has room for it beside the pre-training"
    )
    assert lines[2] == f"[pipeline] {stage.name}: launched again"
    assert lines[3].startswith(f"[pipeline] {stage.name}: done in ")
    runner.parent.end()


def test_a_stage_is_timed_on_its_worker_and_its_wait_said_apart(
    local_ray, tmp_path, monkeypatch, capsys
):
    """A stage's run time is its own (measured on its worker), not the time since the driver
    submitted it: queued behind others for its CPU, a 30-s probe took minutes by the driver's
    clock. The wait to start is said beside it once it is worth saying."""
    import ray

    from dupr_platform import pipeline
    from dupr_platform.stages import StageOutput

    runner, stages, tracking = toy_runner(tmp_path, "toy-timed")
    ran = StageOutput(files={}, values={}, metrics={"accuracy": 0.5}, seconds=31.0)
    monkeypatch.setattr(pipeline._Runner, "submit", staticmethod(lambda *_: ray.put(ran)))
    first, second = [s for s in stages if s.kind != "pretrain" and not s.upstream()][:2]
    for stage, submitted_s_ago in ((first, 31.5), (second, 125.0)):
        ref = runner.launch(stage)
        runner.started[stage.name] -= submitted_s_ago
        runner.collect(ref, stage, {})
        assert runner.reports[stage.name].seconds == 31.0
    waited = runner.reports[second.name].waited
    assert 93.5 < waited < 96  # 94 s, and the launch's own time
    lines = [x for x in capsys.readouterr().out.splitlines() if ": done in" in x]
    assert lines == [
        f"[pipeline] {first.name}: done in 31s",
        f"[pipeline] {second.name}: done in 31s (waited {pipeline.format_duration(waited)} to "
        "start)",
    ]
    assert pipeline.format_duration(waited) in ("1m34s", "1m35s", "1m36s")
    # In MLflow, where the run's duration counts from its launch, the two apart.
    metrics = MlflowClient(tracking).get_run(runner.reports[second.name].run_id).data.metrics
    assert metrics["stage/seconds"] == 31.0 and metrics["stage/waited_seconds"] == waited
    assert metrics["accuracy"] == 0.5
    runner.parent.end()


RUNNING_LINE = """
import time, types
import ray
from dupr_platform.cluster import start_ray, stop_ray
from dupr_platform.pipeline import _Runner

start_ray("test")  # as the main job does: its own instance, with Ray's dashboard
hold = ray.remote(num_cpus=ray.cluster_resources()["CPU"])(lambda: time.sleep(120))
running = {
    hold.options(name=name).remote(): types.SimpleNamespace(name=name)
    for name in ("probe/a", "probe/b")  # b is queued: a holds every CPU
}
submitted = time.monotonic() - 20
runner = types.SimpleNamespace(started={"probe/a": submitted, "probe/b": submitted})
deadline = time.monotonic() + 60
while not (line := _Runner.running_line(runner, running)).startswith("running: probe/a"):
    assert time.monotonic() < deadline, line
    time.sleep(0.2)
print("line:", line)
for ref in running:
    ray.cancel(ref, force=True)
stop_ray()
"""


def test_the_running_line_tells_running_stages_from_queued_ones(local_ray, tmp_path):
    """The driver's minute-by-minute line: the stages that run, how long they have run, and
    apart from them those still queued for their resources (Ray's state API, which the main
    job's own Ray instance serves); where that API is off (this module's Ray instance has
    no dashboard), every submitted stage with its time since submission."""
    import types

    import ray

    from drivers import run
    from dupr_platform import pipeline

    status, output = run(["-c", RUNNING_LINE], tmp_path / "out.txt", timeout=180)
    assert status == 0, output[-4000:]
    (line,) = [x[len("line: ") :] for x in output.splitlines() if x.startswith("line: ")]
    found = re.fullmatch(r"running: probe/a \((\d+)s\); queued: probe/b \((\d+)s\)", line)
    assert found, line
    assert int(found[1]) < 20 <= int(found[2])

    submitted = time.monotonic() - 65
    runner = types.SimpleNamespace(started={"probe/a": submitted})
    task = ray.remote(lambda: None).remote()
    line = pipeline._Runner.running_line(runner, {task: types.SimpleNamespace(name="probe/a")})
    assert re.fullmatch(r"running: probe/a \(1m0[5-9]s\)", line), line


def test_a_stage_continues_its_mlflow_run_unless_it_was_deleted(tmp_path):
    """What a rerun does with the run named beside a fine-tuning's resume state: continues it,
    though settings outside the stage's key (checkpoint_minutes, log_every) changed, without
    the earlier invocation's launch count; a new run if the user deleted it."""
    from dupr_platform import pipeline
    from dupr_platform.tracking import RunLogger

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = toy_config("toy-continue", str(tmp_path / "storage"), tracking)
    stage = next(s for s in build_stages(cfg) if s.kind == "detection")
    parent = RunLogger.start(tracking, cfg["experiment"], "toy-continue")
    runner = pipeline._Runner(cfg, build_stages(cfg), parent)
    first = runner.child_run(stage, cache_hit=False)
    first.set_tag(pipeline.ATTEMPT_TAG, 2)  # that invocation launched it again
    first.end("KILLED")
    stage.config.update(checkpoint_minutes=1.0, log_every=1)
    again = runner.child_run(stage, cache_hit=False, run_id=first.run_id)
    client = MlflowClient(tracking)
    assert again.run_id == first.run_id
    continued = client.get_run(again.run_id)
    assert continued.info.status == "RUNNING"
    assert pipeline.ATTEMPT_TAG not in continued.data.tags
    again.end("KILLED")
    client.delete_run(first.run_id)
    new = runner.child_run(stage, cache_hit=False, run_id=first.run_id)
    assert new.run_id != first.run_id
    assert client.get_run(new.run_id).data.params["stage.detector"] == stage.config["detector"]


def test_seeds_and_the_mocov2_baseline_give_results_with_intervals(local_ray, tmp_path, capsys):
    """`seeds=[0,1]` with the MoCo v2 baseline: both methods pre-trained per seed, every row
    evaluated per seed, and the tables (console, results.md/.csv, MLflow) show means, intervals
    and paired differences; the plots are logged. Seed 0's stages are a plain run's."""
    storage, tracking = str(tmp_path / "storage"), f"sqlite:///{tmp_path / 'mlflow.db'}"
    kinds = "stages=[pretrain,convert,spatial,correspondence]"  # the cheap evaluations
    cfg = toy_config("toy-seeds", storage, tracking, kinds, "baselines.pretrain=[mocov2]")
    result = run_pipeline({**cfg, "seeds": [0, 1]})
    assert result.ok, [(r.name, r.status, r.error) for r in result.reports]
    done = {r.name for r in result.reports if r.status == "done"}
    assert {"pretrain", "pretrain@seed1", "pretrain/mocov2", "pretrain/mocov2@seed1"} <= done
    assert {"spatial/mocov2@seed1", "correspondence/random@seed1", "spatial/dupr@seed1"} <= done
    moco = (
        MlflowClient(tracking)
        .get_run(result.records["pretrain/mocov2@seed1"]["run_id"])
        .data.params
    )
    assert moco["model.beta"].strip("[]()") == "0.0, 0.0, 0.0, 0.0" and moco["seed"] == "1"

    # While a pre-training held the driver, the evaluations that ended were recorded then (a
    # driver dying later keeps them), not once it was over, and those they made ready (a
    # conversion's evaluations) were launched then, in what the pre-training left free.
    client = MlflowClient(tracking)
    runs = client.search_runs(
        [client.get_run(result.parent_run_id).info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'",
    )
    held = [(r.info.start_time, r.info.end_time) for r in runs if "pretrain" in r.info.run_name]
    during = [
        r.info.run_name
        for r in runs
        if "pretrain" not in r.info.run_name
        and any(start < r.info.end_time < end for start, end in held)
    ]
    assert len(held) == 4 and during, [(r.info.run_name, r.info.end_time) for r in runs]
    launched = [
        r.info.run_name
        for r in runs
        if "pretrain" not in r.info.run_name
        and any(start < r.info.start_time < end for start, end in held)
    ]
    assert launched, [(r.info.run_name, r.info.start_time, r.info.end_time) for r in runs]

    out = capsys.readouterr().out
    assert "Mean [95% interval] over 2 seed(s)" in out
    assert "| mocov2 − dupr |" in out and "| random − dupr |" in out
    client = MlflowClient(tracking)
    parent = client.get_run(result.parent_run_id)
    for init in ("dupr", "mocov2", "random"):
        low = parent.data.metrics[f"{init}/spatial/slope/ci95_low"]
        high = parent.data.metrics[f"{init}/spatial/slope/ci95_high"]
        assert low <= parent.data.metrics[f"{init}/spatial/slope"] <= high
    files = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"results.md", "results.csv", "iou_similarity.png"} <= files
    rows = client.download_artifacts(result.parent_run_id, "results.csv", str(tmp_path))
    text = Path(rows).read_text()
    assert text.startswith("init,metric,seeds,mean,ci95_low,ci95_high,reference,difference")
    assert "\nrandom,correspondence/accuracy,2," in text

    plain = run_pipeline(cfg)  # no seeds: seed 0's stages, all cached
    status = {r.name: r.status for r in plain.reports}
    assert status["pretrain/mocov2"] == status["spatial/random"] == "cached"
    assert set(status.values()) == {"cached", "not selected"}  # probe, detection
