"""No secret anywhere: a 2-worker main job with recognisable fake credentials, then every file.

The job runs as a user runs it (its own driver process, S3 on a real moto server, tracking on a
real MLflow server that proxies artifacts to S3) with credentials in the environment only.
Afterwards no file of the Ray session (`RAY_TMPDIR`, so all of it is readable), no object in
the buckets, no file of the MLflow server, no log file and not the console holds the secret
key, the access key id or the MLflow password.
"""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from drivers import PIPELINE, files_holding, files_under, ray_tmpdir, run
from dupr.data import bundled_image_folder
from helpers import TOY_PIPELINE
from services import list_keys, make_bucket, s3_client

# Starts a driver process with its own Ray, an S3 and an MLflow server.
pytestmark = pytest.mark.slow

KEY_ID = "AKIA" + "DUPRFAKEKEY77123"  # fake; built so no committed file holds a key-shaped string
SECRET = "dupr-fake-secret-Zq81-never-logged"
MLFLOW_PASSWORD = "dupr-fake-mlflow-pw-5521"
SECRETS = (KEY_ID, SECRET, MLFLOW_PASSWORD)


def test_no_secret_in_any_file_a_run_writes(s3_server, mlflow_server, tmp_path, monkeypatch):
    bucket = make_bucket(s3_server.endpoint_url)
    ray_tmp = ray_tmpdir()
    env = {
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_server.endpoint_url,
        "MLFLOW_TRACKING_USERNAME": "dupr-user",
        "MLFLOW_TRACKING_PASSWORD": MLFLOW_PASSWORD,
    }
    args = [
        PIPELINE,
        "name=secrets",
        f"storage=s3://{bucket}/runs",
        f"tracking_uri={mlflow_server.uri}",
        "experiment=secrets",
        f"pretrain.data={bundled_image_folder(16)}",
        *TOY_PIPELINE,
        "pretrain.num_workers=2",
        "pretrain.cpus_per_worker=0.5",
        "stages=[pretrain,convert,probe]",
        "baselines.random=false",
    ]
    status, console = run(args, tmp_path / "console.txt", timeout=600, env=env, ray_tmp=ray_tmp)
    assert status == 0, console[-4000:]
    client = MlflowClient(mlflow_server.uri)
    pretrain = client.search_runs(
        [client.get_experiment_by_name("secrets").experiment_id], "tags.`dupr.stage` = 'pretrain'"
    )[0]
    assert pretrain.data.tags["dupr.world_size"] == "2"  # the 2-worker job really ran

    session_files = files_under(ray_tmp)
    assert any(p.name == "runtime_env_agent.log" for p in session_files)  # Ray logged its envs
    local = [
        *session_files,
        tmp_path / "console.txt",
        *files_under(tmp_path / "logs"),
        *files_under(mlflow_server.log_path.parent),  # the server's store and log
    ]
    assert not files_holding(local, *SECRETS)
    s3 = s3_client(s3_server.endpoint_url)
    objects = 0
    for name in (bucket, mlflow_server.artifact_bucket):
        for key in list_keys(s3_server.endpoint_url, name):
            body = s3.get_object(Bucket=name, Key=key)["Body"].read()
            objects += 1
            assert not [s for s in SECRETS if s.encode() in body], f"s3://{name}/{key}"
    assert objects > 10
