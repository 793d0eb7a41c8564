"""Pre-training on a real local Ray instance, storage on a real S3 server, a real MLflow server."""

import math
import os
import re
import shutil
import threading
import time

import boto3
import pytest
import ray.train
import torch
from mlflow.tracking import MlflowClient

from drivers import PRETRAIN, ROOT, Driver, main_of
from dupr.data import bundled_image_folder
from dupr_platform import software
from dupr_platform.configs import compose, pretrain_job
from dupr_platform.failures import UnrecoverableError
from dupr_platform.ray_pretrain import (
    TRAIN_POLL_INTERVAL,
    TRAIN_POLL_INTERVAL_S,
    load_checkpoint_state,
    preflight,
    run_pretraining,
)
from dupr_platform.shards import prepare_shards
from helpers import TOY_PIPELINE, autoscaler_request, tiny_job, until, waiting_requests
from services import make_bucket


def bucket_keys(endpoint: str, bucket: str, prefix: str) -> list[str]:
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_two_workers_on_s3_and_mlflow_then_resume(
    local_ray, s3_env, s3_server, mlflow_server, tmp_path, monkeypatch
):
    make_bucket(s3_server.endpoint_url, "pretrain")
    # Data in the object-storage format: Parquet shards on S3, read by every worker.
    prepare_shards(str(bundled_image_folder(24)), "s3://pretrain/shards", images_per_shard=10)
    job = tiny_job("ddp-s3", "s3://pretrain/runs", mlflow_server.uri, epochs=2)
    job.data = "s3://pretrain/shards"
    monkeypatch.delenv(TRAIN_POLL_INTERVAL, raising=False)
    seen = tmp_path / "poll_interval"

    class PollIntervalSeen(ray.train.UserCallback):  # local: pickled by value for Ray
        """Runs in Ray Train's controller: writes the poll interval that process was given."""

        def after_report(self, run_context, metrics, checkpoint) -> None:
            seen.write_text(os.environ.get(TRAIN_POLL_INTERVAL, "unset"))

    result = run_pretraining(job, callbacks=[PollIntervalSeen()])
    assert (result.epochs, result.steps) == (2, 6)  # 24 images / global batch 8 = 3 steps/epoch
    # The controller polled at the platform's interval, not Ray's 2 s (ray_pretrain).
    assert seen.read_text() == TRAIN_POLL_INTERVAL_S
    assert result.checkpoint_uri == "s3://pretrain/runs/ddp-s3/checkpoint_epoch=0002"

    keys = bucket_keys(s3_server.endpoint_url, "pretrain", "runs/ddp-s3/")
    assert "runs/ddp-s3/checkpoint_epoch=0002/state.pt" in keys
    assert "runs/ddp-s3/checkpoint_epoch=0001/state.pt" in keys

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and "dupr.resumed_at_step" not in run.data.tags
    assert run.data.params["model.alpha"] == "(0.1, 0.4, 0.7, 1.0)"
    assert run.data.params["job.num_workers"] == "2"
    # The training workers ran at normal priority, not at Ray's default worker niceness 15.
    tags = run.data.tags
    assert (tags["dupr.world_size"], tags["dupr.device"], tags["dupr.worker_niceness"]) == (
        "2",
        "cpu",
        "0",
    )
    assert tags[software.TAG] == software.summary()  # rank 0's releases
    assert software.ARTIFACT in {a.path for a in client.list_artifacts(result.run_id)}
    history = client.get_metric_history(result.run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
    for metric in ("loss/patch_conv4", "acc/image_conv5", "lr", "images_per_s", "data_wait_s"):
        assert len(client.get_metric_history(result.run_id, metric)) == 6, metric
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config", "final_checkpoint.txt"} <= artifacts

    # Started again with the same name after it finished: nothing to redo, same MLflow run.
    again = run_pretraining(job)
    assert again.run_id == result.run_id and (again.epochs, again.steps) == (2, 6)
    assert sorted(m.step for m in client.get_metric_history(result.run_id, "loss")) == list(
        range(1, 7)
    )
    assert client.get_run(result.run_id).info.status == "FINISHED"


def test_rerun_after_a_crash_resumes_from_the_latest_checkpoint(local_ray, mlflow_server, tmp_path):
    """The data volume vanishes once Ray has counted the first checkpoint: the run fails;
    started again, it resumes. Ray registers checkpoints with some delay, so the run has enough
    epochs left for the failure to hit it whichever checkpoint it resumes from."""
    data = tmp_path / "data"
    shutil.copytree(bundled_image_folder(48), data)
    job = tiny_job("crash-resume", str(tmp_path / "store"), mlflow_server.uri, epochs=4)
    # Retries allowed: data that does not decode must end the run at once all the same.
    job.data, job.max_failures = str(data), 2
    snapshot = tmp_path / "store" / "crash-resume" / "checkpoint_manager_snapshot.json"

    def registered() -> bool:  # Ray counts the first checkpoint (not just: its files exist)
        try:
            return "checkpoint_epoch=0001" in snapshot.read_text()
        except OSError:
            return False

    def pull_the_data():
        deadline = time.time() + 300
        while not registered() and time.time() < deadline:
            time.sleep(0.05)
        data.rename(tmp_path / "gone")

    saboteur = threading.Thread(target=pull_the_data)
    saboteur.start()
    with pytest.raises(UnrecoverableError) as failed:
        run_pretraining(job)
    saboteur.join()
    # One line: the cause, no retry, the last complete checkpoint (README, Failures).
    line = str(failed.value)
    assert "\n" not in line and line.startswith(f"data {data}: "), line
    # Either rank may be the first to meet the missing data: rank 1 was, once, with two test
    # processes on two cores (the other rank then fails of its loss, not of the data).
    assert "consecutive images failed to decode" in line, line
    assert re.search(r"\(rank [01]; not retried\)", line), line
    assert re.search(r"last complete checkpoint: \S+/checkpoint_epoch=000[123];", line), line
    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("ray-tests").experiment_id],
        f"tags.`dupr.run_key` = 'crash-resume in {tmp_path / 'store'}'",
    )
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    logged = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "loss"))
    assert logged[:6] == list(range(1, 7))  # epoch 1 (6 steps) was committed with its checkpoint

    (tmp_path / "gone").rename(data)
    result = run_pretraining(job)
    assert result.run_id == runs[0].info.run_id and (result.epochs, result.steps) == (4, 24)
    resumed_at = client.get_run(result.run_id).data.tags["dupr.resumed_at_step"]
    assert resumed_at in ("6", "12", "18") and int(resumed_at) >= max(logged[:6])
    steps = [m.step for m in client.get_metric_history(result.run_id, "loss")]
    assert sorted(steps) == list(range(1, 25))  # no gaps, no duplicates
    # The last keep_checkpoints (2) are kept, across the restart too.
    kept = sorted(p.name for p in snapshot.parent.glob("checkpoint_epoch=*"))
    assert kept == ["checkpoint_epoch=0003", "checkpoint_epoch=0004"], kept
    assert result.checkpoint_uri.endswith("checkpoint_epoch=0004")

    # The interrupted-and-resumed run ends with the weights of an uninterrupted one: its
    # folder deleted, the same command starts over, in an MLflow run of its own (continuing
    # the finished one would drop every new step at or below 24).
    resumed_state = load_checkpoint_state(result.checkpoint_uri)["model"]
    shutil.rmtree(snapshot.parent)
    straight = run_pretraining(job)
    assert (straight.epochs, straight.steps) == (4, 24)
    assert straight.run_id != result.run_id
    for run_id in (result.run_id, straight.run_id):
        steps = [m.step for m in client.get_metric_history(run_id, "loss")]
        assert sorted(steps) == list(range(1, 25)), run_id
    assert "dupr.resumed_at_step" not in client.get_run(straight.run_id).data.tags
    straight_state = load_checkpoint_state(straight.checkpoint_uri)["model"]
    assert resumed_state.keys() == straight_state.keys()
    for key, value in straight_state.items():
        assert torch.allclose(resumed_state[key].float(), value.float(), atol=1e-6, rtol=0), key


