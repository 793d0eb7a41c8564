"""The console of the main job, and two main jobs on one machine at the same time.

The two share one new MLflow store, as two jobs on the default `runs/mlflow.db` do.

Each pipeline starts its own local Ray instance; two of them must not disturb each other (Ray
Train's helpers of one must not find the other's instance: "Found multiple active Ray
instances"). By default the console holds the project's lines only and Ray's output goes to
the log file whose path is printed once; DUPR_RAY_LOGS=console shows Ray's lines again.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from drivers import PIPELINE, PROJECT_LINE, Driver, files_under, ray_tmpdir
from dupr.data import bundled_image_folder
from helpers import TOY_PIPELINE

# Starts two pipelines as driver processes, each with its own Ray instance.
pytestmark = pytest.mark.slow


def _args(tmp_path, name: str) -> list[str]:
    return [
        PIPELINE,
        f"name={name}",
        f"storage={tmp_path / name / 'storage'}",
        # One store for both, new to both, as two jobs started on the default runs/mlflow.db.
        f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"pretrain.data={bundled_image_folder(16)}",
        *TOY_PIPELINE,
        "pretrain.num_workers=1",
        "pretrain.cpus_per_worker=0.5",
        "stages=[pretrain,convert]",
        "baselines.random=false",
    ]


def test_two_pipelines_at_once_and_what_the_console_shows(tmp_path):
    shared_tmp = ray_tmpdir()  # one machine: both instances under the same Ray temp root
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    quiet = Driver(_args(tmp_path, "a"), tmp_path / "a" / "out.txt", ray_tmp=shared_tmp)
    loud = Driver(
        _args(tmp_path, "b"),
        tmp_path / "b" / "out.txt",
        ray_tmp=shared_tmp,
        env={"DUPR_RAY_LOGS": "console"},
    )
    assert quiet.wait(600) == 0, quiet.output()[-4000:]
    assert loud.wait(600) == 0, loud.output()[-4000:]
    quiet.stop()
    loud.stop()
    sessions = {p.parent.parent.name for p in files_under(shared_tmp) if p.name == "raylet.out"}
    assert len(sessions) == 2, sessions  # two instances of their own

    lines = [line for line in quiet.output().splitlines() if line.strip()]
    assert not [line for line in lines if not PROJECT_LINE.match(line)]
    assert any("[pipeline] convert/dupr: done" in line for line in lines)
    announced = [line for line in lines if "Ray's own output: " in line]
    assert len(announced) == 1 and "DUPR_RAY_LOGS=console" in announced[0]
    log_file = re.search(r"Ray's own output: (\S+)", announced[0]).group(1)
    ray_lines = Path(log_file).read_text()
    assert "Started training worker group" in ray_lines  # Ray's INFO lines are in the file
    assert "(TrainController" in ray_lines
    # Ray's own lines are back on the console of the second one.
    assert "(TrainController pid=" in loud.output() or "INFO" in loud.output()
    for output in (quiet.output(), loud.output(), ray_lines):
        assert "Found multiple active Ray instances" not in output

    # Both runs in the shared store, their artifacts beside it (not in ./mlruns of where the
    # drivers ran).
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("dupr")
    assert experiment.artifact_location == str(tmp_path / "mlartifacts" / "dupr")
    parents = client.search_runs([experiment.experiment_id], "tags.`dupr.pipeline` != ''")
    assert sorted(r.data.tags["dupr.pipeline"] for r in parents) == ["a", "b"]
    assert (tmp_path / "mlartifacts" / "dupr" / parents[0].info.run_id / "artifacts").is_dir()
