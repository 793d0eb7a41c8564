"""Ray Tune sweeps over the pipeline: one trial per grid value, the paper's ablation tables.

A grid (configs/grid/<name>.yaml, or any YAML file of that form) gives the overrides of each
trial. `run_sweep` works in this order:

1. It builds and checks every trial's config before anything starts.
2. It opens the sweep's MLflow run, or continues it if the same sweep ran before.
3. It skips trials whose result row an earlier run of this sweep stored.
4. It runs the other trials as Ray Tune trials. Each trial is `trial_fn`: the whole pipeline
   with the trial's overrides, its pre-training a TorchTrainer inside the trial, as Ray 2.60
   requires for Train under Tune.

Each trial's pipeline run is an MLflow child of the sweep run, and its stage runs are children
of the trial run. Stages are cached by key in the sweep's storage folder. So a retried or
re-run trial redoes only what failed, and stages that trials share run once.

The table has one row per grid value and one column per metric, with the difference to the first
row in brackets. It is printed, and logged as Markdown, CSV and an MLflow table. The best row is
tagged.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dupr.config import BASELINES, ConfigError, DUPRConfig, baseline_method
from dupr.evaluation.stats import estimate, paired_difference
from dupr.io import markdown_table
from dupr_platform import console
from dupr_platform.claims import SharedClaims
from dupr_platform.cluster import check_nodes, credentials_withheld, start_ray
from dupr_platform.configs import (
    PipelineConfig,
    best_metric,
    plain,
    typed,
    update,
    validate_sweep,
)
from dupr_platform.eval_stages import metric_names
from dupr_platform.pipeline import (
    EVALUATIONS,
    PipelineResult,
    build_stages,
    preflight_pipeline,
    run_pipeline,
)
from dupr_platform.recovery import driving
from dupr_platform.report import DIFFERS, results_by_init, results_by_seed, split_seed
from dupr_platform.storage import open_storage, ray_storage_args
from dupr_platform.text import one_line
from dupr_platform.tracking import RUN_KEY_TAG, RunLogger

TRIALS_DIR = "sweep/trials"
# A grid key of its own: the model's method as configured (its `pretrain.label`, e.g. dupr) or
# a baseline of `dupr.config.BASELINES` trained like it (`baseline_method`), so that a grid
# compares methods without a second copy of the baseline's settings (configs/grid/methods.yaml).
METHOD_KEY = "method"


# ---------------------------------------------------------------------------------------------
# Grids


@dataclass
class Grid:
    name: str
    table: str  # which table of the paper it reproduces
    label: str  # the name of the row label column
    values: list[tuple[str, dict[str, Any]]]  # (row label, {dotted key: value})
    fixed: dict[str, Any] = field(default_factory=dict)  # overrides of every trial


def grid_names(grids_dir: Path) -> list[str]:
    return sorted(p.stem for p in Path(grids_dir).glob("*.yaml"))


def load_grid(name: str, grids_dir: Path) -> Grid:
    """A named grid from `grids_dir`, or a YAML file given by path."""
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = Path(grids_dir) / f"{name}.yaml"
        if not path.is_file():
            valid = ", ".join(grid_names(grids_dir))
            raise ConfigError(f"--grid {name!r}: unknown grid (valid: {valid}, or a .yaml file)")
    if not path.is_file():
        raise ConfigError(f"--grid {name!r}: no such file")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not YAML ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("values"), list) or not spec["values"]:
        raise ConfigError(f"{path}: needs a non-empty list `values`")
    key = spec.get("key")
    values: list[tuple[str, dict[str, Any]]] = []
    for i, value in enumerate(spec["values"]):
        if isinstance(value, dict) and "set" in value:
            if not isinstance(value["set"], dict) or not value["set"]:
                raise ConfigError(f"{path}: values[{i}].set: needs a mapping of key: value")
            label = str(value.get("label", i))
            values.append((label, dict(value["set"])))
        elif key:
            label = ",".join(f"{v:g}" for v in value) if isinstance(value, list) else str(value)
            values.append((label, {key: value}))
        else:
            raise ConfigError(f"{path}: values[{i}]: needs `key` at the top or `set` per value")
    labels = [label for label, _ in values]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{path}: two values have the same label ({labels})")
    fixed = dict(spec.get("fixed") or {})
    if "seeds" in spec:  # every value once per seed, as `seeds=` does for one pipeline
        fixed["seeds"] = spec["seeds"]
    return Grid(
        name=path.stem,
        table=str(spec.get("table", path.stem)),
        label=str(spec.get("label", (key or "value").rsplit(".", 1)[-1])),
        values=values,
        fixed=fixed,
    )


# ---------------------------------------------------------------------------------------------
# Trials


@dataclass
class Trial:
    label: str
    overrides: dict[str, Any]
    cfg: dict[str, Any]  # the trial's complete pipeline config
    key: str  # hash of cfg: a stored row is reused only for the very same trial


def sweep_name(cfg: dict[str, Any], grid: Grid) -> str:
    return cfg["sweep"].get("name") or f"ablation-{grid.name}"


def build_trials(cfg: dict[str, Any], grid: Grid) -> list[Trial]:
    """Each trial's config; every one checked (types, values, data, storage, tracking) first.

    A grid value is set on the typed pipeline config (`dupr_platform.configs`), so a value of
    the wrong type or an unknown key fails like the same override on the command line.
    """
    name = sweep_name(cfg, grid)
    storage = open_storage(cfg["storage"]).uri_for(name)
    base = typed({k: v for k, v in cfg.items() if k != "sweep"}, PipelineConfig)
    trials = []
    for label, overrides in grid.values:
        where = f"grid {grid.name}, value {label}"
        values = {**grid.fixed, **overrides}
        trial = copy.deepcopy(base)
        try:
            for dotted, value in values.items():
                if dotted == METHOD_KEY:
                    _set_method(trial, value)
                else:
                    update(trial, dotted, value)
            trial_cfg = plain(trial)
            trial_cfg["storage"] = storage
            trial_cfg["name"] = f"{name}/{label}".replace("/", ":")
            preflight_pipeline(trial_cfg)
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None
        digest = hashlib.sha256(json.dumps(trial_cfg, sort_keys=True).encode()).hexdigest()
        trials.append(Trial(label, values, trial_cfg, digest[:12]))
    return trials


def _set_method(trial: Any, name: Any) -> None:
    """Grid key `method`: keep the configured method, or train baseline `name` like it."""
    configured = trial.pretrain.label
    if name == configured:
        return
    if name not in BASELINES:
        raise ConfigError(
            f"method={name!r}: the configured method ({configured}) or a baseline "
            f"({', '.join(BASELINES)})"
        )
    configured_method = plain(trial.pretrain.method)
    method = DUPRConfig.from_dict(configured_method)
    baseline = json.loads(json.dumps(baseline_method(method, name).to_dict()))  # plain lists
    for section, values in baseline.items():  # the fields it changes, each set and checked
        for key, value in values.items() if isinstance(values, dict) else ():
            if value != configured_method[section][key]:
                update(trial, f"pretrain.method.{section}.{key}", value)
    update(trial, "pretrain.label", name)


def trial_metrics(trial_cfg: dict[str, Any]) -> list[str]:
    """The names of a trial's row: the pre-trained model's metrics (see `trial_row`)."""
    label = trial_cfg["pretrain"]["label"]
    names = ["loss"]
    for stage in build_stages(trial_cfg):
        parts = split_seed(stage.name)[0].split("/")
        if parts[-1] == label and stage.kind in EVALUATIONS:
            prefix = "/".join(parts[:-1])
            names += [f"{prefix}/{m}" for m in metric_names(stage.kind, stage.config)]
    return list(dict.fromkeys(names))  # once, whatever the number of seeds


def trial_fn(config: dict[str, Any]) -> None:
    """One Tune trial: the pipeline with the trial's config, nested under the sweep run."""
    from ray import tune

    callbacks = None
    if config["early_stopping"]:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks = [TuneReportCallback()]  # each epoch's pre-training loss reaches ASHA
    result = run_pipeline(
        config["cfg"],
        parent_run_id=config["sweep_run_id"],
        run_key=trial_run_key(config),
        run_name=config["label"],
        params={"grid": {"label": config["label"], **config["overrides"]}},
        pretrain_callbacks=callbacks,
        print_summary=False,  # the driver prints it from the result (`_TrialSummaries`)
        claims=SharedClaims.named(config["claims"]),
        console_tag=f"trial {config['label']}",
    )
    if not result.ok:
        failed = [r for r in result.reports if r.error]
        message = "; ".join([*(f"{r.name}: {r.error}" for r in failed), *result.failures])
        message = message[:1000] or "a stage failed"
        if not any(r.retryable for r in failed):
            # A retry cannot fix it (storage down, broken data, a smoke run's finding at full
            # size): the trial ends as failed now, without Tune's retries, its message in the
            # result.
            tune.report({FAILED_METRIC: message, "pipeline_done": 0.0, SUMMARY: result.summary})
            return
        # This attempt's summary is forwarded by Ray, best effort; the last attempt's result
        # carries its own to the driver.
        print(result.summary, flush=True)
        raise RuntimeError(message)  # Tune retries the trial; the stage cache keeps what finished
    row, per_seed = trial_row(config["cfg"], result)
    # Stored as soon as the trial is done: a sweep whose driver dies later keeps this row.
    metrics = {k: v for k, v in row.items() if _is_metric(k, v)}
    store = open_storage(config["cfg"]["storage"])
    store.write_json(
        f"{TRIALS_DIR}/{config['key']}.json",
        {"label": config["label"], "metrics": metrics, "per_seed": per_seed},
    )
    tune.report({**row, "pipeline_done": 1.0, SUMMARY: result.summary})


