"""How long a pre-training checkpoint holds up training: upload waited for, or in the background.

    python benchmarks/checkpoint_stall.py [--record benchmarks/RESULTS.md] [--quick]

Rank 0 writes the training state and reports it to Ray Train once per epoch
(`dupr_platform.ray_pretrain.report_checkpoint`); until that call returns, rank 0 does not
start the next epoch, and every other rank waits for it at its first all-reduce. Measured here
with the state of the paper's setting (ResNet-50 DUPR with K = 65536 keys per bank, SGD
momentum: 625 MB) in one Ray Train worker of a local Ray instance, uploaded to an S3-protocol
server (moto, in this process) and to a local folder. An epoch's computation is stood in for by
a sleep (a GPU's epoch leaves the CPU cores free for the upload), so what is measured is the
checkpoint alone: the time from the end of an epoch to the start of the next, per checkpoint
but the last (which is waited for in both modes, so that fit() returns with it counted).

Baseline in the same run: `wait=True` (Ray's SYNC upload, how checkpoints were reported before).
Target, for object storage (a cluster's checkpoints): the background upload holds training up
for at most half the waited-for time. The local folder's rows are information: a copy on the
same disk leaves little to hide.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import boto3
import ray
import ray.train
import torch
from moto.server import ThreadedMotoServer
from ray.train.torch import TorchTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_lines, quartiles, report  # noqa: E402

from dupr.config import preset  # noqa: E402
from dupr.io import markdown_table  # noqa: E402
from dupr.model import DUPR  # noqa: E402
from dupr.train import build_state  # noqa: E402
from dupr_platform.ports import free_port  # noqa: E402
from dupr_platform.ray_pretrain import report_checkpoint  # noqa: E402
from dupr_platform.storage import open_storage, ray_storage_args  # noqa: E402


def training_state(quick: bool) -> dict[str, Any]:
    """The state a checkpoint holds: model with memory banks, optimizer with its momentum."""
    cfg = preset("dupr")
    if quick:
        cfg.model.backbone, cfg.model.queue_size = "resnet18", 4096
    state = build_state(DUPR(cfg.model), cfg.optim, 1000, torch.device("cpu"))
    for p in state.model.parameters():  # one step: the momentum buffers exist
        p.grad = torch.zeros_like(p)
    state.optimizer.step()
    return state.state_dict()


def worker(config: dict[str, Any]) -> None:
    """Epochs of `epoch_s` idle seconds, each ended by a checkpoint like rank 0's."""
    payload = training_state(config["quick"])
    stalls = []
    with tempfile.TemporaryDirectory(prefix="dupr-bench-") as root:
        for epoch in range(1, config["epochs"] + 1):
            time.sleep(config["epoch_s"])
            start = time.perf_counter()
            folder = Path(root) / f"checkpoint_epoch={epoch:04d}"
            folder.mkdir()
            torch.save(payload, folder / "state.pt")
            saved = time.perf_counter()
            last = epoch == config["epochs"]
            report_checkpoint({"epoch": epoch}, folder, config["storage"], config["wait"] or last)
            stalls.append((saved - start, time.perf_counter() - saved))
    Path(config["out"]).write_text(json.dumps(stalls))


def run_mode(storage_uri: str, wait: bool, args: argparse.Namespace, out: Path) -> list[tuple]:
    storage = open_storage(storage_uri)
    config = {
        "quick": args.quick,
        "epochs": args.epochs,
        "epoch_s": args.epoch_s,
        "storage": storage_uri,
        "wait": wait,
        "out": str(out),
    }
    TorchTrainer(
        worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(
            name=f"bench-{'sync' if wait else 'async'}-{time.time_ns()}",
            **ray_storage_args(storage),
        ),
    ).fit()
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", help="append the results to this Markdown file")
    parser.add_argument("--quick", action="store_true", help="ResNet-18, K=4096: a smoke test")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--epoch-s", type=float, default=20.0, help="seconds of an epoch")
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    machine = machine_lines("cpu")
    print("\n".join(machine))
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
    )
    boto3.client("s3").create_bucket(Bucket="bench")
    rows, verdicts = [], []
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        with tempfile.TemporaryDirectory() as tmp:
            for label, uri in (("S3 (moto)", "s3://bench/runs"), ("local folder", tmp)):
                waited = 0.0  # the waited-for run comes first
                for wait in (True, False):
                    stalls = run_mode(uri, wait, args, Path(tmp) / "stalls.json")[:-1]
                    held = [save + rep for save, rep in stalls]
                    q1, med, q3 = quartiles(held)
                    save = statistics.median(s for s, _ in stalls)
                    if wait:
                        waited, verdict, ratio = med, "baseline", "-"
                    else:
                        ratio = f"{med / waited:.2f}"
                        verdict = "PASS" if med <= 0.5 * waited else "FAIL"
                        if uri.startswith("s3://"):
                            verdicts.append(verdict)
                        else:  # a copy on one disk: nothing much to hide, what a laptop gets
                            verdict = "info"
                    rows.append(
                        [
                            label,
                            "waited (SYNC)" if wait else "background (ASYNC)",
                            f"{med:.2f}",
                            f"{q1:.2f}-{q3:.2f}",
                            f"{save:.2f}",
                            ratio,
                            verdict,
                        ]
                    )
    finally:
        ray.shutdown()
        server.stop()
    size = "ResNet-18, K=4096" if args.quick else "ResNet-50, K=65536 (the paper's)"
    columns = [
        "storage",
        "upload",
        "s held up per checkpoint (median)",
        "p25-p75",
        "of which torch.save",
        "ratio to waited",
        "result",
    ]
    table = markdown_table(rows, columns, pad=True)
    notes = [
        f"state of {size}, {args.epochs} epochs of {args.epoch_s:g} s idle each; the last "
        "checkpoint (waited for in both modes) is left out",
        "held up: from the end of an epoch to the start of the next (torch.save + report)",
        "target (object storage): background upload <= 0.5x the waited-for time; the local "
        "folder: information",
        f"overall: **{'PASS' if all(v == 'PASS' for v in verdicts) else 'FAIL'}**",
    ]
    report(args, "checkpoint_stall", torch.device("cpu"), machine, table, notes)


if __name__ == "__main__":
    main()
