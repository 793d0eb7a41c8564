"""Pre-train DUPR, convert the weights, evaluate them: one MLflow parent run, cached stages.

    python pipelines/pretrain_and_eval.py                        # CPU demo, bundled data
    python pipelines/pretrain_and_eval.py preset=paper_r50_imagenet
    python pipelines/pretrain_and_eval.py preset=paper_r50_imagenet smoke=true  # before GPU hours
    python pipelines/pretrain_and_eval.py stages=[detection] eval.detection.iterations=500
    ray job submit --working-dir . -- python pipelines/pretrain_and_eval.py <overrides>

The config is configs/pretrain_and_eval.yaml; the stages are in dupr_platform.pipeline.
Exit status: 0 when every stage finished or was cached, 1 when a stage failed, 2 on bad input
(dupr_platform.cli). Started again after a crash, the same command resumes.
"""

import sys
from pathlib import Path

from dupr_platform.cli import asked_for_help, exit_process, run_cli
from dupr_platform.configs import compose
from dupr_platform.pipeline import run_pipeline

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def main(argv: list[str]) -> int:
    if asked_for_help(argv, __doc__):
        return 0
    return run_cli(
        lambda: compose(CONFIGS, "pretrain_and_eval", argv), run_pipeline, lambda c: c["name"]
    )


if __name__ == "__main__":
    exit_process(main(sys.argv[1:]))