def test_two_jobs_waiting_for_the_same_room_start_in_turn(local_ray, tmp_path, capsys):
    """`pipelines/pretrain.py` twice, as two `ray job submit`s (a driver process connected to
    the cluster, and this process), while another job's work holds the cluster (a task on both
    CPUs). Each waits for room before Ray Train starts, which would count every
    `worker_group_start_minutes` of waiting as a failure (3 s here, no second try), and asks an
    autoscaler for its worker's room meanwhile, beside the other's. When the room frees, both
    see it: only one may start into it (the cluster's `StartLine`), or the other's worker
    waits in Ray, which Ray Train asks for seconds after the check."""
    import ray

    from dupr_platform.claims import StartLine

    freed = tmp_path / "freed"

    def hold() -> None:  # the other job's work, until both wait
        while not freed.exists():
            time.sleep(0.1)

    other = ray.remote(num_cpus=2)(hold).remote()
    until(lambda: ray.available_resources().get("CPU", 0.0) == 0.0, "the other job placed")

    def args(name: str) -> list[str]:
        return [
            f"name={name}",
            f"data={bundled_image_folder(16)}",
            f"storage={tmp_path / 'store'}",
            f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "num_workers=1",
            "cpus_per_worker=2",
            "worker_group_start_minutes=0.05",
            "controller_failure_limit=0",
            *[a.removeprefix("pretrain.") for a in TOY_PIPELINE if a.startswith("pretrain.")],
        ]

    apart = Driver(
        [PRETRAIN, *args("apart")],
        tmp_path / "apart.log",
        env={"RAY_ADDRESS": ray.get_runtime_context().gcs_address},
    )
    both = [{"CPU": 2.0}] * 3  # the node's own 2 CPUs and each job's worker
    asked: list = []  # the autoscaler's request each time it changes

    def watch() -> None:  # frees the room once both jobs wait (or 60 s on), then watches on
        deadline = time.monotonic() + 60
        while not stop.wait(0.1):
            if (request := autoscaler_request()) != (asked[-1] if asked else None):
                asked.append(request)
            if request == both or time.monotonic() > deadline:
                freed.touch()

    stop = threading.Event()
    watcher = threading.Thread(target=watch, daemon=True)
    try:
        apart.wait_for(lambda: "waits to start" in apart.output(), 60, "the driver waiting")
        watcher.start()
        assert main_of(PRETRAIN)(args("here")) == 0, capsys.readouterr()
        assert apart.wait(120) == 0, apart.output()
    finally:
        stop.set()
        freed.touch()
        apart.stop()
    watcher.join(timeout=10)
    # Neither job's request replaced the other's; the one that started withdrew its own only.
    assert both in asked and asked[asked.index(both) + 1] == both[:2], asked
    assert waiting_requests() == []
    out = capsys.readouterr().out
    said = [line for line in out.splitlines() if "waits to start" in line]
    assert said == [
        "pre-training here: waits to start until the cluster has room for its 2 CPU "
        "(nothing free now)"
    ]
    assert "pre-training here: 1 epochs" in out
    assert "pre-training apart: 1 epochs" in apart.output()
    assert ray.get(other) is None
    assert StartLine.reserved_now() == {"CPU": 0.0, "GPU": 0.0}  # both given back


