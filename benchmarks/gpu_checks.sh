#!/usr/bin/env bash
# Everything that needs a GPU, in one command (issue 14): the CUDA tests, then the benchmarks,
# each recorded into the results file and copied to $OUT after each step when $OUT is set (so a
# remote run brings back whatever finished). Needs torch, torchvision, pytest, Pillow and pyarrow
# there; not the project's virtualenv, and Ray, MLflow and the rest of the platform's stack only
# for the named steps `gpu_input Ray` and `platform smoke` (benchmarks/pack_gpu_site.sh packs
# them to take along). Each step has its own time limit, so one that
# hangs cannot take the others' time; the limits add up to under 8 min (--quick: four times that).
#
#     bash benchmarks/gpu_checks.sh            # on the GPU machine
#     bash benchmarks/gpu_checks.sh --quick    # rehearsal on any machine: small sizes, CPU
#
# RESULTS=file chooses the results file (default benchmarks/RESULTS.md); STEPS="name,name"
# runs only those steps (a rerun of the ones that failed), e.g. STEPS="CUDA tests,gpu_memory";
# a name that no step has stops the script (exit 2) before anything runs.
set -uo pipefail
cd "$(dirname "$0")/.."
# The project's packages without installing them: dupr/ from the root, dupr_platform's
# stdlib-only helpers from platform/, the tests' helpers from tests/.
export PYTHONPATH="$PWD:$PWD/platform:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1  # the CUDA tests need no plugin; the machine's may not load
RESULTS=${RESULTS:-benchmarks/RESULTS.md}
QUICK=()
SCALE=1  # the rehearsal's small sizes still take a CPU longer than the GPU its full sizes
if [ "${1:-}" = "--quick" ]; then
  QUICK=(--quick --device cpu) SCALE=4
  # The rehearsal checks the scripts, not the compiler: torch.compile runs the functions as
  # they are. Compiling on a small CPU took minutes of the rehearsal (inductor's C++ backend,
  # not the GPU's Triton); compiled training is checked by tests/test_train.py
  # and test_photometric.py, and on the GPU by `CUDA tests compiled`.
  export TORCHDYNAMO_DISABLE=1
fi

