"""Training loop: schedule, exact resume from a checkpoint, and a short run whose loss goes down."""

import io
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dupr.config import DUPRConfig, OptimConfig
from dupr.data import ImageFolderDataset, bundled_image_folder
from dupr.data.two_views import build_loader
from dupr.local_pretrain import main as pretrain_main
from dupr.model import DUPR
from dupr.train import TrainState, build_state, compile_model, lr_factor, train, train_step
from dupr.views import TwoViews
from helpers import random_batch, tiny_model_config

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


def test_cosine_schedule_with_warmup():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(99, 100, 0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.99)))


def setup(cfg: DUPRConfig, images, seed=0) -> tuple[TrainState, torch.utils.data.DataLoader]:
    torch.manual_seed(seed)
    loader = build_loader(
        images, TwoViews(cfg.model.image_size, cfg.augment), cfg.optim.batch_size, seed=seed
    )
    state = build_state(DUPR(cfg.model), cfg.optim, len(loader), CPU)
    return state, loader


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.fixture(scope="module")
def images():
    return ImageFolderDataset(bundled_image_folder(24))


def test_resume_after_an_epoch_reaches_identical_weights(tiny_config, images):
    cfg = tiny_config  # 24 images, batch 8: 3 steps per epoch, 2 epochs
    straight, loader = setup(cfg, images)
    train(straight, loader, cfg.optim, CPU)

    saved = {}
    first, loader = setup(cfg, images)
    cfg.optim.epochs = 1
    train(
        first,
        loader,
        cfg.optim,
        CPU,
        on_epoch_end=lambda s: saved.update(ckpt=roundtrip(s.state_dict())),
    )
    cfg.optim.epochs = 2
    torch.manual_seed(999)  # a fresh process: different global RNG, fresh model
    resumed, loader = setup(cfg, images, seed=0)
    resumed.load_state_dict(saved["ckpt"])
    assert (resumed.epoch, resumed.step) == (1, 3)
    train(resumed, loader, cfg.optim, CPU)

    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and any(k.startswith("banks.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_checkpoint_without_a_loss_scaler_resumes_with_one(tiny_config, images):
    """Saved on a CPU (no scaler), resumed with float16 autocast on a GPU (a scaler): the
    scaler starts afresh, and every other part of the state is taken."""
    saved, _ = setup(tiny_config, images)
    saved.epoch, saved.step = 1, 3
    assert saved.state_dict()["scaler"] == {}
    resumed, _ = setup(tiny_config, images, seed=1)
    resumed.scaler = torch.amp.GradScaler("cpu", enabled=True)  # float16's scaler, on a CPU
    resumed.load_state_dict(roundtrip(saved.state_dict()))
    assert resumed.scaler.get_scale() == torch.amp.GradScaler("cpu").get_scale()
    assert (resumed.epoch, resumed.step) == (1, 3)


def test_resume_in_the_middle_of_an_epoch(tiny_config, images):
    cfg = tiny_config
    cfg.optim.epochs = 1
    straight, loader = setup(cfg, images)
    train(straight, loader, cfg.optim, CPU)

    part, loader = setup(cfg, images)
    batches = iter(loader)
    from dupr.train import train_step

    loader.sampler.set_epoch(0)
    train_step(part, next(batches), cfg.optim, CPU)  # one step, then "crash"
    saved = roundtrip(part.state_dict())
    resumed, loader = setup(cfg, images)
    resumed.load_state_dict(saved)
    train(resumed, loader, cfg.optim, CPU)
    assert resumed.step == straight.step == 3
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


@pytest.mark.slow  # compiling takes ~45 s on 2 cores with a cold cache
def test_compiled_model_trains_like_the_eager_one_with_the_same_checkpoint_keys(
    tiny_config, images
):
    """optim.compile: the heads and losses compiled in place (on the CPU here: inductor's C++).

    Three steps: the compiled kernels sum in another order, and 1e-3 bounds what that does to
    the weights and BN statistics after three SGD steps."""
    cfg = tiny_config
    cfg.optim.epochs = 1
    eager, loader = setup(cfg, images)
    train(eager, loader, cfg.optim, CPU)
    compiled, loader = setup(cfg, images)
    compile_model(compiled.model)
    assert compiled.model.info_nce is not DUPR.info_nce
    train(compiled, loader, cfg.optim, CPU)
    a, b = eager.model.state_dict(), compiled.model.state_dict()
    assert a.keys() == b.keys()  # checkpoints and converted weights do not change
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-3, rtol=1e-3), k


def test_the_cuda_graph_option_trains_like_the_eager_step_and_saves_the_same_checkpoint(
    tiny_config, images
):
    """optim.cuda_graph: the step runs on static inputs with its learning rate read from a
    tensor (`dupr.train.StepGraph`; on a GPU that step is captured once and replayed, checked
    in tests/test_cuda.py). With a warm-up and cosine schedule the learning rate changes from
    step to step; the weights, banks, logged metrics and checkpoint equal the eager run's (the lr
    tensor is float32, as fused SGD reads it: 1e-6)."""
    cfg = tiny_config
    cfg.optim.warmup_epochs = 0.5
    logs: dict[str, list] = {"eager": [], "graph": []}
    states = {}
    for mode in logs:
        cfg.optim.cuda_graph = mode == "graph"
        states[mode], loader = setup(cfg, images)
        train(
            states[mode],
            loader,
            cfg.optim,
            CPU,
            log_every=1,
            on_log=lambda step, m, mode=mode: logs[mode].append(m),
        )
    eager, graph = states["eager"], states["graph"]
    assert graph.graph is not None and eager.graph is None
    assert len(logs["graph"]) == len(logs["eager"]) == 6
    lrs = [m["lr"] for m in logs["eager"]]
    assert len(set(lrs)) == 4, lrs  # warm-up, then cosine: a stuck learning rate would show
    for a, b in zip(logs["eager"], logs["graph"], strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if key not in ("images_per_s", "data_wait_s"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6, nan_ok=True), key
    saved_eager, saved_graph = eager.state_dict(), graph.state_dict()
    for group in saved_graph["optimizer"]["param_groups"]:
        assert isinstance(group["lr"], float)  # checkpoints keep the schedule's float
    assert saved_graph["optimizer"]["param_groups"] == saved_eager["optimizer"]["param_groups"]
    for k, v in saved_eager["model"].items():
        assert torch.allclose(v.float(), saved_graph["model"][k].float(), atol=1e-6), k
    # A checkpoint of the graphed run resumes in an eager process, and the other way round.
    cfg.optim.cuda_graph = False
    resumed, _ = setup(cfg, images)
    resumed.load_state_dict(roundtrip(saved_graph))
    assert resumed.step == graph.step


class HostWaits(TorchDispatchMode):
    """Records the operators that, on a GPU, make the host wait for the device: a tensor made
    from host values (a blocking host-to-device copy), reading a value, or an output whose size
    depends on the values (nonzero, boolean-mask indexing)."""

    WAITING = ("aten.lift_fresh", "aten._local_scalar_dense", "aten.nonzero", "aten.masked_select")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        bool_index = name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for i in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else [])
        )
        if name in self.WAITING or bool_index:
            self.seen.append(f"{func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kernel, roi_kernel", [("matmul", "torchvision"), ("attention", "matmul")])
