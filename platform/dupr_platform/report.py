"""The study's results side by side: one row per initialisation, one column per metric.

Read from the completion records of the finished evaluation stages and logged to the pipeline's
parent run as results.md, results.csv, metrics and, when spatial stages finished, the Fig. 6
curves of every initialisation in one plot.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from dupr.evaluation.spatial import SpatialResult, plot_iou_similarity, summarise
from dupr.io import markdown_table
from dupr_platform.stages import Stage
from dupr_platform.storage import open_storage, split_uri
from dupr_platform.tracking import RunLogger


def results_by_init(
    stages: list[Stage], records: dict[str, dict[str, Any]]
) -> dict[str, dict[str, float]]:
    """{init: {"<kind>[/<detector>]/<metric>": value}} over the finished evaluation stages."""
    rows: dict[str, dict[str, float]] = {}
    for stage in stages:
        record = records.get(stage.name)
        if record is None or stage.kind in ("pretrain", "convert"):
            continue
        parts = stage.name.split("/")
        init, prefix = parts[-1], "/".join(parts[1:-1])
        row = rows.setdefault(init, {})
        for key, value in record["metrics"].items():
            row[f"{stage.kind}{'/' + prefix if prefix else ''}/{key}"] = value
    return rows


def report(
    cfg: dict[str, Any], stages: list[Stage], records: dict[str, dict[str, Any]], parent: RunLogger
) -> None:
    """Results per initialisation (rows) and metric (columns), and the Fig. 6 curves overlaid.

    Logged to the parent run as results.md, results.csv, an MLflow table and, when spatial
    stages finished, iou_similarity.png with one curve per initialisation.
    """
    rows = results_by_init(stages, records)
    curves: dict[str, SpatialResult] = {}
    storage = open_storage(cfg["storage"])
    for stage in stages:
        record = records.get(stage.name)
        init = stage.name.split("/")[-1]
        if record is not None and stage.kind == "spatial":
            _, name = split_uri(record["outputs"]["points"])
            points = json.loads(storage.read_bytes(f"{stage.folder}/{name}"))
            curves[init] = summarise(
                np.array(points["ious"]), np.array(points["sims"]), points["bins"]
            )
    if not rows:
        return
    columns = sorted({k for r in rows.values() for k in r})
    table = [{"init": init, **{c: rows[init].get(c) for c in columns}} for init in rows]
    results_md = markdown_table(table, ["init", *columns], number_format=".4g") + "\n"
    parent.log_text(results_md, "results.md")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["init", *columns])
    writer.writeheader()
    writer.writerows(table)
    parent.log_text(buffer.getvalue(), "results.csv")
    for init, row in rows.items():
        parent.log_metrics(0, {f"{init}/{k}": v for k, v in row.items()})
    parent.commit()
    if curves:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "iou_similarity.png"
            plot_iou_similarity(curves, path)
            parent.log_artifact(path)