status=0
failed=()
listing=1  # the first pass over the steps only collects their names (to check STEPS)
names=()
wanted=()  # STEPS, split at its commas, spaces around them trimmed
if [ -n "${STEPS:-}" ]; then
  IFS=',' read -ra parts <<<"$STEPS"
  for part in "${parts[@]}"; do
    part=${part#"${part%%[! ]*}"} part=${part%"${part##*[! ]}"}
    [ -n "$part" ] && wanted+=("$part")
  done
fi
contains() {  # contains VALUE ITEM...: whether VALUE is one of the items
  local value=$1 item
  shift
  for item; do [ "$item" = "$value" ] && return 0; done
  return 1
}
selected() {  # selected NAME: whether STEPS names it (every step when STEPS is empty)
  [ ${#wanted[@]} -eq 0 ] || contains "$1" "${wanted[@]}"
}
step() {  # step NAME SECONDS COMMAND...: run with a time limit, note a failure, keep going
  local name=$1 limit=$(($2 * SCALE)) start=$SECONDS
  shift 2
  if [ -n "$listing" ]; then names+=("$name"); return; fi
  selected "$name" || return 0
  echo "=== $name (limit ${limit} s)"
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
  if [ "$rc" -ne 0 ]; then status=1; failed+=("$name (exit $rc)"); fi
  if [ -n "${OUT:-}" ]; then cp "$RESULTS" "$OUT/" 2>/dev/null || true; fi
}
run_steps() {  # every step, in the order they run
  # --noconftest: the suite's conftest starts S3/MLflow services this machine need not have.
  # bf16 logits alone, the attention kernel alone, compile of the default form and CUDA graphs of
  # the heads alone were measured in runs 1-4 (benchmarks/RESULTS.md) and are left out;
  # `gpu_step.py --variants` still runs them. gpu_step adds each DUPR row's MoCo v2 twin (the
  # same CUDA graph and compiled backbones) by itself.
  BEST="dupr + attention + bf16 + matmul RoIAlign"
  CUDNN="dupr + cuDNN attention + bf16 + matmul RoIAlign"
  LEVERS="mocov2,dupr,dupr + attention + bf16,$BEST,$CUDNN,$BEST + CUDA graph,$CUDNN + CUDA graph"
  COMPILED="mocov2,dupr,$BEST + compile + CUDA graph,mocov2 + compile all + CUDA graph"
  COMPILED+=",$BEST + compile all + CUDA graph,$CUDNN + compile all + CUDA graph,$BEST + compile"
  # Limits from four runs on an H200 (2026-12-04): CUDA tests 33 s (cold, 6 of today's 16),
  # gpu_step 52 s (5 variants at batch 64; 7 now, and MoCo v2's graph twin), gpu_profile 42 s
  # (3 variants; 4 now), gpu_memory 61 s (run 2; its search is bounded now), patch_loss_memory
  # 31 s, gpu_input 89 s for its torch rows (its Ray rows, about 100 s more, are a named step);
  # 7 min 55 s in all. In the order of what the open targets need most: a step that runs out of
  # time costs only itself. The compiled variants' warm-up took 38-135 s (more
  # with the backbones): they run only when STEPS names them, on a loan of their own.
  CUDA_TESTS=("$PY" -m pytest --noconftest -p no:cacheprovider -q tests/test_cuda.py)
  step "CUDA tests" 70 "${CUDA_TESTS[@]}" -m "gpu and not slow"
  step "gpu_step" 90 "$PY" benchmarks/gpu_step.py --variants "$LEVERS" --budget-s $((72 * SCALE)) \
    --record "$RESULTS" "${QUICK[@]}"
  # Twice the batch, with and without the graph: how far launches bound the step at batch 64.
  step "gpu_step batch 128" 40 "$PY" benchmarks/gpu_step.py --batch 128 --steps 20 \
    --variants "mocov2,dupr,$BEST + CUDA graph" --budget-s $((32 * SCALE)) --record "$RESULTS" \
    "${QUICK[@]}"
  # Where the GPU time of DUPR's two fastest eager forms goes (run 4 profiled the others).
  step "gpu_profile" 65 "$PY" benchmarks/gpu_profile.py --variants "mocov2,dupr,$BEST,$CUDNN" \
    --record "$RESULTS" "${QUICK[@]}"
  step "gpu_input" 110 "$PY" benchmarks/gpu_input.py --loaders torch --budget-s $((97 * SCALE)) \
    --record "$RESULTS" "${QUICK[@]}"
  step "patch_loss_memory" 40 "$PY" benchmarks/patch_loss_memory.py --record "$RESULTS" "${QUICK[@]}"
  step "gpu_memory" 60 "$PY" benchmarks/gpu_memory.py --budget-s 15 --record "$RESULTS" "${QUICK[@]}"
  if [ -n "$listing" ] || [ ${#wanted[@]} -gt 0 ] || [ "$SCALE" -gt 1 ]; then  # named, or the rehearsal
    # The rehearsal leaves out the compiled backbones: minutes of compiling on a small CPU, for
    # gradients that inductor gets wrong there (tests/test_cuda.py checks them on the GPU).
    if [ "$SCALE" -gt 1 ]; then COMPILED="mocov2,dupr,$BEST + compile + CUDA graph"; fi
    step "CUDA tests compiled" 150 "${CUDA_TESTS[@]}" -m "gpu and slow"
    step "gpu_step compiled" 240 "$PY" benchmarks/gpu_step.py --variants "$COMPILED" \
      --budget-s $((220 * SCALE)) --record "$RESULTS" "${QUICK[@]}"
    # float16 autocast (with the loss scaler) for both methods: cuDNN's BatchNorm in place of
    # PyTorch's own kernels, which take bfloat16 (10 of MoCo v2's 23.4 ms of GPU time in run 4);
    # the profile shows which BatchNorm ran. MoCo v2's float16 twin joins gpu_step by itself.
    step "gpu_step float16" 75 "$PY" benchmarks/gpu_step.py \
      --variants "mocov2,dupr,$BEST,$BEST + float16" --budget-s $((60 * SCALE)) \
      --record "$RESULTS" "${QUICK[@]}"
    step "gpu_profile float16" 55 "$PY" benchmarks/gpu_profile.py \
      --variants "mocov2,mocov2 + float16,$BEST + float16" --record "$RESULTS" "${QUICK[@]}"
    # optim.compile's colour steps: alone (against eager), then in the training loop with the
    # torch loader (the model compiled too, as optim.compile does it).
    step "colour_steps" 150 "$PY" benchmarks/colour_steps.py --record "$RESULTS" "${QUICK[@]}"
    step "gpu_input compiled" 240 "$PY" benchmarks/gpu_input.py --loaders torch --photometric device \
      --variant "$BEST + compile + CUDA graph" --budget-s $((220 * SCALE)) --record "$RESULTS" \
      "${QUICK[@]}"
    step "gpu_input Ray" 165 "$PY" benchmarks/gpu_input.py --loaders ray --budget-s $((150 * SCALE)) \
      --record "$RESULTS" "${QUICK[@]}"
    # The main job's smoke run as a user runs it, the platform's own GPU path: Ray Train's GPU
    # worker, conversion and evaluations on the GPU, hours from measured step times. Not in the
    # rehearsal, which runs without the platform's stack; tests/test_smoke.py runs it on CPUs.
    if [ "$SCALE" -eq 1 ]; then
      step "platform smoke" 300 "$PY" benchmarks/platform_smoke.py --budget-s 280 --record "$RESULTS"
    fi
  fi
}
run_steps
listing=
for w in "${wanted[@]}"; do  # a misspelt step would run nothing and still spend the loan
  if ! contains "$w" "${names[@]}"; then
    echo "STEPS: no step named '$w' (steps: $(printf '%s, ' "${names[@]}" | sed 's/, $//'))" >&2
    exit 2
  fi
done

# The platform's packages (Ray, MLflow, Hydra, ...), where the machine lacks them and
# benchmarks/pack_gpu_site.sh packed them into build/gpu-site; TorchCodec (the loader's JPEG
# decoder; without it PIL decodes, slower, same pixels) likewise.
if ! "$PY" -c "import ray, mlflow, hydra" 2>/dev/null && [ -f build/gpu-site/site.tar.xz ]; then
  site=$(mktemp -d)
  trap 'rm -rf "$site" "${codec:-}"' EXIT
  tar -xJf build/gpu-site/site.tar.xz -C "$site" &&
    export PYTHONPATH="$PYTHONPATH:$site" && echo "the platform's packages from build/gpu-site"
fi
if ! "$PY" -c "import torchcodec" 2>/dev/null && compgen -G "build/gpu-site/torchcodec/*.whl" >/dev/null; then
  codec=$(mktemp -d)
  trap 'rm -rf "${site:-}" "$codec"' EXIT
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$codec" build/gpu-site/torchcodec/*.whl &&
    export PYTHONPATH="$PYTHONPATH:$codec" && echo "TorchCodec from build/gpu-site"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
"$PY" -c "import torch; from dupr.data import folder as f; print('torch', torch.__version__, \
  'CUDA', torch.version.cuda, '; JPEG decoder:', 'TorchCodec' if f.decode_jpeg else 'PIL')"
run_steps
if [ "$status" -ne 0 ]; then printf 'failed: %s\n' "${failed[@]}"; else echo "all steps passed"; fi
exit "$status"