def test_a_training_step_never_makes_the_host_wait_for_the_device(kernel, roi_kernel):
    """On a GPU the host runs ahead of the kernels it launches unless something reads a device
    value or copies host values to the device; one such copy per step made the host wait at
    every step for the GPU to finish the previous one. Checked here on the CPU by the operators a step
    dispatches (benchmarks/gpu_profile.py counts the waits on a GPU), for both patch-loss
    kernels and both RoIAlign kernels, the chunked log-sum-exp, pairs without overlap and a
    wrapping memory bank."""
    cfg = DUPRConfig(
        model=tiny_model_config(
            patch_loss_kernel=kernel,
            roi_align_kernel=roi_kernel,
            loss_memory_mb=0.01,
            queue_size=12,  # wraps within the steps checked
        ),
        optim=OptimConfig(lr=0.03, batch_size=4, epochs=1, amp=False),
    )
    im_q, im_k, crop_q, crop_k = random_batch(4, cfg.model.image_size)
    crop_k[0] += 500.0  # one pair without overlap
    batch = {"view1": im_q, "view2": im_k, "crop1": crop_q, "crop2": crop_k}
    state = build_state(DUPR(cfg.model), cfg.optim, 10, CPU)
    train_step(state, batch, cfg.optim, CPU)  # first-step allocations (momentum buffers)
    with HostWaits() as waits:
        for _ in range(3):
            metrics = train_step(state, batch, cfg.optim, CPU)
    assert waits.seen == []
    assert math.isfinite(float(metrics["loss"]))


def test_checkpoint_lacking_keys_is_a_clear_error(tiny_config, images):
    state, _ = setup(tiny_config, images)
    with pytest.raises(KeyError, match="checkpoint lacks optimizer, rng"):
        state.load_state_dict(
            {k: v for k, v in state.state_dict().items() if k not in ("optimizer", "rng")}
        )


