#!/bin/sh
# HEALTHCHECK of docker/Dockerfile. A container in which a Ray node was started is healthy when
# the cluster's GCS answers (`ray health-check`, with the node's own RAY_AUTH_MODE/RAY_AUTH_TOKEN);
# one without (the MLflow server of deploy/compose, a launcher container before `ray start`) when
# the project and its stack import.
set -eu
if [ -s "${RAY_TMPDIR:-/tmp}/ray/ray_current_cluster" ]; then
    exec ray health-check
fi
exec python -c "import dupr, dupr_platform, ray, mlflow"
