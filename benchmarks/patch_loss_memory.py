"""Peak memory of the patch-level InfoNCE loss: chunked log-sum-exp against the direct form.

Why: at paper scale the patch queries of one GPU (32 images x 196 conv4 cells = 6272) against
K = 65536 bank keys make a 1.6 GB float32 logit matrix, and the direct form holds several such
matrices at once during forward + backward. `dupr.losses.ChunkedLogSumExp` exists to bound that
by a memory budget without changing the result. This script checks both claims in one run:
chunked peak <= 25% of the direct peak, and loss / gradient equal to the direct form within 1e-5.
The speed options of the patch loss run as rows too, judged by the same peak target and the
bounds their tests use (`dupr.losses.BF16_LOGITS_BOUNDS`): the fused attention kernel
(`patch_loss_kernel=attention`), bfloat16 logits on the first budget (`patch_logits=bfloat16`;
by default the model's `loss_memory_mb`), and both together.

Each variant runs in a fresh subprocess, so that one variant's freed memory or allocator cache
cannot hide or inflate another's peak. On CUDA the peak is `max_memory_allocated` above the
memory held after the inputs were allocated; on CPU (no allocator peak counter) it is the peak
resident set size (VmHWM, reset through /proc/self/clear_refs) above the RSS after the inputs,
with a fixed glibc mmap threshold so freed buffers leave the RSS; the exact allocator peak from
the torch profiler is reported next to it.

    python benchmarks/patch_loss_memory.py                 # paper scale, ~2.5 min on 2 cores
    python benchmarks/patch_loss_memory.py --quick         # smoke run: 1/8 of the queries, 1/4 of the keys
    python benchmarks/patch_loss_memory.py --record benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from _common import fill_sizes, machine_lines, record, resolve_device

from dupr.config import ModelConfig
from dupr.io import markdown_table
from dupr.losses import BF16_LOGITS_BOUNDS, info_nce, logsumexp_chunk
from dupr_platform.smoke import proc_status_bytes, reset_peak_rss

TARGET_RATIO = 0.25  # chunked peak must be at most this fraction of the direct peak
TOLERANCE = 1e-5  # relative loss difference and normalised max gradient difference
# name (its budget filled in) -> (kernel, logits dtype name or None); each runs on the first of
# --budgets (the attention kernel uses it only for its accuracy sample).
OPTIONS: dict[str, tuple[str, str | None]] = {
    "attention kernel": ("attention", None),
    "chunked {mb:g} MB, bf16 logits": ("matmul", "bfloat16"),
    "attention + bf16": ("attention", "bfloat16"),
}
FLOAT32_BYTES = 4
DEFAULT_MB = ModelConfig.loss_memory_mb
DEFAULTS = {"queries": 6272, "keys": 65536, "repeats": 3, "budgets": f"{DEFAULT_MB:g},64"}
# An eighth of the queries and a quarter of the keys, the budgets scaled with the queries (so
# each chunk holds as many keys as at full size): bfloat16 matmuls are slow on CPUs without
# bf16 instructions, and the rehearsal (tests/test_gpu_checks.py) runs this on two such cores.
QUICK = {"queries": 784, "keys": 16384, "repeats": 1, "budgets": f"{DEFAULT_MB / 8:g},8"}


# --------------------------------------------------------------------------- worker (subprocess)


def make_inputs(
    n: int, k: int, d: int, seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L2-normalised random q, k_pos (n, d) and bank (K, d); made on the CPU so every device and
    every subprocess sees bit-identical inputs."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n, d, generator=g), dim=1)
    k_pos = F.normalize(torch.randn(n, d, generator=g), dim=1)
    bank = F.normalize(torch.randn(k, d, generator=g), dim=1)
    return q.to(device).requires_grad_(True), k_pos.to(device), bank.to(device)


def _step(
    q: torch.Tensor,
    k_pos: torch.Tensor,
    bank: torch.Tensor,
    tau: float,
    memory_mb: float,
    kernel: str = "matmul",
    logits: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward + backward, as the training step does it; returns (mean loss, per-query)."""
    q.grad = None
    logits_dtype = getattr(torch, logits) if logits else None
    loss, _ = info_nce(
        q, k_pos, bank, tau=tau, memory_mb=memory_mb, logits_dtype=logits_dtype, kernel=kernel
    )
    total = loss.mean()
    total.backward()
    return total.detach(), loss.detach()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _profiled_alloc_peak(step: Callable[[], object]) -> int | None:
    """Peak of live CPU allocator bytes during `step`, from the profiler's memory events.

    RSS also counts what malloc keeps cached after a free, so it can overstate the peak; this
    second number is the exact allocator peak. It reads `kineto_results`, which is not a
    documented API, hence the fallback to None.
    """
    try:
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        ) as prof:
            step()
        events = [
            (e.start_ns(), e.nbytes())
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]"
        ]
    except Exception:  # the private attribute moved or the profiler is unavailable
        return None
    live = peak = 0
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return peak


