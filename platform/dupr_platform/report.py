"""The study's results side by side: one row per initialisation, each metric with its uncertainty.

Read from the completion records of the finished evaluation stages. A study run with several
seeds (`seeds=[0, 1, 2]`) has one record per stage and seed; each metric is shown as its mean
over seeds with a 95 % interval, and every row as its paired difference to the reference row
(`baselines.reference`, by default the pre-trained model), marked as a difference only where
the interval excludes zero (`dupr.evaluation.stats`). Logged to the pipeline's parent run as
results.md, results.csv (one line per row and metric), metrics, and the plots: the Fig. 6
curves of every initialisation and the probe's accuracy per level, with error bars.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dupr.config import LEVELS
from dupr.evaluation.linear_probe import plot_levels
from dupr.evaluation.spatial import SpatialResult, plot_iou_similarity, summarise
from dupr.evaluation.stats import CONFIDENCE, Estimate, estimate, paired_difference
from dupr.io import markdown_table
from dupr_platform.stages import Stage
from dupr_platform.storage import open_storage, split_uri
from dupr_platform.tracking import RunLogger

SEED_MARK = "@seed"  # a stage name's seed suffix (see dupr_platform.pipeline.seed_suffix)
DIFFERS = "*"  # marks a difference whose interval excludes zero


def split_seed(name: str) -> tuple[str, int]:
    """("probe/dupr", 2) for "probe/dupr@seed2"; seed 0 for a name without a suffix."""
    base, mark, seed = name.rpartition(SEED_MARK)
    return (base, int(seed)) if mark and seed.isdigit() else (name, 0)


def results_by_seed(
    stages: list[Stage], records: dict[str, dict[str, Any]]
) -> dict[str, dict[int, dict[str, float]]]:
    """{init: {seed: {"<kind>[/<detector>]/<metric>": value}}} over the finished evaluations."""
    rows: dict[str, dict[int, dict[str, float]]] = {}
    for stage in stages:
        record = records.get(stage.name)
        if record is None or stage.kind in ("pretrain", "convert"):
            continue
        name, seed = split_seed(stage.name)
        parts = name.split("/")
        init, prefix = parts[-1], "/".join(parts[1:-1])
        row = rows.setdefault(init, {}).setdefault(seed, {})
        for key, value in record["metrics"].items():
            row[f"{stage.kind}{'/' + prefix if prefix else ''}/{key}"] = value
    return rows


def results_by_init(
    stages: list[Stage], records: dict[str, dict[str, Any]]
) -> dict[str, dict[str, float]]:
    """{init: {metric: mean over seeds}}: one number per metric, as a sweep's Tune sees it."""
    return {
        init: {metric: e.mean for metric, e in estimates.items()}
        for init, estimates in summarise_seeds(results_by_seed(stages, records)).items()
    }


def summarise_seeds(
    per_seed: dict[str, dict[int, dict[str, float]]],
) -> dict[str, dict[str, Estimate]]:
    """{init: {metric: mean and interval over the seeds}}."""
    return {
        init: {
            m: estimate(values[m] for values in seeds.values() if m in values)
            for m in _metrics(seeds)
        }
        for init, seeds in per_seed.items()
    }


def differences(
    per_seed: dict[str, dict[int, dict[str, float]]], reference: str
) -> dict[str, dict[str, Estimate]]:
    """{init: {metric: init − reference, paired over the seeds both have}} for every other row."""
    ref = per_seed.get(reference, {})
    out: dict[str, dict[str, Estimate]] = {}
    for init, seeds in per_seed.items():
        if init == reference:
            continue
        out[init] = {
            m: paired_difference(
                {s: v[m] for s, v in seeds.items() if m in v},
                {s: v[m] for s, v in ref.items() if m in v},
            )
            for m in _metrics(seeds)
        }
    return out


def _metrics(seeds: dict[int, dict[str, float]]) -> list[str]:
    return sorted({m for values in seeds.values() for m in values})


@dataclass
class StudyTables:
    """The results of a study, rendered: Markdown for people, CSV lines for programs."""

    markdown: str
    csv: str
    estimates: dict[str, dict[str, Estimate]]
    diffs: dict[str, dict[str, Estimate]]
    reference: str


