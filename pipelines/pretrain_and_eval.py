"""Pre-train DUPR, convert the weights, evaluate them: one MLflow parent run, cached stages.

    python pipelines/pretrain_and_eval.py                        # embedded CPU demo
    python pipelines/pretrain_and_eval.py preset=paper_r50_imagenet
    python pipelines/pretrain_and_eval.py stages=[detection] eval.detection.iterations=500
    ray job submit --working-dir . -- python pipelines/pretrain_and_eval.py <overrides>

The config is configs/pretrain_and_eval.yaml; the stages are in dupr_platform.pipeline.
Exit status: 0 when every stage finished or was cached, 1 when a stage failed, 2 on bad input.
"""

import logging
import os
import sys
from pathlib import Path

from dupr_platform.cli import run_cli
from dupr_platform.pipeline import run_pipeline

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION", "0")
    sys.exit(run_cli(CONFIGS, "pretrain_and_eval", sys.argv[1:], run_pipeline))
