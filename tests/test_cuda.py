"""The GPU paths: CUDA, bf16 autocast, channels_last, NCCL. Skipped where there is no GPU.

CI has no GPU, so these run when a GPU machine is at hand, together with the GPU step benchmark:
`bash benchmarks/gpu_checks.sh` (needs only torch, torchvision and pytest there). The CPU tests
cover the same code on gloo and float32 (test_distributed.py, test_train.py); what only a GPU
shows is what is checked here: that autocast and channels_last change the numbers no more than
bf16 rounding does, that a step captured as a CUDA graph trains like the eager one, that the
memory banks stay float32, that the GPU's attention kernels (flash, cuDNN's, memory-efficient)
give the patch loss of the matmul form, that the colour steps on the device give the CPU's
pixels, and that Shuffle BN and the gathered bank keys run on an NCCL process group. (NCCL gives
each rank its own GPU, so a one-GPU machine checks a world of one; the two-rank equalities are
checked on gloo.)
"""

import copy
import dataclasses
import inspect
import io

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from dupr.config import AugmentConfig, OptimConfig
from dupr.losses import BF16_LOGITS_BOUNDS, info_nce
from dupr.model import DUPR
from dupr.photometric import PhotometricDraw, apply_photometric
from dupr.train import TrainState, build_state, train_step
from helpers import random_batch, tiny_model_config

# The GPU machine's PyTorch may predate 2.13, which renamed DDP's broadcast_buffers
# (the platform pins a later release and passes forward_sync_buffers).
NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    else {"broadcast_buffers": False}
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CUDA = torch.device("cuda")
PAIRS, SIZE = 8, 64


def gpu_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    im_q, im_k, crop_q, crop_k = random_batch(PAIRS, SIZE, seed=seed)
    return {"view1": im_q, "view2": im_k, "crop1": crop_q, "crop2": crop_k}


def one_step(optim: OptimConfig, **model_overrides) -> tuple[dict[str, float], TrainState]:
    """One training step of the tiny model on the GPU, from fixed initial weights."""
    torch.manual_seed(0)
    model = DUPR(tiny_model_config(**model_overrides)).to(CUDA)
    if optim.channels_last:
        model = model.to(memory_format=torch.channels_last)
    state = build_state(model, optim, steps_per_epoch=10, device=CUDA)
    torch.manual_seed(1)  # the same patch-key samples in every variant
    metrics = train_step(state, gpu_batch(), optim, CUDA)
    return {k: float(v) for k, v in metrics.items()}, state


def test_bf16_channels_last_step_agrees_with_float32():
    base = dict(lr=0.03, batch_size=PAIRS, epochs=1)
    fp32, _ = one_step(OptimConfig(amp=False, channels_last=False, tf32=False, **base))
    bf16, state = one_step(OptimConfig(amp=True, amp_dtype="bfloat16", channels_last=True, **base))
    model = state.model
    assert not state.scaler.is_enabled()  # bf16 has float32's range: no loss scaling
    # bf16 keeps 8 bits of mantissa; the losses are computed in float32 from bf16 features.
    assert abs(bf16["loss"] - fp32["loss"]) <= 0.02 * abs(fp32["loss"]), (bf16, fp32)
    for name, bank in model.banks.items():
        assert bank.keys.dtype == torch.float32, name  # keys enqueued under autocast stay fp32
        assert torch.allclose(bank.keys.norm(dim=1), torch.ones(1, device=CUDA), atol=1e-3), name
        assert bank.ptr.item() > 0, name
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_float16_channels_last_step_uses_the_loss_scaler_and_agrees_with_float32():
    base = dict(lr=0.03, batch_size=PAIRS, epochs=1)
    fp32, _ = one_step(OptimConfig(amp=False, channels_last=False, tf32=False, **base))
    optim = OptimConfig(amp=True, amp_dtype="float16", channels_last=True, **base)
    metrics, state = one_step(optim)
    assert state.scaler.is_enabled() and state.scaler.get_scale() > 0
    # float16 keeps 11 bits of mantissa (bf16: 8); the losses are computed in float32.
    assert abs(metrics["loss"] - fp32["loss"]) <= 0.02 * abs(fp32["loss"]), (metrics, fp32)
    assert all(torch.isfinite(p).all() for p in state.model.parameters())