def worker(spec: dict) -> None:
    """Run one variant and save its peak memory, times, loss and gradient to `spec['out']`."""
    device = torch.device(spec["device"])
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # a bare "cuda" (no index) is the current device already
    tau, memory_mb = spec["tau"], spec["memory_mb"]
    options = {"kernel": spec["kernel"], "logits": spec["logits"]}
    q, k_pos, bank = make_inputs(spec["n"], spec["k"], spec["d"], spec["seed"], device)

    # Warm-up on tiny inputs through both code paths: loads BLAS kernels, thread pools and the
    # cuBLAS workspace now, so they are not charged to the variant's peak.
    wq, wk, wb = make_inputs(64, 1024, spec["d"], spec["seed"] + 1, device)
    _step(wq, wk, wb, tau, math.inf, **options)
    _step(wq, wk, wb, tau, 0.05, **options)
    del wq, wk, wb
    gc.collect()
    _sync(device)

    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        hwm_reset = True
    else:
        base = proc_status_bytes("VmRSS")
        hwm_reset = reset_peak_rss()

    times = []
    for _ in range(spec["repeats"]):
        _sync(device)
        start = time.perf_counter()
        total, per_query = _step(q, k_pos, bank, tau, memory_mb, **options)
        _sync(device)
        times.append(time.perf_counter() - start)

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
        alloc_peak: int | None = peak
    else:
        peak = proc_status_bytes("VmHWM") - base
        alloc_peak = _profiled_alloc_peak(lambda: _step(q, k_pos, bank, tau, memory_mb, **options))
    torch.save(
        {
            "peak_bytes": peak,
            "alloc_peak_bytes": -1 if alloc_peak is None else alloc_peak,
            "base_bytes": base,
            "hwm_reset": hwm_reset,
            "times": times,
            "loss": total.cpu(),
            "per_query": per_query.cpu(),
            "grad": cast(torch.Tensor, q.grad).detach().cpu(),
        },
        spec["out"],
    )


# --------------------------------------------------------------------------- driver


