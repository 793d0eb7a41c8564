"""Ray Tune sweeps that reproduce the paper's ablation tables: one pipeline per grid value.

    python pipelines/ablate.py --grid beta                        # Table VII (b), CPU demo scale
    python pipelines/ablate.py --grid alpha preset=paper_r50_imagenet sweep.max_concurrent_trials=4
    python pipelines/ablate.py --grid my_grid.yaml                # a grid of your own
    ray job submit --working-dir . -- python pipelines/ablate.py --grid roi <overrides>

Grids: configs/grid/ (alpha, beta, roi, tau, loss). The config is configs/ablate.yaml (the
pipeline's plus `sweep`); the sweep itself is dupr_platform.sweeps. Exit status: 0 when every
row finished, 1 when a trial failed (the others still ran; the next run retries it), 2 on
bad input found before any trial started.
"""

import argparse
import logging
import os
import sys
from pathlib import Path

from dupr_platform.cli import run_cli
from dupr_platform.sweeps import load_grid, run_sweep

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION", "0")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", required=True, help="alpha, beta, roi, tau, loss or a .yaml")
    args, overrides = parser.parse_known_args()
    sys.exit(
        run_cli(
            CONFIGS,
            "ablate",
            overrides,
            lambda cfg: run_sweep(cfg, load_grid(args.grid, CONFIGS / "grid")),
        )
    )