def test_non_finite_loss_stops_before_the_checkpoint(tiny_config, images):
    cfg = tiny_config
    cfg.optim.lr = 1e30
    state, loader = setup(cfg, images)
    saved = []
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        train(state, loader, cfg.optim, CPU, log_every=1, on_epoch_end=saved.append)
    assert not saved


def test_pretrain_cli_rejects_bad_input_in_one_line(capsys, tmp_path):
    assert pretrain_main(["--method", "nope", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: preset='nope'") and "\n" not in err
    assert pretrain_main(["--epochs", "0", "--output-dir", str(tmp_path)]) == 2
    assert "optim.epochs=0" in capsys.readouterr().err
    assert (
        pretrain_main(["--data", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "out")])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --data:") and "missing" in err and "\n" not in err
    assert not (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "out").exists()


def test_pretrain_cli_resumes_from_its_output_dir(capsys, monkeypatch, tmp_path):
    """`python -m dupr.local_pretrain` stopped after its first epoch's checkpoint, then started
    again with the same command, resumes there and ends with the weights of one uninterrupted
    run."""
    import dupr.local_pretrain as script

    write = script.write_atomically

    def write_then_crash(*args, **kwargs):
        write(*args, **kwargs)
        monkeypatch.setattr(script, "write_atomically", write)  # once
        raise RuntimeError("crash after the first checkpoint")

    data = ["--data", str(bundled_image_folder(16)), "--batch-size", "8", "--workers", "0"]
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    command = [*data, "--epochs", "2", "--output-dir", str(resumed)]
    monkeypatch.setattr(script, "write_atomically", write_then_crash)
    with pytest.raises(RuntimeError, match="crash after"):
        pretrain_main(command)
    assert pretrain_main(command) == 0
    assert "2 epochs, 4 steps" in capsys.readouterr().out
    assert pretrain_main([*data, "--epochs", "2", "--output-dir", str(straight)]) == 0
    logged = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").open()]
    assert logged == sorted(set(logged)) and logged[-1] == 4  # the second run went on at step 3
    a, b = (
        torch.load(d / "checkpoint.pt", weights_only=False)["model"] for d in (resumed, straight)
    )
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_undecodable_files_are_counted_in_the_logged_metrics(tiny_config, tmp_path):
    """A file that fails to decode is replaced by the next image and counted: `skipped_files`
    in the metrics of the window that met it (README, Data), once per epoch per file."""
    folder = shutil.copytree(bundled_image_folder(22), tmp_path / "images")
    photo = sorted((folder / "astronaut").iterdir())[0].read_bytes()
    (folder / "a-broken.jpg").write_bytes(b"not a jpeg")
    (folder / "astronaut" / "truncated.jpg").write_bytes(photo[:200])
    images = ImageFolderDataset(folder)
    assert len(images) == 24  # 22 photos, 2 broken: 3 steps of 8
    logged = []
    state, loader = setup(tiny_config, images)
    train(state, loader, tiny_config.optim, CPU, log_every=1, on_log=lambda _, m: logged.append(m))
    assert len(logged) == 6 and all(math.isfinite(m["loss"]) for m in logged)
    per_epoch = [sum(m["skipped_files"] for m in logged[i : i + 3]) for i in (0, 3)]
    assert per_epoch == [2, 2]


def test_the_readmes_library_example_runs_as_written(tmp_path, monkeypatch, capsys):
    """`## Using the method as a library`, executed: only its size is the test's (the cpu_demo
    preset for one epoch over 64 of the bundled images: two steps); the checkpoint it saves
    loads into a fresh state."""
    import dupr.config
    import dupr.data

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Using the method as a library") :]
    code = section.split("```python\n", 1)[1].split("\n```", 1)[0]

    demo = dupr.config.preset("cpu_demo")
    demo = replace(demo, optim=replace(demo.optim, epochs=1, warmup_epochs=0.0))
    monkeypatch.setattr(dupr.config, "preset", lambda name: demo)
    monkeypatch.setattr(dupr.data, "bundled_image_folder", lambda: bundled_image_folder(64))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})

    step, loss = capsys.readouterr().out.split()[-2:]  # on_log's `print(step, m["loss"])`
    assert int(step) == 2 and math.isfinite(float(loss))
    fresh = build_state(DUPR(demo.model), demo.optim, 2, CPU)
    fresh.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=False))
    assert fresh.step == 2
