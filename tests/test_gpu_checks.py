"""The GPU checks rehearse on a CPU, as the GPU machine will run them.

A GPU machine is lent to this project now and then, for about 15 minutes: a script that fails
there on an import or a typo wastes the loan. `benchmarks/gpu_checks.sh --quick` runs every
step at small sizes on the CPU; here it runs with the packages the GPU machine lacks (Ray,
MLflow, Hydra, boto3, ...) made unimportable, so a dependency creeping into the benchmark path
fails here first (the GPU machine gets them only as benchmarks/pack_gpu_site.sh packs them, for
the named steps `gpu_input Ray`, whose rows are tested on their own below, and `platform smoke`,
the smoke run that tests/test_smoke.py runs on CPUs). The CUDA tests skip on a CPU.

The rehearsal and the Ray loader's rows (`rehearsal`: about 4 minutes on 2 cores) run with
`make test-rehearsal`, before a GPU loan and after a change to benchmarks/; `make test` (and so
CI) keeps what is cheap of them: each script the checks run imports without the platform's
packages, mypy checks their code, and a misspelt step stops the script.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# Installed here, absent on the GPU machine (its image holds torch, torchvision, Pillow, NumPy,
# pyarrow, PyYAML and pytest, not the platform's stack).
ABSENT = (
    *("ray", "mlflow", "omegaconf", "hydra", "boto3", "botocore", "moto", "faster_coco_eval"),
    "torchcodec",  # the loader then decodes with PIL, as where its build does not load
)
BEST = "attention + bf16 + matmul RoIAlign"
CUDNN = "cuDNN attention + bf16 + matmul RoIAlign"
SECTIONS = (
    f"gpu_step (quick, cpu; levers: mocov2 + CUDA graph, attention + bf16, {BEST}, {CUDNN}, "
    f"{BEST} + CUDA graph, {CUDNN} + CUDA graph)",
    f"gpu_step (quick, cpu; levers: mocov2 + CUDA graph, {BEST} + compile + CUDA graph)",
    f"gpu_step (quick, cpu; levers: mocov2 + CUDA graph, {BEST} + CUDA graph)",  # batch 128
    "gpu_profile (quick, cpu)",
    "gpu_memory (quick, cpu)",
    "patch_loss_memory (quick, cpu)",
    "gpu_input (quick, cpu)",
    "colour_steps (quick, cpu)",
    "gpu_input (quick, cpu; compiled)",  # optim.compile's colour steps in the training loop
    f"gpu_step (quick, cpu; levers: mocov2 + float16, {BEST}, {BEST} + float16)",
)


def rehearse(env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """`bash benchmarks/gpu_checks.sh --quick` with `env`, its output captured."""
    return subprocess.run(
        ["bash", "benchmarks/gpu_checks.sh", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def without_the_platforms_packages(tmp_path: Path) -> dict[str, str]:
    """This environment with the packages in ABSENT made unimportable (PYTHONPATH)."""
    shadow = tmp_path / "absent"
    for name in ABSENT:
        (shadow / name).mkdir(parents=True)
        (shadow / name / "__init__.py").write_text(f"raise ImportError('{name}: absent')\n")
    return {**os.environ, "PYTHONPATH": str(shadow)}


def test_the_scripts_of_the_gpu_checks_import_without_the_platforms_packages(tmp_path):
    """What `make test` keeps of the rehearsal below in a few seconds: every script that
    gpu_checks.sh runs but `platform smoke` imports (the CUDA tests' module too) as on the GPU
    machine; mypy checks their code."""
    scripts = set(
        re.findall(r"benchmarks/(\w+)\.py", (ROOT / "benchmarks/gpu_checks.sh").read_text())
    )
    scripts -= {"platform_smoke"}  # the named step that takes the platform's stack along
    assert {"gpu_step", "gpu_input", "patch_loss_memory"} <= scripts
    code = (
        "import importlib, sys\n"
        "sys.path[:0] = ['benchmarks', 'tests']\n"
        f"for name in {sorted(scripts | {'test_cuda'})}: importlib.import_module(name)\n"
        "try:\n    import ray\nexcept ImportError:\n    pass\n"  # the shadow works
        "else:\n    sys.exit('ray imported')\n"
    )
    env = without_the_platforms_packages(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.rehearsal
def test_gpu_checks_rehearse_on_a_cpu_without_the_platforms_packages(tmp_path):
    results = tmp_path / "RESULTS.md"
    env = without_the_platforms_packages(tmp_path) | {
        "PYTHON": sys.executable,
        "RESULTS": str(results),
    }
    env.pop("OUT", None)
    proc = rehearse(env, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "all steps passed" in out
    assert "JPEG decoder: PIL" in out
    recorded = results.read_text()
    for section in SECTIONS:
        assert f"## {section}" in recorded, section
    # Every lever of gpu_step got a row with a time, none an error.
    for row in (
        "mocov2 + CUDA graph",
        "dupr + attention + bf16",
        f"dupr + {BEST}",
        f"dupr + {BEST} + CUDA graph",
        f"dupr + {BEST} + compile + CUDA graph",
        f"dupr + {CUDNN}",
        f"dupr + {CUDNN} + CUDA graph",
        "mocov2 + float16",
        f"dupr + {BEST} + float16",
    ):
        cells = next(
            [c.strip() for c in x.split("|")]
            for x in recorded.splitlines()
            if x.startswith(f"| {row} ")
        )
        assert cells[2] != "-" and "Error" not in cells[-2], cells
    # The torch loader with the colour steps in the loader and on the device (Ray is absent).
    rows = gpu_input_rows(recorded)
    for placement in ("loader", "device"):
        assert float(rows[("torch", placement, "loader alone")][4]) > 0, rows
        assert float(rows[("torch", placement, "loader alone")][6]) >= 0, rows  # first batch s
        assert rows[("torch", placement, "training loop")][7].endswith("%"), rows


def test_a_misspelt_step_stops_the_checks_before_anything_runs(tmp_path):
    """STEPS names the steps of a rerun; a name that no step has would run nothing and still
    spend the loan's minutes, so the script says which names there are and stops."""
    results = tmp_path / "RESULTS.md"
    env = {**os.environ, "STEPS": "gpu_step float16, gpu_step,float16", "RESULTS": str(results)}
    proc = rehearse(env, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("STEPS: no step named 'float16' (steps: CUDA tests, gpu_step,")
    assert "===" not in proc.stdout and not results.exists()


def gpu_input_rows(text: str) -> dict[tuple[str, str, str], list[str]]:
    """gpu_input's table rows keyed by (loader, colour steps, what runs)."""
    return {
        tuple(c.strip() for c in line.split("|")[1:4]): [c.strip() for c in line.split("|")]
        for line in text.splitlines()
        if line.startswith("| torch ") or line.startswith("| ray ")
    }


@pytest.mark.rehearsal
def test_gpu_input_measures_the_ray_data_loader_where_ray_is_installed():
    """The data_loader=ray rows, which the rehearsal above cannot reach without Ray.

    With the colour steps on the device, the benchmark's default for its Ray rows (the
    benchmark builds both placements' loaders the same way, the rehearsal above runs both
    through the torch loader, and the Ray loader with the colour steps in its decoding tasks is
    what tests/test_ray_data.py and tests/test_ray_pretrain.py run throughout).
    """
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/gpu_input.py",
            "--quick",
            "--device",
            "cpu",
            "--loaders",
            "ray",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = gpu_input_rows(proc.stdout)
    assert float(rows[("ray", "device", "loader alone")][4]) > 0, rows
    assert float(rows[("ray", "device", "loader alone")][6]) > 0, rows  # the epoch's start
    assert rows[("ray", "device", "training loop")][7].endswith("%"), rows
    assert ("ray", "loader", "loader alone") not in rows  # --ray-photometric's default