FAILED_METRIC = "trial_error"  # in a trial's result: it failed and must not be retried
SUMMARY = "pipeline_summary"  # in a trial's last result: what its pipeline would have printed


def trial_run_key(config: dict[str, Any]) -> str:
    """A trial's pipeline run key (a retried trial continues its run) and its name in the
    sweep's claims."""
    return f"{config['sweep']}:{config['key']}"


def _trial_claims(claims: SharedClaims, cpus: float) -> Any:
    """A Tune callback, on the driver: each running trial's own CPUs (its pipeline's driver)
    held in the sweep's claims, and a trial that ends or fails (its pipeline could not say so)
    holding nothing."""
    from ray import tune

    class _TrialClaims(tune.Callback):
        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any):
            claims.hold(f"{trial_run_key(trial.config)} (trial)", {"CPU": cpus})

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any):
            for owner in (trial_run_key(trial.config), f"{trial_run_key(trial.config)} (trial)"):
                claims.forget(owner)

        on_trial_error = on_trial_recover = on_trial_complete

    return _TrialClaims()


def _trial_summaries() -> Any:
    """A Tune callback, on the driver: each trial's pipeline summary as the trial ends."""
    from ray import tune

    class _TrialSummaries(tune.Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any):
            summary = (trial.last_result or {}).get(SUMMARY)
            if summary:
                console.show(f"[sweep] trial {trial.config['label']}:\n{summary}")

    return _TrialSummaries()