def test_preflight_rejects_bad_input_before_any_worker(
    local_ray, s3_env, s3_server, s3_iam_server, mlflow_server, tmp_path, monkeypatch
):
    store, tracking = str(tmp_path / "store"), mlflow_server.uri
    cases = [
        (tiny_job("x", "gs://bucket/p", tracking, 1), "gs://bucket/p"),
        (tiny_job("x", "s3://no-such-bucket/p", tracking, 1), "no-such-bucket"),
        (tiny_job("x", store, "http://127.0.0.1:9", 1), "127.0.0.1:9"),
        (tiny_job("x", store, tracking, 1, workers=4), "num_workers=4"),  # 4 CPUs of 2
    ]
    bad_data = tiny_job("x", store, tracking, 1)
    bad_data.data = str(tmp_path / "no-images-here")
    cases.append((bad_data, "no-images-here"))
    for job, needle in cases:
        with pytest.raises((ValueError, FileNotFoundError)) as err:
            preflight(job)
        assert needle in str(err.value) and "\n" not in str(err.value)

    # Wrong credentials against an S3 server that checks them.
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_iam_server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_iam_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    with pytest.raises(ValueError) as err:
        preflight(tiny_job("x", f"s3://{s3_iam_server.bucket}/p", tracking, 1))
    message = str(err.value)
    assert s3_iam_server.bucket in message and "\n" not in message
    assert "wrong-secret-value" not in message
    assert not (tmp_path / "store" / "x").exists()  # nothing was started or written


