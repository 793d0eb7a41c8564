"""One DUPR pre-training on Ray Train: DDP workers, checkpoints in storage, one MLflow run.

    python pipelines/pretrain.py                                    # CPU demo, bundled photos
    python pipelines/pretrain.py method=dupr num_workers=2 method.optim.epochs=2
    ray job submit --working-dir . -- python pipelines/pretrain.py <overrides>

The config is configs/pretrain.yaml; the job is dupr_platform.ray_pretrain.run_pretraining.
Exit status: 0 when the pre-training finished, 1 when it failed, 2 on bad input
(dupr_platform.cli). Started again with the same name after a crash, it resumes from the last
checkpoint.
"""

import sys
from pathlib import Path

from dupr_platform.cli import asked_for_help, exit_process, run_cli
from dupr_platform.configs import compose, pretrain_job
from dupr_platform.ray_pretrain import PretrainJob, PretrainResult, run_pretraining

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def run(job: PretrainJob) -> PretrainResult:
    result = run_pretraining(job)
    print(f"pre-training {job.name}: {result.epochs} epochs, {result.steps} steps")
    print(f"  checkpoint: {result.checkpoint_uri}")
    print(f"  MLflow run: {result.run_id} ({job.tracking_uri}, experiment {job.experiment})")
    return result


def main(argv: list[str]) -> int:
    if asked_for_help(argv, __doc__):
        return 0
    return run_cli(lambda: pretrain_job(compose(CONFIGS, "pretrain", argv)), run, lambda j: j.name)


if __name__ == "__main__":
    exit_process(main(sys.argv[1:]))
