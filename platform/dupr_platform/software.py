"""The software a run computed with, recorded on its MLflow run.

The same seeds give different pre-trained weights under other releases of the packages that
decode, augment and compute (PIL's resampling, NumPy's generators, torch's kernels), and on
another CPU instruction set (torch picks AVX-512 or AVX2 kernels, whose float sums round
differently: DUPR's lead over random initialisation in the demo's detection AP50 was 4.5
points on one CPU and 1.4 on another), so a number is only reproducible together with the
versions and the CPU it was computed with. Each process that
computes a result records them on its own run: the pipeline driver, rank 0 of a pre-training,
each evaluation's worker (on a cluster these may be different machines). `constraints.txt`
pins the versions `make venv` installs.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

# The packages whose release can change a number the platform reports, in the order shown.
RESULT_PACKAGES = (
    "torch",
    "torchvision",
    "numpy",
    "pillow",
    "scikit-image",
    "scikit-learn",
    "scipy",
    "faster-coco-eval",
    "ray",
    "mlflow",
)
TAG = "dupr.software"
ARTIFACT = "software.txt"


def _python() -> str:
    return ".".join(str(n) for n in sys.version_info[:3])


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else whatever `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers restrict)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def result_versions() -> dict[str, str]:
    """{"python": ..., package: version} for `RESULT_PACKAGES`, plus torch's CUDA build and
    the CPU kernels torch uses here ("cpu": AVX512, AVX2, ...)."""
    versions = {"python": _python()}
    versions |= {name: _version(name) for name in RESULT_PACKAGES}
    try:
        import torch

        versions["cuda"] = torch.version.cuda or "none"
        versions["cpu"] = torch.backends.cpu.get_cpu_capability()
    except ImportError:
        pass
    return versions


def summary() -> str:
    """One line for the run's `dupr.software` tag: "python=3.11.9 torch=2.14.1 ..."."""
    return " ".join(f"{name}={version}" for name, version in result_versions().items())


def installed() -> str:
    """Every installed distribution as `name==version`, sorted, like `pip freeze` (a file)."""
    names = {
        (dist.metadata["Name"] or "").lower(): dist.version for dist in metadata.distributions()
    }
    lines = [f"{name}=={version}" for name, version in sorted(names.items()) if name]
    header = f"# python {_python()}\n# cpu {cpu_model()}\n"
    return header + "\n".join(lines) + "\n"