def trial_row(
    cfg: dict[str, Any], result: PipelineResult
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The pre-trained model's metrics (every stage) of one finished pipeline: the means over
    its seeds, and each metric's values per seed ({metric: {seed: value}}, for intervals)."""
    stages = build_stages(cfg)
    label = cfg["pretrain"].get("label", "dupr")
    seeds = results_by_seed(stages, result.records).get(label, {})
    row = dict(results_by_init(stages, result.records).get(label, {}))
    per_seed: dict[str, dict[str, float]] = {}
    for seed, values in seeds.items():
        for metric, value in values.items():
            per_seed.setdefault(metric, {})[str(seed)] = value
    first = next(s.name for s in stages if s.kind == "pretrain")  # the one Tune follows
    pre = result.records.get(first, {}).get("metrics", {})
    if "loss" in pre:
        row["loss"] = pre["loss"]  # the early-stopping proxy, reported in every result
    return row, per_seed


# ---------------------------------------------------------------------------------------------
# The sweep


@dataclass
class SweepResult:
    name: str
    run_id: str
    rows: list[dict[str, Any]]  # label, status, error, metrics...
    table: str

    @property
    def ok(self) -> bool:
        return all(r["status"] in ("done", "stored") for r in self.rows)


def run_sweep(cfg: dict[str, Any], grid: Grid) -> SweepResult:
    """Check every trial, then run those without a stored row as Ray Tune trials."""
    cfg = dict(cfg)
    cfg["sweep"] = {**cfg["sweep"], "metric": best_metric(cfg)}
    name = sweep_name(cfg, grid)
    trials = build_trials(cfg, grid)
    validate_sweep(cfg, sorted({m for t in trials for m in trial_metrics(t.cfg)}))
    state = open_storage(cfg["storage"]).uri_for(name)
    store = open_storage(state)
    stored = {
        t.key: store.read_json(f"{TRIALS_DIR}/{t.key}.json")
        for t in trials
        if store.exists(f"{TRIALS_DIR}/{t.key}.json")
    }
    todo = [t for t in trials if t.key not in stored]

    if todo and start_ray("sweep"):
        check_nodes(cfg["storage"], cfg["tracking_uri"])
    sweep_run = RunLogger.start(
        cfg["tracking_uri"],
        cfg["experiment"],
        f"sweep:{name}",
        tags={"mlflow.runName": name, "dupr.sweep": grid.name, "dupr.table": grid.table},
    )
    with driving(sweep_run, RUN_KEY_TAG, f"sweep:{name}", "sweep"):
        result = _run_trials(cfg, grid, trials, stored, sweep_run, state)
    sweep_run.end("FINISHED" if result.ok else "FAILED")
    return result


def _run_trials(
    cfg: dict[str, Any],
    grid: Grid,
    trials: list[Trial],
    stored: dict[str, Any],
    sweep_run: RunLogger,
    state: str,
) -> SweepResult:
    """Run the trials that have no stored row; build, log and print the table."""
    from ray import tune

    sw, name, store = cfg["sweep"], sweep_name(cfg, grid), open_storage(state)
    todo = [t for t in trials if t.key not in stored]
    # Params are immutable in MLflow: only what defines the sweep; how it runs (concurrency,
    # retries) may change between runs of the same sweep and goes into the artifact.
    sweep_run.log_params({"grid": grid.name, "table": grid.table, "storage": state})
    sweep_run.log_dict(
        {
            "grid": grid.name,
            "values": [[label, o] for label, o in grid.values],
            "fixed": grid.fixed,
            "sweep": sw,
            "trials": [t.cfg for t in trials],
        },
        "config/sweep.json",
    )
    print(
        f"[sweep] {name}: {len(trials)} trials ({grid.table}), {len(stored)} already done, "
        f"{len(todo)} to run; MLflow run {sweep_run.run_id}",
        flush=True,
    )

    outcomes: dict[str, tuple[str, dict[str, float], str]] = {}
    if todo:
        # What the trials running at once hold of the cluster; the actor ends with this driver.
        claims = SharedClaims.create(f"dupr-claims:{name}:{uuid.uuid4().hex[:8]}")
        scheduler = None
        if sw["early_stopping"]:
            epochs = max(t.cfg["pretrain"]["method"]["optim"]["epochs"] for t in trials)
            scheduler = tune.schedulers.ASHAScheduler(
                metric="loss",
                mode="min",
                max_t=epochs + 1,
                grace_period=sw["asha"]["grace_period"],
                reduction_factor=sw["asha"]["reduction_factor"],
            )
        tuner = tune.Tuner(
            tune.with_resources(
                trial_fn,
                {
                    "CPU": float(sw["trial_cpus"]),
                    "memory": int(float(sw["trial_memory_gib"]) * 2**30),
                },
            ),
            param_space=tune.grid_search(
                [_trial_config(t, name, sweep_run.run_id, sw, claims) for t in todo]
            ),
            tune_config=tune.TuneConfig(
                max_concurrent_trials=int(sw["max_concurrent_trials"]), scheduler=scheduler
            ),
            run_config=tune.RunConfig(
                name=f"{name}-{time.strftime('%Y%m%dT%H%M%S')}",
                **ray_storage_args(open_storage(store.uri_for("tune"))),
                failure_config=tune.FailureConfig(max_failures=int(sw["trial_retries"])),
                callbacks=[_trial_summaries(), _trial_claims(claims, float(sw["trial_cpus"]))],
                verbose=0,
            ),
        )
        with credentials_withheld(), console.library_output():
            results = tuner.fit()
        for result in results:
            key = result.config["key"]
            if result.error is not None:
                # Under Ray's traceback, the last line that names an error.
                error = one_line(
                    result.error,
                    keep_line=lambda line: "Error" in line,
                    else_last_line=True,
                    limit=300,
                )
                outcomes[key] = ("failed", {}, error)
            elif (result.metrics or {}).get(FAILED_METRIC):  # not retried: see trial_fn
                outcomes[key] = ("failed", {}, str(result.metrics[FAILED_METRIC]))
            elif (result.metrics or {}).get("pipeline_done") != 1.0:
                outcomes[key] = ("stopped early", dict(result.metrics or {}), "")
            else:
                metrics = {k: v for k, v in result.metrics.items() if _is_metric(k, v)}
                outcomes[key] = ("done", metrics, "")  # its row is stored (trial_fn)

    rows = []
    for t in trials:
        if t.key in stored:
            rows.append(
                {
                    "label": t.label,
                    "status": "stored",
                    "error": "",
                    PER_SEED: stored[t.key].get("per_seed", {}),
                    **stored[t.key]["metrics"],
                }
            )
        else:
            status, metrics, error = outcomes.get(t.key, ("failed", {}, "not run"))
            row = {"label": t.label, "status": status, "error": error, **metrics}
            if status == "done" and store.exists(f"{TRIALS_DIR}/{t.key}.json"):
                row[PER_SEED] = store.read_json(f"{TRIALS_DIR}/{t.key}.json").get("per_seed", {})
            rows.append(row)
    table, best = log_table(sweep_run, grid, rows, sw["metric"], sw["mode"])
    if best is not None:  # the best row's own trial run is tagged too
        key = next(t.key for t in trials if t.label == best)
        client = sweep_run.patient_client
        for run in client.search_runs(
            [sweep_run.experiment_id], f"tags.`dupr.run_key` = '{name}:{key}'"
        ):
            client.set_tag(run.info.run_id, "dupr.best", "true")
    print(table, flush=True)
    return SweepResult(name, sweep_run.run_id, rows, table)


def _trial_config(
    trial: Trial, sweep: str, run_id: str, sw: dict[str, Any], claims: SharedClaims
) -> dict[str, Any]:
    return {
        "claims": claims.name,
        "cfg": trial.cfg,
        "key": trial.key,
        "label": trial.label,
        "overrides": trial.overrides,
        "sweep": sweep,
        "sweep_run_id": run_id,
        "early_stopping": bool(sw["early_stopping"]),
    }


# ---------------------------------------------------------------------------------------------
# The table


SHOWN = (
    "bbox/AP",
    "bbox/AP50",
    "bbox/AP75",
    "segm/AP",
    "voc/AP",
    "voc/AP50",
    "voc/AP75",
    "conv2",
    "conv3",
    "conv4",
    "conv5",
    "accuracy",
    "slope",
)


PER_SEED = "per_seed"  # a row's {metric: {seed: value}}: its intervals and paired differences


def table_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The paper's columns first (detection, probe), then the cheap proxies."""
    keys = {k for r in rows for k in r if k not in ("label", "status", "error", PER_SEED)}
    return sorted(
        (k for k in keys if k.endswith(SHOWN)),
        key=lambda k: (0 if k.startswith("detection") else 1 if k.startswith("probe") else 2, k),
    )


def format_table(grid: Grid, rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Markdown; fractions in percent as in the paper. With several seeds a cell is the mean
    [95 % interval], and the difference to the first row is paired over the seeds, marked
    with * where its interval excludes zero (`dupr.evaluation.stats`)."""
    first = rows[0] if rows else {}

    def seeds_of(row: dict[str, Any], col: str) -> dict[str, float]:
        return (row.get(PER_SEED) or {}).get(col) or {}

    def cell(row: dict[str, Any], col: str) -> str:
        value = row.get(col)
        if not isinstance(value, float | int) or math.isnan(value):
            return ""
        scale = 1.0 if col.endswith("slope") else 100.0
        fmt = ".1f" if scale == 100 else ".3f"
        mean = estimate(v * scale for v in seeds_of(row, col).values())
        text = mean.text(fmt) if mean.has_interval else f"{value * scale:{fmt}}"
        base = first.get(col)
        if row is not first and isinstance(base, float | int) and not math.isnan(base):
            diff = paired_difference(
                {s: v * scale for s, v in seeds_of(row, col).items()},
                {s: v * scale for s, v in seeds_of(first, col).items()},
            )
            if diff.has_interval:
                mark = f" {DIFFERS}" if diff.excludes_zero else ""
                text += f" ({diff.mean:+{fmt}} [{diff.low:+{fmt}}, {diff.high:+{fmt}}]{mark})"
            else:
                text += f" ({(value - base) * scale:+{fmt}})"
        return text

    def status(row: dict[str, Any]) -> str:
        return row["status"] + (f": {row['error'][:120]}" if row.get("error") else "")

    cells = [[row["label"], *(cell(row, c) for c in columns), status(row)] for row in rows]
    seeds = max((len(seeds_of(r, c)) for r in rows for c in columns), default=0)
    note = (
        f"Mean [95 % interval] over {seeds} seeds; in brackets the difference to the first "
        f"row, paired over seeds, {DIFFERS} where its interval excludes zero.\n\n"
        if seeds > 1
        else ""
    )
    return note + markdown_table(cells, [grid.label, *columns, "status"]) + "\n"


def log_table(
    run: RunLogger, grid: Grid, rows: list[dict[str, Any]], metric: str, mode: str
) -> tuple[str, str | None]:
    """Log the table (Markdown, CSV, MLflow table); return it and the best row's label."""
    columns = table_columns(rows)
    table = format_table(grid, rows, columns)
    run.log_text(f"# {grid.table}: {grid.name}\n\n{table}", "sweep_table.md")
    # Each column's mean, then its seeds and 95 % interval (empty for one seed).
    spread = [f"{c}/{part}" for c in columns for part in ("seeds", "ci95_low", "ci95_high")]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["label", *columns, *spread, "status", "error"])
    writer.writeheader()
    for row in rows:
        line = {k: row.get(k, "") for k in ["label", *columns, "status", "error"]}
        for c in columns:
            e = estimate(((row.get(PER_SEED) or {}).get(c) or {}).values())
            line[f"{c}/seeds"] = e.n or ""
            line[f"{c}/ci95_low"] = e.low if e.has_interval else ""
            line[f"{c}/ci95_high"] = e.high if e.has_interval else ""
        writer.writerow(line)
    run.log_text(buffer.getvalue(), "sweep_table.csv")
    run.patient_client.log_table(
        run.run_id,
        data={c: [r.get(c) for r in rows] for c in ["label", *columns, "status"]},
        artifact_file="sweep_table.json",
    )
    scored = [
        r for r in rows if isinstance(r.get(metric), float | int) and not math.isnan(r[metric])
    ]
    if not scored:
        return table, None
    best = (max if mode == "max" else min)(scored, key=lambda r: r[metric])
    run.set_tag("dupr.best", best["label"])
    run.set_tag("dupr.best_metric", f"{metric}={best[metric]:.4g}")
    return table, best["label"]


def _is_metric(key: str, value: Any) -> bool:
    return isinstance(value, float | int) and not isinstance(value, bool) and "/" in key


__all__ = ["Grid", "SweepResult", "build_trials", "load_grid", "run_sweep", "trial_fn"]