def study_tables(
    per_seed: dict[str, dict[int, dict[str, float]]],
    reference: str,
    columns: list[str] | None = None,
) -> StudyTables:
    """Means with intervals per row and metric, then each row's difference to `reference`.

    `columns` restricts the Markdown to those metrics (the console's key metrics); the CSV
    always has every metric.
    """
    estimates = summarise_seeds(per_seed)
    diffs = differences(per_seed, reference) if reference in per_seed else {}
    metrics = sorted({m for row in estimates.values() for m in row})
    shown = [m for m in (columns or metrics) if m in metrics]
    seeds = max((len(s) for s in per_seed.values()), default=0)
    level = f"{CONFIDENCE:.0%}"
    lines = [
        f"Mean [{level} interval] over {seeds} seed(s)"
        + ("" if seeds > 1 else " (one seed: no intervals; seeds=[0,1,2] gives them)"),
        "",
        markdown_table(
            [
                [init, _n(per_seed[init]), *(row.get(m, _NONE).text() for m in shown)]
                for init, row in estimates.items()
            ],
            ["init", "seeds", *shown],
        ),
    ]
    if diffs:
        tested = (
            f"paired over seeds [{level} interval]; {DIFFERS} = the interval excludes zero (a "
            "difference); unmarked = not distinguishable from noise"
            if seeds > 1
            else "one seed: not tested, a difference cannot be told from noise"
        )
        lines += [
            "",
            f"Difference to {reference}, {tested}",
            "",
            markdown_table(
                [
                    [f"{init} − {reference}", *(_diff_text(row.get(m, _NONE)) for m in shown)]
                    for init, row in diffs.items()
                ],
                ["row", *shown],
            ),
        ]
    buffer = io.StringIO()
    head = ["init", "metric", "seeds", "mean", "ci95_low", "ci95_high", "reference"]
    head += ["difference", "difference_ci95_low", "difference_ci95_high", "differs"]
    writer = csv.writer(buffer)
    writer.writerow(head)
    for init, row in estimates.items():
        for metric, e in row.items():
            d = diffs.get(init, {}).get(metric)
            writer.writerow(
                [init, metric, e.n, _num(e.mean), _num(e.low), _num(e.high), reference]
                + (
                    [_num(d.mean), _num(d.low), _num(d.high), d.excludes_zero]
                    if d
                    else ["", "", "", ""]
                )
            )
    return StudyTables("\n".join(lines) + "\n", buffer.getvalue(), estimates, diffs, reference)


_NONE = Estimate(math.nan, 0)


def _n(seeds: dict[int, dict[str, float]]) -> str:
    return str(len(seeds))


def _diff_text(e: Estimate) -> str:
    if not math.isfinite(e.mean):
        return ""
    return (
        f"{e.mean:+.4g}"
        + (f" [{e.low:+.4g}, {e.high:+.4g}]" if e.has_interval else "")
        + (f" {DIFFERS}" if e.excludes_zero else "")
    )


def _num(x: float) -> str:
    return "" if not math.isfinite(x) else f"{x:.6g}"


def reference_row(cfg: dict[str, Any]) -> str:
    """The row differences are taken against: `baselines.reference`, else the model's label."""
    return cfg["baselines"].get("reference") or cfg["pretrain"].get("label", "dupr")


def report(
    cfg: dict[str, Any],
    stages: list[Stage],
    records: dict[str, dict[str, Any]],
    parent: RunLogger,
    columns: list[str] | None = None,
) -> str:
    """Log the study's tables and plots to the parent run; return the table to print.

    results.md (every metric), results.csv, the means and interval bounds as metrics
    (`<init>/<metric>`, `.../ci95_low`, `.../ci95_high`), iou_similarity.png (one curve per
    initialisation) and probe_levels.png when those stages finished.
    """
    per_seed = results_by_seed(stages, records)
    if not per_seed:
        return ""
    reference = reference_row(cfg)
    full = study_tables(per_seed, reference)
    parent.log_text(full.markdown, "results.md")
    parent.log_text(full.csv, "results.csv")
    for init, row in full.estimates.items():
        values: dict[str, float] = {}
        for metric, e in row.items():
            values[f"{init}/{metric}"] = e.mean
            if e.has_interval:
                values[f"{init}/{metric}/ci95_low"] = e.low
                values[f"{init}/{metric}/ci95_high"] = e.high
        parent.log_metrics(0, values)
    parent.commit()
    with tempfile.TemporaryDirectory() as tmp:
        curves = _spatial_curves(cfg, stages, records)
        if curves:
            plot_iou_similarity(curves, Path(tmp) / "iou_similarity.png")
            parent.log_artifact(Path(tmp) / "iou_similarity.png")
        probe = {
            init: {level: row[f"probe/{level}"] for level in LEVELS if f"probe/{level}" in row}
            for init, row in full.estimates.items()
        }
        if any(probe.values()):
            plot_levels({k: v for k, v in probe.items() if v}, Path(tmp) / "probe_levels.png")
            parent.log_artifact(Path(tmp) / "probe_levels.png")
    return study_tables(per_seed, reference, columns).markdown


def _spatial_curves(
    cfg: dict[str, Any], stages: list[Stage], records: dict[str, dict[str, Any]]
) -> dict[str, list[SpatialResult]]:
    """Each initialisation's Fig. 6 points, one result per seed, from the spatial stages."""
    storage = open_storage(cfg["storage"])
    curves: dict[str, list[SpatialResult]] = {}
    for stage in stages:
        record = records.get(stage.name)
        if record is None or stage.kind != "spatial":
            continue
        init = split_seed(stage.name)[0].split("/")[-1]
        _, name = split_uri(record["outputs"]["points"])
        points = json.loads(storage.read_bytes(f"{stage.folder}/{name}"))
        curves.setdefault(init, []).append(
            summarise(np.array(points["ious"]), np.array(points["sims"]), points["bins"])
        )
    return curves
