"""Ctrl-C and kill -9 of the driver of the main job, Ctrl-C of a sweep's, then the same command
again.

What a crash on a cluster does: the driver process dies without a word, its local Ray instance
with it. The rerun must continue pre-training from the latest complete checkpoint (and a
detection fine-tuning from its own), take the finished stages from the cache, complete, and
leave no MLflow run RUNNING; the pre-training's and the fine-tuning's runs are continued, their
steps with no gap and no duplicate. A fine-tuning whose worker dies is launched again by the
driver and resumes too. Ctrl-C ends the driver with one line, and the driver
ends its MLflow runs itself. The console shows the project's own lines only, and a rerun with
nothing left to do does not start Ray.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from drivers import ABLATE, PIPELINE, PROJECT_LINE, Driver, files_under, ray_tmpdir, run
from dupr.data import bundled_image_folder
from helpers import TOY_PIPELINE

# Starts the entry points as driver processes, each with its own Ray instance.
pytestmark = pytest.mark.slow


def _toy(tmp_path: Path, experiment: str, *extra: str) -> list[str]:
    return [
        f"storage={tmp_path / 'storage'}",
        f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"experiment={experiment}",
        f"pretrain.data={bundled_image_folder(64)}",
        *TOY_PIPELINE,
        "pretrain.method.optim.epochs=4",  # 8 steps per epoch: a kill lands mid-run
        "baselines.random=false",
        *extra,
    ]


def _checkpointed(storage: Path, count: int = 1) -> bool:
    """`count` pre-trainings have a checkpoint that Ray Train has recorded."""
    found = 0
    for snapshot in storage.rglob("checkpoint_manager_snapshot.json"):
        found += "checkpoint_epoch=" in snapshot.read_text()
    return found >= count


def _rewritten(storage: Path, pattern: str, since_ns: int) -> bool:
    """A file matching `pattern` was written after `since_ns` (st_mtime_ns)."""
    return any(p.stat().st_mtime_ns > since_ns for p in storage.glob(pattern))


def _all_runs(tracking: str, experiment: str) -> list:
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=1000)


def _check_runs_after_resume(tracking: str, experiment: str, pretrain_runs: int = 1) -> None:
    client = MlflowClient(tracking)
    runs = _all_runs(tracking, experiment)
    by_id = {r.info.run_id: r for r in runs}
    assert not [r.data.tags.get("mlflow.runName") for r in runs if r.info.status == "RUNNING"]
    for ended in runs:
        if ended.info.status == "KILLED":  # a run of a killed invocation names who carried on
            assert ended.data.tags["dupr.continued_by"] in by_id, ended.data.tags
    pretrains = [r for r in runs if r.data.tags.get("dupr.run_key", "").startswith("pretrain-")]
    assert len(pretrains) == pretrain_runs
    resumed = [r for r in pretrains if "dupr.resumed_at_step" in r.data.tags]
    assert resumed, "no pre-training continued from a checkpoint"
    for pretrain in resumed:
        assert pretrain.info.status == "FINISHED"
        assert int(pretrain.data.tags["dupr.resumed_at_step"]) > 0
        steps = sorted(m.step for m in client.get_metric_history(pretrain.info.run_id, "loss"))
        assert steps == list(range(1, 33)), steps  # no gap, no duplicate


def _ctrl_c(driver: Driver) -> str:
    """Ctrl-C ends the driver with one line and exit status 130; its output."""
    status = driver.interrupt()
    driver.stop()
    output = driver.output()
    assert status == 130, output[-4000:]
    assert output.rstrip().endswith("error: interrupted; the same command resumes"), output[-2000:]
    assert "Traceback" not in output
    return output


def _console_is_the_projects(output: str) -> None:
    lines = [line for line in output.splitlines() if line.strip()]
    strangers = [line for line in lines if not PROJECT_LINE.match(line)]
    assert not strangers, strangers[:10]
    assert sum("Ray's own output: " in line for line in lines) == 1


def test_pipeline_resumes_after_its_driver_is_killed(tmp_path):
    # The detection fine-tuning checkpoints every 3 s: long enough for a kill to land mid-run.
    fine_tuning = [
        "eval.detection.iterations=24",
        "eval.detection.checkpoint_minutes=0.05",
        "eval.detection.log_every=1",
    ]
    stages = "stages=[pretrain,convert,probe,detection]"
    args = [PIPELINE, *_toy(tmp_path, "crash", stages, *fine_tuning)]
    storage, tracking = tmp_path / "storage", f"sqlite:///{tmp_path / 'mlflow.db'}"

    # 1. Ctrl-C after the first pre-training checkpoint: one line, exit status 130, and the
    # driver's runs ended by the driver (Ray Train's own SIGINT handler did neither).
    first = Driver(args, tmp_path / "first.txt")
    first.wait_for(lambda: _checkpointed(storage), 300, "first checkpoint")
    _ctrl_c(first)
    running = [r for r in _all_runs(tracking, "crash") if r.info.status == "RUNNING"]
    assert not running, [r.data.tags.get("mlflow.runName") for r in running]
    assert not any(storage.glob("stages/pretrain-*/_COMPLETE.json"))

    # 2. Resumes pre-training; killed once the detection fine-tuning has a checkpoint.
    second = Driver(args, tmp_path / "second.txt")
    resume_state = "stages/detection-*/resume/finetune.pt"
    second.wait_for(lambda: any(storage.glob(resume_state)), 300, "fine-tuning checkpoint")
    second.kill()
    second.stop()
    assert "[pipeline] pretrain: done" in second.output()
    assert any(storage.glob("stages/convert-*/_COMPLETE.json"))

    # 3. Finished stages are cache hits; the rest runs, the fine-tuning from its checkpoint.
    # Once it has checkpointed again, its worker is killed, as a lost node or the kernel's OOM
    # killer would: the driver launches it again, and it resumes from the newer checkpoint.
    (state,) = storage.glob(resume_state)
    before = state.stat().st_mtime_ns
    third = Driver(args, tmp_path / "third.txt")
    third.wait_for(lambda: _rewritten(storage, resume_state, before), 300, "newer checkpoint")
    third.kill_task("detection/")
    status = third.wait(600)
    third.stop()
    output = third.output()
    assert status == 0, output[-4000:]
    assert "WorkerCrashedError" in output and "launched again (1 of 3)" in output, output[-4000:]
    resumed_at = [
        int(n) for n in re.findall(r"resuming the fine-tuning after iteration (\d+)", output)
    ]
    assert len(resumed_at) == 2 and 0 < resumed_at[0] < resumed_at[1] < 24, resumed_at
    assert "[pipeline] pretrain: cache hit" in output
    assert "[pipeline] convert/dupr: cache hit" in output
    assert "| probe/dupr " in output and "continuing the work of an earlier run" in output
    _console_is_the_projects(output)
    log_file = re.search(r"Ray's own output: (\S+)", output).group(1)
    assert "A worker died or was killed" in Path(log_file).read_text()  # the raylet's, kept
    _check_runs_after_resume(tracking, "crash")
    # One run for the fine-tuning, continued by the rerun and by the relaunch, as pre-training
    # has: its losses at iterations 1..24, each once.
    (detection,) = [
        r
        for r in _all_runs(tracking, "crash")
        if r.data.tags.get("dupr.stage", "").startswith("detection")
    ]
    assert detection.info.status == "FINISHED"
    assert int(detection.data.tags["dupr.resumed_at_iteration"]) == resumed_at[1]
    assert detection.data.tags["dupr.stage_attempt"] == "2"
    assert "dupr.previous_parent_run" in detection.data.tags  # moved under the rerun's parent
    history = MlflowClient(tracking).get_metric_history(detection.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 25))
    assert not any(storage.glob("stages/detection-*/resume"))  # dropped once complete
    parents = [r for r in _all_runs(tracking, "crash") if "dupr.pipeline" in r.data.tags]
    assert sorted(r.info.status for r in parents) == ["FINISHED", "KILLED", "KILLED"]

    # 4. Nothing left to do: every stage a cache hit, and Ray is not started.
    ray_tmp = ray_tmpdir()
    status, output = run(args, tmp_path / "fourth.txt", timeout=300, ray_tmp=ray_tmp)
    assert status == 0, output[-4000:]
    assert "Ray's own output" not in output and not files_under(ray_tmp)
    assert "3 stages to run" not in output and "0 stages to run" in output


def test_sweep_resumes_after_its_driver_is_killed(tmp_path):
    grid = tmp_path / "two.yaml"
    grid.write_text(yaml.safe_dump({"key": "pretrain.method.model.tau", "values": [0.1, 0.3]}))
    args = [
        ABLATE,
        "--grid",
        str(grid),
        "sweep.name=crash",
        "stages=[pretrain,convert]",
        *_toy(tmp_path, "sweep-crash"),
    ]
    storage, tracking = tmp_path / "storage", f"sqlite:///{tmp_path / 'mlflow.db'}"

    first = Driver(args, tmp_path / "first.txt")
    # The second trial has checkpointed: the first trial is finished. Ctrl-C (kill -9 is the
    # pipeline's test above): Ray Tune's own SIGINT handler stopped the trials as if finished.
    first.wait_for(lambda: _checkpointed(storage, count=2), 600, "second trial's checkpoint")
    assert "stopped early" not in _ctrl_c(first)

    status, output = run(args, tmp_path / "second.txt", timeout=600)
    assert status == 0, output[-4000:]
    rows = [line for line in output.splitlines() if line.startswith("| 0.")]
    assert [row.rsplit("|", 2)[-2].strip() for row in rows] == ["stored", "done"], rows
    _console_is_the_projects(output)
    _check_runs_after_resume(tracking, "sweep-crash", pretrain_runs=2)
    sweeps = [r for r in _all_runs(tracking, "sweep-crash") if "dupr.sweep" in r.data.tags]
    assert [r.info.status for r in sweeps] == ["FINISHED"]  # the same sweep run, continued