def run_variant(spec: dict) -> dict:
    """Run `worker(spec)` in a fresh interpreter and load what it saved."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    # The profiler prints start/stop lines on stderr; show them only when the worker fails.
    # A fixed glibc mmap threshold returns every freed buffer >= 1 MiB to the OS at once, so
    # RSS tracks live tensors as CUDA's max_memory_allocated does. With glibc's default dynamic
    # threshold, freed blocks of up to 32 MiB stay cached in the heap and the peak RSS of small
    # budgets varied from run to run (136 to 291 MiB for a 96 MiB allocator peak).
    env = {**os.environ}
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**20))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"worker for {spec['name']} failed (exit {proc.returncode})")
    return torch.load(spec["out"], weights_only=True)


def alloc_s_or_peak(result: dict) -> float:
    """MiB of the allocator peak where measured, else of the peak."""
    alloc = result["alloc_peak_bytes"]
    return (alloc if alloc >= 0 else result["peak_bytes"]) / 2**20


def mem_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, to refuse runs that would swap or get OOM-killed."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--queries", type=int, help="patch queries n (6272 = 32 images x 196 cells)")
    p.add_argument("--keys", type=int, help="bank size K (65536)")
    p.add_argument("--dim", type=int, default=128, help="embedding dimension d")
    p.add_argument("--tau", type=float, default=0.2)
    p.add_argument(
        "--budgets",
        help="comma-separated memory_mb budgets for the chunked variants; the speed options run "
        f"on the first (default {DEFAULT_MB:g},64: the model's loss_memory_mb first)",
    )
    p.add_argument(
        "--no-options", action="store_true", help="without the rows of the speed options"
    )
    p.add_argument("--repeats", type=int, help="timed forward+backward per variant (3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: n={QUICK['queries']}, K={QUICK['keys']}, budgets {QUICK['budgets']}, "
        "1 repeat (each unless given)",
    )
    p.add_argument("--record", metavar="FILE", help="append the table to this Markdown file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    fill_sizes(args, args.quick, DEFAULTS, QUICK)
    try:
        args.budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError:
        p.error(f"--budgets: {args.budgets!r} is not a comma-separated list of numbers")
    if not args.budgets or min(args.budgets) <= 0:
        p.error(f"--budgets: give at least one budget, each above 0 MB (got {args.budgets})")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return

    device = resolve_device(args.device)
    n, k, d = args.queries, args.keys, args.dim
    budgets: list[float] = args.budgets
    logit_bytes = n * k * FLOAT32_BYTES
    machine = machine_lines(str(device))
    print("\n".join(machine))
    print(
        f"patch loss: n={n} queries x K={k} keys x d={d}, tau={args.tau}, "
        f"logit matrix {logit_bytes / 2**20:.0f} MiB, {args.repeats} timed repeat(s) per variant"
    )

    # The direct form holds roughly four logit-sized buffers at its peak.
    available = mem_available_bytes() if device.type == "cpu" else None
    if available is not None and 4 * logit_bytes > 0.8 * available:
        raise SystemExit(
            f"the direct variant needs about {4 * logit_bytes / 2**30:.1f} GiB but only "
            f"{available / 2**30:.1f} GiB is available; use smaller --queries/--keys"
        )

    variants: dict[str, tuple[float, str, str | None]] = {"direct": (math.inf, "matmul", None)}
    variants |= {f"chunked {b:g} MB": (b, "matmul", None) for b in budgets}
    options = {
        name.format(mb=budgets[0]): (budgets[0], kernel, logits)
        for name, (kernel, logits) in ({} if args.no_options else OPTIONS).items()
    }
    variants |= options
    results = {}
    with tempfile.TemporaryDirectory(prefix="dupr-bench-") as tmp:
        for i, (name, (memory_mb, kernel, logits)) in enumerate(variants.items()):
            print(f"running {name} ...", flush=True)
            spec = {
                "name": name,
                "n": n,
                "k": k,
                "d": d,
                "tau": args.tau,
                "seed": args.seed,
                "memory_mb": memory_mb,
                "kernel": kernel,
                "logits": logits,
                "device": str(device),
                "repeats": args.repeats,
                "out": str(Path(tmp) / f"variant{i}.pt"),
            }
            results[name] = run_variant(spec)

    ref = results["direct"]
    ref_loss = ref["loss"].double()
    ref_grad = ref["grad"].double()
    ref_per_query = ref["per_query"].double()
    grad_scale = ref_grad.abs().max().item()
    rows = []
    verdicts = []
    for name, (memory_mb, kernel, _) in variants.items():
        r = results[name]
        peak_mib = r["peak_bytes"] / 2**20
        ratio = r["peak_bytes"] / ref["peak_bytes"]
        wall = statistics.median(r["times"])
        loss_rel = abs(r["loss"].double() - ref_loss).item() / abs(ref_loss).item()
        pq_rel = ((r["per_query"].double() - ref_per_query).abs() / ref_per_query.abs()).max()
        grad_rel = (r["grad"].double() - ref_grad).abs().max().item() / grad_scale
        chunk = logsumexp_chunk(n, k, memory_mb)  # None: the direct form
        alloc = r["alloc_peak_bytes"]
        alloc_s = "-" if alloc < 0 else f"{alloc / 2**20:.0f}"
        if name == "direct":
            budget, chunk_s, per_budget, target, verdict = "inf", "-", "-", "baseline", "baseline"
        elif name in options:
            budget = f"{memory_mb:g}"
            if kernel == "attention":
                chunk_s = "fused kernel"
            else:
                chunk_s = "direct path" if chunk is None else f"{chunk} x {math.ceil(k / chunk)}"
            per_budget = "-" if math.isinf(memory_mb) else f"{alloc_s_or_peak(r) / memory_mb:.2f}"
            loss_tol, grad_tol = BF16_LOGITS_BOUNDS
            target = f"<= {TARGET_RATIO:.0%}, per-query <= {loss_tol:g}, grad <= {grad_tol:g}"
            ok = ratio <= TARGET_RATIO and pq_rel.item() <= loss_tol and grad_rel <= grad_tol
            verdict = "PASS" if ok else "FAIL"
            verdicts.append(verdict)
        else:
            budget = f"{memory_mb:g}"
            per_budget = f"{alloc_s_or_peak(r) / memory_mb:.2f}"
            target = f"<= {TARGET_RATIO:.0%}, diffs <= {TOLERANCE:g}"
            chunk_s = "direct path" if chunk is None else f"{chunk} x {math.ceil(k / chunk)}"
            if logit_bytes <= memory_mb * 2**20:  # the target is for budgets below one matrix
                verdict = "n/a (budget >= logits)"
            else:
                ok = ratio <= TARGET_RATIO and loss_rel <= TOLERANCE and grad_rel <= TOLERANCE
                verdict = "PASS" if ok else "FAIL"
            verdicts.append(verdict)
        rows.append(
            [
                name,
                budget,
                chunk_s,
                f"{peak_mib:.0f}",
                alloc_s,
                f"{ratio:.1%}",
                per_budget,
                f"{wall:.2f}",
                f"{loss_rel:.1e}",
                f"{pq_rel.item():.1e}",
                f"{grad_rel:.1e}",
                target,
                verdict,
            ]
        )

    header = [
        "variant",
        "memory_mb",
        "chunk keys x chunks",
        "peak MiB",
        "allocator peak MiB",
        "peak / direct",
        "allocator peak / budget",
        "wall s (median)",
        "loss rel diff",
        "per-query max rel diff",
        "grad max diff / max grad",
        "target",
        "result",
    ]
    table = markdown_table(rows, header, pad=True)
    if device.type == "cuda":
        how = "peak = torch.cuda.max_memory_allocated above the memory held after the inputs"
    else:
        resets = "reset" if all(r["hwm_reset"] for r in results.values()) else "NOT reset"
        how = (
            "peak = peak RSS (VmHWM, " + resets + " after warm-up) minus RSS after the inputs, "
            "each variant in a fresh subprocess with MALLOC_MMAP_THRESHOLD_="
            + os.environ.get("MALLOC_MMAP_THRESHOLD_", str(2**20))
        )
    notes = [
        f"inputs: n={n}, K={k}, d={d}, tau={args.tau}, seed={args.seed}, L2-normalised; "
        f"direct logit matrix {logit_bytes / 2**20:.0f} MiB float32",
        how,
        "allocator peak = live allocator bytes at their peak (CPU: torch profiler memory events "
        "of one extra step; CUDA: same as peak); RSS also keeps what malloc caches after a free",
        f"wall = median of {args.repeats} forward+backward of info_nce(...).mean()",
        "diffs are against the direct variant; grad diff = max |g - g_direct| / max |g_direct|",
        "speed options (rows after the chunked budgets): attention = the fused attention kernel "
        "(patch_loss_kernel=attention), bf16 = bfloat16 matmul inputs with float32 accumulation "
        "(patch_logits=bfloat16)",
    ]
    body = table + "\n\n" + "\n".join(f"- {line}" for line in notes) + "\n"
    print()
    print(body)
    judged = [v for v in verdicts if not v.startswith("n/a")]
    if not judged:
        overall = "n/a (every budget >= the logit matrix: no chunked variant ran)"
    else:
        overall = "PASS" if all(v == "PASS" for v in judged) else "FAIL"
    print(f"overall: {overall}")
    if args.record:
        title = f"patch_loss_memory ({'quick' if args.quick else 'default'}, {device})"
        record(args.record, title, machine, body + f"\noverall: **{overall}**\n")


if __name__ == "__main__":
    main()