def test_batchnorm_runs_in_cudnn_under_float16_and_in_pytorchs_kernels_under_bfloat16():
    """Why gpu_step's float16 rows exist: PyTorch gives cuDNN's BatchNorm float16 inputs, not
    bfloat16 ones, and its own kernels took 10 of MoCo v2's 23.4 ms of GPU time per step in
    bfloat16 (benchmarks/RESULTS.md, run 4). A PyTorch release that changes this shows here."""
    from torch.profiler import ProfilerActivity, profile

    ran = {}
    for dtype in ("float16", "bfloat16"):
        optim = OptimConfig(
            lr=0.03, batch_size=PAIRS, epochs=1, amp=True, amp_dtype=dtype, channels_last=True
        )
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            one_step(optim)
        ran[dtype] = {e.key for e in prof.key_averages() if "batch_norm" in e.key}
    assert "aten::cudnn_batch_norm" in ran["float16"], ran
    assert "aten::native_batch_norm" not in ran["float16"], ran
    assert "aten::cudnn_batch_norm" not in ran["bfloat16"], ran


def test_patch_loss_options_on_the_gpu_agree_with_float32(monkeypatch):
    """Paper scale (6272 queries, K = 65536): the chunked matmul form in float32 (TF32 off) is
    the reference for bfloat16 logits and for the attention kernels (flash and cuDNN's for
    bf16, memory-efficient for fp32, which may use TF32); bounds as on the CPU
    (tests/test_losses.py)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    g = torch.Generator(device=CUDA).manual_seed(0)
    q0 = torch.nn.functional.normalize(torch.randn(6272, 128, device=CUDA, generator=g), dim=1)
    k_pos = torch.nn.functional.normalize(q0 + 0.5 * torch.randn_like(q0), dim=1)
    bank = torch.nn.functional.normalize(torch.randn(65536, 128, device=CUDA, generator=g), dim=1)
    weights = torch.rand(len(q0), device=CUDA, generator=g)

    def run(**options):
        q = q0.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):  # as in training; the loss opts out
            loss, correct = info_nce(q, k_pos, bank, 0.15, memory_mb=256, **options)
        (loss * weights).sum().backward()
        return loss.detach(), correct, q.grad

    loss32, correct32, grad32 = run()
    for kernel, logits_dtype in [
        ("matmul", torch.bfloat16),
        ("attention", None),
        ("attention", torch.bfloat16),
        ("cudnn_attention", torch.bfloat16),
    ]:
        loss, correct, grad = run(kernel=kernel, logits_dtype=logits_dtype)
        label = (kernel, logits_dtype)
        assert loss.dtype == torch.float32, label
        loss_diff = float(((loss - loss32).abs() / loss32).max())
        grad_diff = float((grad - grad32).abs().max() / grad32.abs().max())
        # The bf16-logits option's bounds; the attention kernel's TF32-off error is smaller.
        loss_bound, grad_bound = BF16_LOGITS_BOUNDS
        assert loss_diff <= loss_bound and grad_diff <= grad_bound, (label, loss_diff, grad_diff)
        step = len(correct32) // len(correct)  # 1, or the attention kernel's accuracy sample
        assert (correct != correct32[::step][: len(correct)]).float().mean() <= 0.01, label


def test_matmul_roi_align_on_the_gpu_equals_torchvisions(monkeypatch):
    """model.roi_align_kernel=matmul at conv4's paper size (64 maps of 1024 × 14 × 14,
    channels_last, S = 14): torchvision's values and gradients in float32 (TF32 off), and its
    values within bf16 rounding under autocast."""
    from torchvision.ops import roi_align

    from dupr.geometry import view_boxes
    from dupr.roi_align import roi_align_rows

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    g = torch.Generator(device=CUDA).manual_seed(0)
    feat = torch.randn(64, 1024, 14, 14, device=CUDA, generator=g)
    feat = feat.contiguous(memory_format=torch.channels_last)
    _, _, crop_q, crop_k = random_batch(64, 224)
    boxes = view_boxes(crop_q, crop_k, 224)[0].to(CUDA)
    rois = torch.cat([torch.arange(64.0, device=CUDA)[:, None], boxes], 1)
    feat_tv, feat_mm = feat.clone().requires_grad_(), feat.clone().requires_grad_()
    want = roi_align(feat_tv, rois, 14, 1 / 16, 2, False)
    got = roi_align_rows(feat_mm, boxes, 14, 1 / 16, 2).permute(0, 3, 1, 2)
    assert torch.allclose(got, want, atol=1e-5)
    upstream = torch.randn(want.shape, device=CUDA, generator=g)
    (want * upstream).sum().backward()
    (got * upstream).sum().backward()
    assert torch.allclose(feat_mm.grad, feat_tv.grad, atol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = roi_align_rows(feat.bfloat16(), boxes, 14, 1 / 16, 2).permute(0, 3, 1, 2)
    assert low.dtype == torch.bfloat16
    assert (low.float() - want).abs().max() <= 0.03 * want.abs().max()


@pytest.mark.slow  # compiles a ResNet-18's forward and backward: a minute or two
def test_compiled_backbones_give_eager_gradients(monkeypatch):
    """`compile_model(backbones=True)`, a gpu_step lever. On the CPU, inductor (torch 2.14.1)
    gave a compiled ResNet-18's convolution weights gradients 6-18 % away from float64, where
    eager float32 is within 6e-6 (aot_eager: exact), so no CPU test can vouch for it; here the
    same comparison on the GPU, float32 with TF32 off."""
    from dupr.backbone import ResNetBackbone

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    eager = ResNetBackbone("resnet18").to(CUDA)
    compiled, reference = copy.deepcopy(eager), copy.deepcopy(eager).double()
    compiled.compile()
    x = torch.randn(8, 3, 64, 64, device=CUDA)
    for model in (eager, compiled, reference):
        feats = model(x.to(next(model.parameters()).dtype), 3)
        g = torch.Generator(device=CUDA).manual_seed(5)
        upstream = [torch.randn(f.shape, device=CUDA, generator=g) for f in feats]
        sum((f * u.to(f.dtype)).sum() for f, u in zip(feats, upstream, strict=True)).backward()
    want = dict(reference.named_parameters())
    for model in (eager, compiled):
        for name, p in model.named_parameters():
            error = (p.grad.double() - want[name].grad).abs().max() / want[name].grad.abs().max()
            assert error <= 1e-3, (name, float(error), model is compiled)


def test_colour_steps_on_the_gpu_give_the_cpus_pixels(monkeypatch):
    """augment.photometric_on=device: the batched operations on CUDA (index copies, grouped
    convolutions, histograms) agree with the CPU on the main preset's choices."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # TF32 blurs: ~1e-3 off
    torch.manual_seed(0)
    draw = PhotometricDraw(AugmentConfig(preset="mocov2_randaugment"))
    rows = torch.stack([draw() for _ in range(64)])
    crops = torch.randint(0, 256, (64, 3, 96, 96), dtype=torch.uint8)
    crops[:, :, 20:60, 30:70] //= 3  # structure for the histograms and blurs to act on
    want = apply_photometric(crops, rows)
    got = apply_photometric(crops.to(CUDA), rows)
    assert got.device.type == "cuda" and got.dtype == torch.float32
    # Equalize and posterize round to 8 bits: a value on a rounding edge may move one level.
    diff = (got.cpu() - want).abs()
    assert diff.mean() < 1e-4 and (diff > 1e-3).float().mean() < 1e-3, diff.max()


