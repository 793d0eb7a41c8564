"""Repository rules: nothing shadows the standard library's `platform`; dupr/ stays pure PyTorch."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_platform_folder_is_not_a_package():
    assert not (ROOT / "platform" / "__init__.py").exists()
    assert not (ROOT / "platform.py").exists()


def test_stdlib_platform_wins_from_the_repository_root():
    # Ray puts the working directory first on sys.path on its workers; emulate that.
    code = (
        "import sys; sys.path.insert(0, '.'); import dupr_platform, dupr, platform; "
        "print(platform.__file__); print(platform.python_version())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert "site-packages" not in out[0] and not out[0].startswith(str(ROOT)), out[0]
    assert out[1] == ".".join(map(str, sys.version_info[:3]))


def test_dupr_imports_nothing_from_the_platform_stack():
    forbidden = {
        "ray",
        "mlflow",
        "boto3",
        "botocore",
        "hydra",
        "omegaconf",
        "dupr_platform",
        "pyarrow",
    }
    offenders = []
    for path in (ROOT / "dupr").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in forbidden]
    assert not offenders
