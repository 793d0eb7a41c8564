"""Seeds as a dimension of the study, the MoCo v2 baseline stage, and results with their
uncertainty (means, 95 % intervals, paired differences): no cluster needed."""

import csv
import io
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from dupr.config import BASELINES, ConfigError, baseline_method, preset
from dupr.evaluation.linear_probe import plot_levels
from dupr.evaluation.spatial import plot_iou_similarity, summarise
from dupr.evaluation.stats import Estimate, estimate, paired_difference
from dupr_platform.configs import validate_pipeline
from dupr_platform.pipeline import build_stages, key_columns
from dupr_platform.report import split_seed, study_tables
from dupr_platform.sweeps import PER_SEED, format_table, load_grid
from helpers import CONFIGS, TOY_PIPELINE


def pipeline_config(tmp_path, *overrides: str) -> dict:
    from dupr_platform.configs import compose

    where = [f"storage={tmp_path / 'storage'}", f"tracking_uri=sqlite:///{tmp_path / 'm.db'}"]
    return compose(CONFIGS, "pretrain_and_eval", [*where, *TOY_PIPELINE, *overrides])


def test_the_interval_is_students_t_and_one_seed_has_none():
    values = [0.40, 0.46, 0.43]
    e = estimate(values)
    sd = np.std(values, ddof=1)
    half = scipy_stats.t.ppf(0.975, 2) * sd / math.sqrt(3)
    assert e.n == 3 and e.mean == pytest.approx(0.43)
    assert (e.low, e.high) == pytest.approx((0.43 - half, 0.43 + half))
    assert e.text(".2f") == f"0.43 [{0.43 - half:.2f}, {0.43 + half:.2f}]"
    one = estimate([0.5, float("nan")])  # a missing value is left out
    assert one.n == 1 and not one.has_interval and not one.excludes_zero
    assert one.text(".2f") == "0.50"
    assert estimate([]).n == 0 and estimate([]).text() == ""


def test_a_paired_difference_sees_through_noise_that_the_seeds_share():
    """Per-seed noise common to both rows (the evaluation's seed) cancels in the pairing:
    a 1-point gain under 5-point seed noise is a difference, unpaired intervals overlap."""
    noise = {0: 0.0, 1: 5.0, 2: -4.0, 3: 2.0}
    ref = {s: 40.0 + n for s, n in noise.items()}
    better = {s: 41.0 + n + 0.1 * (-1) ** s for s, n in noise.items()}
    d = paired_difference(better, ref)
    assert d.mean == pytest.approx(1.0) and d.excludes_zero
    a, b = estimate(better.values()), estimate(ref.values())
    assert a.low < b.high  # the unpaired intervals overlap
    same = paired_difference({0: 1.0, 1: 2.0, 2: 1.5}, {0: 1.2, 1: 1.8, 2: 1.5})
    assert same.has_interval and not same.excludes_zero
    assert paired_difference({0: 1.0, 1: 2.0}, {1: 1.0}).n == 1  # only the shared seeds


def test_the_mocov2_baseline_is_the_same_training_with_mocov2s_loss():
    demo = preset("cpu_demo")
    moco = baseline_method(demo, "mocov2")
    assert moco.model.alpha == preset("mocov2").model.alpha == (0.0, 0.0, 0.0, 1.0)
    assert moco.model.beta == (0.0,) * 4 and moco.model.tau == preset("mocov2").model.tau
    # Same backbone, views, bank, schedule, budget and seed; the recipes' learning-rate ratio.
    for section in ("augment",):
        assert getattr(moco, section) == getattr(demo, section)
    assert moco.model.backbone == demo.model.backbone and moco.model.queue_size == 256
    assert moco.optim.epochs == demo.optim.epochs and moco.optim.batch_size == 32
    assert moco.optim.lr == pytest.approx(demo.optim.lr * 0.03 / 0.06)
    with pytest.raises(ConfigError, match="'byol': unknown baseline method"):
        baseline_method(demo, "byol")
    assert BASELINES == ("mocov2",)


def test_seeds_and_baselines_make_stages_and_seed_0_is_shared(tmp_path):
    plain = pipeline_config(tmp_path, "baselines.pretrain=[mocov2]")
    seeded = pipeline_config(tmp_path, "baselines.pretrain=[mocov2]", "seeds=[0,2]")
    validate_pipeline(seeded)
    before = {s.name: s for s in build_stages(plain)}
    after = {s.name: s for s in build_stages(seeded)}
    assert set(before) < set(after)
    assert all(after[name].key == stage.key for name, stage in before.items())  # cache shared
    extra = sorted(set(after) - set(before))
    assert extra == sorted(f"{name}@seed2" for name in before)
    # Seed 2 reaches the pre-training of both methods and every evaluation.
    assert after["pretrain@seed2"].config["method"]["seed"] == 2
    assert after["pretrain/mocov2@seed2"].config["method"]["seed"] == 2
    assert after["pretrain/mocov2@seed2"].config["method"]["model"]["beta"] == [0.0] * 4
    for name in ("detection/faster_rcnn_fpn/random@seed2", "probe/mocov2@seed2"):
        assert after[name].config["seed"] == 2
    assert after["probe/mocov2@seed2"].inputs["backbone"].stage == "convert/mocov2@seed2"
    assert split_seed("detection/faster_rcnn_fpn/mocov2@seed2") == (
        "detection/faster_rcnn_fpn/mocov2",
        2,
    )