@pytest.mark.slow  # compiles each colour operation for CUDA: a minute or so
def test_compiled_colour_steps_on_the_gpu_give_the_eager_pixels(monkeypatch):
    """optim.compile's colour steps on CUDA (inductor's kernels, each operation fused with its
    images' gather and scatter) against the eager ones on the same GPU, for a batch and for one
    image alone."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(1)
    draw = PhotometricDraw(AugmentConfig(preset="mocov2_randaugment"))
    rows = torch.stack([draw() for _ in range(64)])
    crops = torch.randint(0, 256, (64, 3, 96, 96), dtype=torch.uint8, device=CUDA)
    crops[:, :, 20:60, 30:70] //= 3
    for x, r in ((crops, rows), (crops[:1], rows[:1])):
        want = apply_photometric(x, r)
        diff = (apply_photometric(x, r, compiled=True) - want).abs()
        assert diff.mean() < 1e-4 and (diff > 1e-3).float().mean() < 1e-3, diff.max()


@pytest.mark.parametrize(
    "roi_kernel,loss_kernel",
    [("torchvision", "attention"), ("matmul", "attention"), ("matmul", "cudnn_attention")],
)
def test_a_training_step_never_waits_for_the_gpu(roi_kernel, loss_kernel):
    """The host runs ahead of the GPU through whole steps: CUDA's sync debug mode raises at any
    synchronisation (a blocking copy, a value read) in bf16 + channels_last steps with an
    attention kernel, bf16 logits and the colour steps on the device, from uint8 crops and
    colour rows in host memory as the loader delivers them. (One blocking copy per step made
    the host wait at every step for the GPU to finish the previous one; the CPU test in
    test_train.py checks the operators, this the CUDA calls.)"""
    optim = OptimConfig(
        lr=0.03, batch_size=PAIRS, epochs=1, amp=True, amp_dtype="bfloat16", channels_last=True
    )
    torch.manual_seed(0)
    cfg = tiny_model_config(
        patch_loss_kernel=loss_kernel, patch_logits="bfloat16", roi_align_kernel=roi_kernel
    )
    model = DUPR(cfg).to(CUDA).to(memory_format=torch.channels_last)
    state = build_state(model, optim, steps_per_epoch=10, device=CUDA)
    draw = PhotometricDraw(AugmentConfig(preset="mocov2_randaugment"))
    batch = gpu_batch()
    for v in ("1", "2"):
        batch[f"view{v}"] = torch.randint(0, 256, (PAIRS, 3, SIZE, SIZE), dtype=torch.uint8)
        batch[f"photometric{v}"] = torch.stack([draw() for _ in range(PAIRS)])
    train_step(state, batch, optim, CUDA)  # first step: cuDNN's autotuning, optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            metrics = train_step(state, batch, optim, CUDA)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(metrics["loss"]).item()


CAPTURED_FORMS = {
    "float32": {},
    "bf16 + attention + matmul RoIAlign": {
        "patch_loss_kernel": "attention",
        "patch_logits": "bfloat16",
        "roi_align_kernel": "matmul",
    },
    "bf16 + cuDNN attention + matmul RoIAlign": {
        "patch_loss_kernel": "cudnn_attention",
        "patch_logits": "bfloat16",
        "roi_align_kernel": "matmul",
    },
}


@pytest.mark.parametrize("form", list(CAPTURED_FORMS))
def test_a_captured_step_trains_like_the_eager_one(form):
    """optim.cuda_graph: three eager warm-up steps on a side stream, the capture, then replays,
    each on a new batch and with the learning rate the schedule gives that step. After 8 steps
    the weights' change and the memory banks equal the eager run's (a replay on stale inputs or
    a learning rate frozen at capture would be off by tens of percent), the per-step losses
    too; then replays run under sync debug mode: the host never waits for the GPU. cuDNN's
    deterministic algorithms, so that the two runs differ by the capture alone."""
    fast = form != "float32"
    optim = OptimConfig(
        lr=0.03,
        batch_size=PAIRS,
        epochs=1,
        warmup_epochs=0.5,
        amp=fast,
        amp_dtype="bfloat16",
        channels_last=fast,
        tf32=False,
    )
    kernels = CAPTURED_FORMS[form]
    runs = {}
    with torch.backends.cudnn.flags(enabled=True, deterministic=True):
        for graphed in (False, True):
            optim.cuda_graph = graphed
            torch.manual_seed(0)
            model = DUPR(tiny_model_config(**kernels)).to(CUDA)
            if fast:
                model = model.to(memory_format=torch.channels_last)
            start = {k: v.clone() for k, v in model.state_dict().items()}
            state = build_state(model, optim, steps_per_epoch=10, device=CUDA)
            torch.manual_seed(1)  # the same patch-key samples in both runs
            losses = [
                float(train_step(state, gpu_batch(seed=i), optim, CUDA)["loss"]) for i in range(8)
            ]
            runs[graphed] = state, start, losses
    (eager, start, eager_losses), (graph, _, graph_losses) = runs[False], runs[True]
    assert graph.graph is not None and graph.graph.replay is not None
    tolerance = 1e-2 if fast else 1e-3
    assert graph_losses == pytest.approx(eager_losses, rel=tolerance)
    a, b = eager.model.state_dict(), graph.model.state_dict()
    trained = [name for name, p in eager.model.named_parameters() if p.requires_grad]
    banks = [name for name in a if name.startswith("banks.") and name.endswith(".keys")]
    for names, origin in ((trained, start), (banks, None)):
        want = torch.cat([(a[n] - (origin[n] if origin else 0)).flatten().float() for n in names])
        got = torch.cat([(b[n] - (origin[n] if origin else 0)).flatten().float() for n in names])
        assert float((got - want).norm() / want.norm()) < tolerance, names[0]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(3):
            metrics = train_step(graph, gpu_batch(seed=10 + i), optim, CUDA)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(metrics["loss"]).item()


def test_a_checkpoint_saved_on_the_gpu_resumes_there(tmp_path):
    """A resumed worker loads its checkpoint onto its GPU (torch.load's map_location=device, in
    ray_pretrain and local_pretrain), generator states too, which PyTorch takes back as CPU
    tensors only; the CUDA generator (the patch-key draws) continues where it was saved, and the
    next step's loss is the uninterrupted run's."""
    optim = OptimConfig(lr=0.03, batch_size=PAIRS, epochs=1, amp=True, amp_dtype="bfloat16")
    _, state = one_step(optim)
    torch.save(state.state_dict(), tmp_path / "state.pt")
    saved_rng = torch.cuda.get_rng_state()
    after = float(train_step(state, gpu_batch(seed=1), optim, CUDA)["loss"])
    torch.manual_seed(5)  # a new process's own generators
    resumed = build_state(DUPR(tiny_model_config()).to(CUDA), optim, 10, CUDA)
    resumed.load_state_dict(
        torch.load(tmp_path / "state.pt", map_location=CUDA, weights_only=False)
    )
    assert torch.equal(torch.cuda.get_rng_state(), saved_rng)
    again = float(train_step(resumed, gpu_batch(seed=1), optim, CUDA)["loss"])
    assert again == pytest.approx(after, rel=1e-4)


def test_a_fine_tuning_resumes_on_the_gpu():
    """A detection fine-tuning on the GPU (bfloat16 autocast), stopped after iteration 2 and
    resumed from its saved state (CUDA generator included), logs what the uninterrupted run
    logs; up to the GPU's atomic-add order in RoIAlign's backward, not bit for bit."""
    from test_detectors import Rectangles, resnet18_state

    from dupr.evaluation.finetune import DetectionConfig, finetune

    cfg = dataclasses.replace(
        DetectionConfig.cpu_friendly("faster_rcnn_fpn", iterations=4), amp=True, min_size=(96, 128)
    )

    def run(resume=None):
        torch.manual_seed(0)
        model = cfg.build("resnet18", 2, resnet18_state())
        saved, logs = [], []

        def store(state):
            buffer = io.BytesIO()
            torch.save(state, buffer)
            saved.append(buffer.getvalue())

        finetune(
            model,
            Rectangles(3),
            cfg,
            CUDA,
            on_log=lambda i, m: logs.append((i, m)),
            log_every=1,
            resume=resume,
            on_checkpoint=store,
            checkpoint_every_s=0.0,
        )
        return saved, logs

    saved, logs = run()
    state = torch.load(io.BytesIO(saved[1]), map_location="cpu", weights_only=True)
    assert state["iteration"] == 2 and state["cuda_rng"] is not None
    _, resumed = run(state)
    assert [i for i, _ in resumed] == [3, 4]
    for (_, want), (_, got) in zip(logs[2:], resumed, strict=True):
        assert got == pytest.approx(want, rel=1e-3)


@pytest.mark.parametrize("bn_mode", ["shuffle", "sync"])
def test_ddp_step_on_an_nccl_process_group(bn_mode, tmp_path):
    """Shuffle BN's gather/broadcast and the bank's all-gather run on NCCL, and agree with the
    same step without a process group (a world of one shuffles within its own batch)."""
    optim = OptimConfig(lr=0.03, batch_size=PAIRS, epochs=1, amp=False, tf32=False)
    alone, _ = one_step(optim, bn_mode=bn_mode)

    dist.init_process_group(
        "nccl",
        init_method=f"file://{tmp_path}/store",
        rank=0,
        world_size=1,
    )
    try:
        torch.manual_seed(0)
        model = DUPR(tiny_model_config(bn_mode=bn_mode)).to(CUDA)
        ddp = DDP(model, device_ids=[0], **NO_BUFFER_SYNC)
        state = build_state(ddp, optim, steps_per_epoch=10, device=CUDA)
        torch.manual_seed(1)
        metrics = train_step(state, gpu_batch(), optim, CUDA)
        torch.cuda.synchronize()
    finally:
        dist.destroy_process_group()
    assert abs(float(metrics["loss"]) - alone["loss"]) <= 1e-4 * abs(alone["loss"])
    assert all(b.ptr.item() > 0 for b in model.banks.values())