def job_from_overrides(overrides: list[str]):
    """What pipelines/pretrain.py builds from its command line."""
    return pretrain_job(compose(ROOT / "configs", "pretrain", overrides))


def test_overrides_build_a_job_and_reject_unknown_keys():
    job = job_from_overrides(["method=mocov2", "num_workers=2", "method.model.tau=0.1", "name=abc"])
    assert job.method.model.alpha == (0, 0, 0, 1) and job.method.model.tau == 0.1
    assert job.num_workers == 2 and job.name == "abc"
    with pytest.raises(ValueError, match="method.model.temperature: unknown configuration key"):
        job_from_overrides(["method.model.temperature=0.1"])
    with pytest.raises(ValueError, match=r"optim.batch_size=32: not divisible by num_workers=3"):
        job_from_overrides(["num_workers=3"])


def test_ddp_two_workers_equal_one_worker_with_the_global_batch(local_ray, mlflow_server, tmp_path):
    """First step through the launcher: 2 workers × 4 images = 1 worker × 8 images (SyncBN)."""
    weights, losses = [], []
    for workers in (2, 1):
        job = tiny_job(
            f"ddp-{workers}", str(tmp_path / "store"), mlflow_server.uri, epochs=1, workers=workers
        )
        job.data = str(bundled_image_folder(8))  # one global batch: exactly one step
        job.method.model.bn_mode = "sync"
        job.method.optim.lr = 1.0  # weights after one step then differ by the gradients' difference
        result = run_pretraining(job)
        assert result.steps == 1
        saved = load_checkpoint_state(result.checkpoint_uri)
        weights.append(saved["model"])
        if workers == 2:  # each rank drew its patch-key cells from a stream of its own
            first, second = (r["torch"] for r in saved["rng_per_rank"])
            assert not torch.equal(first, second)
        losses.append(
            MlflowClient(mlflow_server.uri).get_metric_history(result.run_id, "loss")[0].value
        )
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)  # the logged loss is the global one
    two, one = weights
    compared = 0
    for key, value in one.items():
        if key.startswith("banks."):  # sampled patch keys differ by design; weights must not
            continue
        assert torch.allclose(two[key].float(), value.float(), atol=1e-4, rtol=1e-3), key
        compared += 1
    assert compared > 100


def test_colour_steps_on_the_device_in_a_ray_train_worker(local_ray, mlflow_server, tmp_path):
    """augment.photometric_on=device through the launcher: the worker's loader ships uint8 crops
    and colour choices, its training step applies them. Eager: optim.compile of the same steps
    is checked against eager by test_photometric.py and test_train.py, and compiling them in a
    worker cost this test a minute of inductor's C++ builds (a third of it with a warm cache)."""
    job = tiny_job("colour-on-device", str(tmp_path / "store"), mlflow_server.uri, 1, workers=1)
    job.data = str(bundled_image_folder(8))
    job.method.augment.photometric_on = "device"
    result = run_pretraining(job)
    assert result.steps == 1
    client = MlflowClient(mlflow_server.uri)
    params = client.get_run(result.run_id).data.params
    assert params["augment.photometric_on"] == "device"
    loss = client.get_metric_history(result.run_id, "loss")[0].value
    assert math.isfinite(loss) and 0 < loss < 100  # the views reached the model normalised