def test_the_demo_compares_with_mocov2_and_bad_seeds_or_baselines_are_one_line(tmp_path):
    from dupr_platform.configs import compose

    demo = compose(CONFIGS, "pretrain_and_eval", [f"storage={tmp_path}", "tracking_uri=x"])
    assert demo["baselines"]["pretrain"] == ["mocov2"] and demo["seeds"] is None
    cases = {
        "seeds=[]": "seeds=\\[\\]: give at least one seed",
        "seeds=[0,0]": "seeds=\\[0, 0\\]: a seed is given twice",
        "seeds=[-1]": "seeds=-1",
        "seeds=[a]": "seeds",
        "baselines.pretrain=[simclr]": "baselines.pretrain='simclr'",
        "baselines.pretrain=[mocov2,mocov2]": "a name is twice",
        "baselines.reference=nothing": "baselines.reference='nothing': not a row",
    }
    for override, match in cases.items():
        with pytest.raises(ConfigError, match=match):
            validate_pipeline(pipeline_config(tmp_path, override))
    with pytest.raises(ConfigError, match="'mocov2' is also pretrain.label"):
        validate_pipeline(
            pipeline_config(tmp_path, "pretrain.label=mocov2", "baselines.pretrain=[mocov2]")
        )


def _per_seed() -> dict:
    return {
        "dupr": {0: {"probe/conv5": 0.52}, 1: {"probe/conv5": 0.55}, 2: {"probe/conv5": 0.50}},
        "mocov2": {0: {"probe/conv5": 0.50}, 1: {"probe/conv5": 0.53}, 2: {"probe/conv5": 0.49}},
        "random": {0: {"probe/conv5": 0.40}, 1: {"probe/conv5": 0.41}, 2: {"probe/conv5": 0.39}},
    }


def test_the_study_table_shows_intervals_and_marks_only_real_differences():
    tables = study_tables(_per_seed(), "dupr")
    text = tables.markdown
    assert "Mean [95% interval] over 3 seed(s)" in text
    lines = {line.split("|")[1].strip(): line for line in text.splitlines() if "|" in line}
    assert "0.5233 [" in lines["dupr"]
    assert lines["random − dupr"].rstrip(" |").endswith("*")  # 13 points below, every seed
    d = tables.diffs["mocov2"]["probe/conv5"]
    assert d.mean == pytest.approx(-0.01667, abs=1e-4)
    assert d.excludes_zero == (d.high < 0)
    rows = list(csv.DictReader(io.StringIO(tables.csv)))
    random = next(r for r in rows if r["init"] == "random")
    assert random["differs"] == "True" and random["reference"] == "dupr"
    assert float(random["ci95_low"]) < 0.40 < float(random["ci95_high"])
    one_seed = study_tables({k: {0: v[0]} for k, v in _per_seed().items()}, "dupr")
    assert "one seed: no intervals" in one_seed.markdown and "not tested" in one_seed.markdown
    assert not any(line.rstrip(" |").endswith("*") for line in one_seed.markdown.splitlines())


def test_plots_carry_error_bars_over_seeds(tmp_path):
    rng = np.random.default_rng(0)
    runs = []
    for _ in range(3):
        ious = rng.uniform(0, 1, 200)
        runs.append(summarise(ious, ious + rng.normal(0, 0.1, 200), 5))
    plot_iou_similarity({"dupr": runs, "random": runs[0]}, tmp_path / "curves.png")
    plot_levels(
        {"dupr": {"conv5": Estimate(0.5, 3, 0.45, 0.55)}, "random": {"conv5": Estimate(0.4, 1)}},
        tmp_path / "levels.png",
    )
    for name in ("curves.png", "levels.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_sweep_table_pairs_seeds_and_grids_take_seeds(tmp_path):
    rows = []
    for label, values in (("0.2", [0.40, 0.45, 0.42]), ("0.1", [0.50, 0.56, 0.52])):
        per = {"probe/conv5": {str(s): v for s, v in enumerate(values)}}
        rows.append(
            {"label": label, "status": "done", PER_SEED: per, "probe/conv5": np.mean(values)}
        )
    text = format_table(load_grid("tau", CONFIGS / "grid"), rows, ["probe/conv5"])
    assert "over 3 seeds" in text
    assert "42.3 [" in text and "(+10.3 [" in text and "*)" in text
    grid = tmp_path / "seeded.yaml"
    grid.write_text("key: pretrain.method.model.tau\nseeds: [0, 1]\nvalues: [0.2, 0.1]\n")
    assert load_grid(str(grid), CONFIGS / "grid").fixed["seeds"] == [0, 1]


def test_the_console_shows_each_evaluations_key_metrics(tmp_path):
    cfg = pipeline_config(tmp_path, "eval.detection.detectors=[faster_rcnn_fpn,retinanet_fpn]")
    assert key_columns(cfg) == [
        "detection/faster_rcnn_fpn/bbox/AP",
        "detection/faster_rcnn_fpn/bbox/AP50",
        "detection/retinanet_fpn/bbox/AP",
        "detection/retinanet_fpn/bbox/AP50",
        "spatial/slope",
        "correspondence/conv4/exact",
        "correspondence/conv5/exact",
        "probe/conv4",
        "probe/conv5",
        "object_probe/conv4",
        "object_probe/conv5",
    ]
