"""Ray Tune sweeps that reproduce the paper's ablation tables: one pipeline per grid value.

    python pipelines/ablate.py --grid beta                        # Table VII (b), CPU demo scale
    python pipelines/ablate.py --grid alpha preset=paper_r50_imagenet sweep.max_concurrent_trials=4
    python pipelines/ablate.py --grid my_grid.yaml                # a grid of your own
    python pipelines/ablate.py --grid roi preset=paper_r50_imagenet smoke=true  # every trial, a few steps
    ray job submit --working-dir . -- python pipelines/ablate.py --grid roi <overrides>

Grids: configs/grid/ (alpha, beta, roi, tau, loss). The config is configs/ablate.yaml (the
pipeline's plus `sweep`); the sweep itself is dupr_platform.sweeps. Exit status: 0 when every
row finished, 1 when a trial failed (the others still ran; the next run retries it), 2 on
bad input found before any trial started (dupr_platform.cli).
"""

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from dupr.config import ConfigError
from dupr_platform.cli import exit_process, run_cli
from dupr_platform.configs import compose
from dupr_platform.sweeps import load_grid, run_sweep, sweep_name

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class _Arguments(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line and exit status 2, as for any bad input
        raise ConfigError(f"{message} (usage: ablate.py --grid NAME|FILE.yaml [overrides])")


def main(argv: list[str]) -> int:
    def load() -> tuple[dict, object]:
        parser = _Arguments(description=__doc__.splitlines()[0])
        parser.add_argument("--grid", required=True, help="alpha, beta, roi, tau, loss or a .yaml")
        args, overrides = parser.parse_known_args(argv)
        return compose(CONFIGS, "ablate", overrides), load_grid(args.grid, CONFIGS / "grid")

    return run_cli(load, lambda loaded: run_sweep(*loaded), lambda loaded: sweep_name(*loaded))


if __name__ == "__main__":
    exit_process(main(sys.argv[1:]))
