"""Sweep grids and trial configs, checked before any trial starts: no Ray needed."""

import pytest
import ray

from dupr.config import ConfigError
from dupr_platform.sweeps import build_trials, format_table, load_grid, run_sweep
from helpers import CONFIGS, sweep_config


def test_bad_grids_fail_before_any_trial(tmp_path):
    cfg = sweep_config(tmp_path, f"sqlite:///{tmp_path / 'm.db'}")
    with pytest.raises(ConfigError, match="unknown grid \\(valid: alpha, beta, loss, methods, roi"):
        load_grid("gamma", CONFIGS / "grid")
    bad = tmp_path / "short.yaml"
    bad.write_text("key: pretrain.method.model.beta\nvalues: [[0, 1], [0, 0, 0, 1]]\n")
    assert not ray.is_initialized()
    with pytest.raises(
        ConfigError, match="grid short, value 0,1: pretrain.method.model.beta="
    ) as info:
        run_sweep(cfg, load_grid(str(bad), CONFIGS / "grid"))
    assert "\n" not in str(info.value)
    negative = tmp_path / "negative.yaml"
    negative.write_text("key: pretrain.method.model.tau\nvalues: [0.2, -1]\n")
    with pytest.raises(ConfigError, match="grid negative, value -1: pretrain.method.model.tau=-1"):
        run_sweep(cfg, load_grid(str(negative), CONFIGS / "grid"))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("key: pretrain.method.model.gamma\nvalues: [1]\n")
    with pytest.raises(ConfigError, match="pretrain.method.model.gamma: unknown"):
        run_sweep(cfg, load_grid(str(unknown), CONFIGS / "grid"))
    assert not ray.is_initialized(), "bad grids are refused before Ray starts"


def test_every_paper_grid_builds_valid_trials(tmp_path):
    cfg = sweep_config(tmp_path, f"sqlite:///{tmp_path / 'm.db'}")
    expected = {"alpha": 4, "beta": 5, "roi": 5, "tau": 4, "loss": 3, "methods": 2}
    for name, count in expected.items():
        grid = load_grid(name, CONFIGS / "grid")
        trials = build_trials(cfg, grid)
        assert len(trials) == count and len({t.key for t in trials}) == count
    beta = build_trials(cfg, load_grid("beta", CONFIGS / "grid"))
    assert beta[1].cfg["pretrain"]["method"]["model"]["beta"] == [0.0, 0.0, 0.0, 1.0]
    assert beta[1].cfg["pretrain"]["method"]["model"]["alpha"] == [0.1, 0.4, 0.7, 1.0]
    loss = build_trials(cfg, load_grid("loss", CONFIGS / "grid"))
    assert [t.label for t in loss] == ["image-level", "patch-level", "both"]
    rows = [
        {"label": "a", "status": "done", "error": "", "detection/x/bbox/AP": 0.5},
        {"label": "b", "status": "done", "error": "", "detection/x/bbox/AP": 0.55},
    ]
    text = format_table(load_grid("tau", CONFIGS / "grid"), rows, ["detection/x/bbox/AP"])
    assert "| b | 55.0 (+5.0) | done |" in text


def test_the_methods_grid_trains_mocov2_like_the_model(tmp_path):
    from dupr.config import DUPRConfig, baseline_method

    cfg = sweep_config(tmp_path, f"sqlite:///{tmp_path / 'm.db'}")
    dupr, mocov2 = build_trials(cfg, load_grid("methods", CONFIGS / "grid"))
    assert dupr.cfg["pretrain"]["method"] == cfg["pretrain"]["method"]
    assert (dupr.cfg["pretrain"]["label"], mocov2.cfg["pretrain"]["label"]) == ("dupr", "mocov2")
    expected = baseline_method(DUPRConfig.from_dict(cfg["pretrain"]["method"]), "mocov2")
    assert DUPRConfig.from_dict(mocov2.cfg["pretrain"]["method"]) == expected
    assert dupr.cfg["seeds"] == mocov2.cfg["seeds"] == [0, 1, 2]
    bad = tmp_path / "bad.yaml"
    bad.write_text("key: method\nvalues: [dupr, simclr]\n")
    with pytest.raises(ConfigError, match="grid bad, value simclr: method='simclr'"):
        build_trials(cfg, load_grid(str(bad), CONFIGS / "grid"))