def test_the_readmes_gpu_command_asks_for_the_colour_steps_on_the_device():
    """The README's cluster command, composed as pipelines/pretrain.py composes it: GPUs, six
    loader processes per worker, and the colour steps on the device (what keeps a GPU fed)."""
    text = (ROOT / "README.md").read_text()
    command = text[text.index("ray job submit --working-dir . -- python pipelines/pretrain.py") :]
    command = command[: command.index("\n```")].replace("\\\n", " ")
    job = job_from_overrides(command.split("pipelines/pretrain.py", 1)[1].split())
    assert job.use_gpu and job.loader_workers == 6 and job.num_workers == 16
    assert job.method.augment.photometric_on == "device"
    assert job.method.augment.preset == "mocov2_randaugment"  # the paper's main setting


def test_a_gpu_job_whose_loader_cannot_feed_the_gpus_is_warned_about(local_ray, capsys, tmp_path):
    """pipelines/pretrain.py with use_gpu and the colour steps in PIL: one warning line in
    preflight, before the cluster check (here: no GPUs, exit 2); none with them on the device."""
    main = main_of(PRETRAIN)
    common = [
        "use_gpu=true",
        "num_workers=1",
        f"data={bundled_image_folder(32)}",
        f"storage={tmp_path / 'store'}",
        f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    assert main([*common, "loader_workers=4"]) == 2
    err = capsys.readouterr().err
    warning = next(line for line in err.splitlines() if "photometric_on=loader" in line)
    assert "4 loader processes per GPU" in warning and "photometric_on=device" in warning
    assert err.strip().splitlines()[-1] == (
        "error: num_workers=1 × gpus_per_worker=1.0: needs 1 GPUs, the Ray cluster has 0"
    )
    assert main([*common, "loader_workers=0", "method.augment.photometric_on=device"]) == 2
    assert "loader_workers=0: each training process decodes" in capsys.readouterr().err
    assert main([*common, "loader_workers=4", "method.augment.photometric_on=device"]) == 2
    err = capsys.readouterr().err
    assert "loader_workers=0" not in err and "photometric_on=loader" not in err


def test_optim_compile_without_a_cpp_compiler_is_warned_about(local_ray, capsys, tmp_path):
    """pipelines/pretrain.py with method.optim.compile on a machine where torch.compile finds
    no C++ compiler (inductor searching for one that does not exist): one warning line in
    preflight, before the cluster check (here: no GPUs, exit 2); none where it finds one."""
    from torch._inductor import config as inductor

    main = main_of(PRETRAIN)
    args = [
        "use_gpu=true",
        "num_workers=1",
        "loader_workers=2",
        "method.augment.photometric_on=device",
        "method.optim.compile=true",
        f"data={bundled_image_folder(32)}",
        f"storage={tmp_path / 'store'}",
        f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    assert main(args) == 2
    assert "torch.compile finds no C++ compiler" not in capsys.readouterr().err
    # torch's own patch: monkeypatch's undo would leave the option hidden from later compiles.
    with inductor.patch({"cpp.cxx": ("dupr-test-no-such-c++",)}):
        assert main(args) == 2
    err = capsys.readouterr().err
    warning = next(line for line in err.splitlines() if "no C++ compiler" in line)
    assert "method.optim.compile=True" in warning and "dupr-test-no-such-c++" in warning
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: num_workers=1 × gpus_per_worker=1.0")


def test_command_line_rejects_bad_input_in_one_line_before_starting_ray(capsys, tmp_path):
    main = main_of(PRETRAIN)
    assert main(["method.model.tau=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: method.model.tau=-1.0: temperature must be > 0"
    assert main(["storage=gs://bucket/x", f"tracking_uri=sqlite:///{tmp_path}/m.db"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "gs://bucket/x" in err and "\n" not in err
