"""Repository rules: nothing shadows the standard library's `platform`; dupr/ stays pure PyTorch;
the README names only files and modules that exist."""

import ast
import pathlib
import re
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


# The README's concept map and status table name files and modules; they must exist.
PACKAGES = {"dupr": ROOT / "dupr", "dupr_platform": ROOT / "platform" / "dupr_platform"}
IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"


def _table(section: str, column: str) -> list[str]:
    """The cells of `column` in the first table under the README heading `## {section}`."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    rows = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in text[start:end].splitlines()
        if line.startswith("|")
    ]
    header, separator, *body = rows
    assert set("".join(separator)) <= set("-: "), separator
    return [row[header.index(column)] for row in body]


def _module_file(dotted: str) -> pathlib.Path | None:
    top, *rest = dotted.split(".")
    if top not in PACKAGES:
        return None
    base = PACKAGES[top].joinpath(*rest)
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _defines(path: pathlib.Path, name: str) -> bool:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if node.name == name:
                return True
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
        elif isinstance(node, ast.Import | ast.ImportFrom) and any(
            (a.asname or a.name.split(".")[0]) == name for a in node.names
        ):
            return True
    return False


def _missing_in(cell: str) -> list[str]:
    """What a cell names that does not exist.

    A backquoted path (`dupr/views.py`, `configs/`) is relative to the repository; a bare file
    name after it (`finetune.py`) to that path's folder, other bare file names to the
    repository's top (`constraints.txt`); a dotted module (`dupr_platform.cluster`,
    also in `python -m dupr.local_pretrain`) is a file of that package, and a bare name after
    it (`console`) a sibling module; backquoted names in parentheses after a file (`TwoViews`)
    are defined in it. Overrides (`data_loader=ray`) are not names.
    """
    missing: list[str] = []
    folder: pathlib.Path | None = None  # of the last path
    last_file: pathlib.Path | None = None
    package: str | None = None  # of the last dotted module
    for group, inside in re.findall(r"\(([^)]*)\)|([^()]+)", cell):
        if group:  # names defined in the file just before
            for name in re.findall(r"`([^`]+)`", group):
                if last_file is None or not last_file.is_file() or not _defines(last_file, name):
                    missing.append(f"{name} (in {last_file})")
            continue
        for token in re.findall(r"`([^`]+)`", inside):
            token = token.removeprefix("python -m ").strip()
            path: pathlib.Path | None
            if "=" in token:
                continue
            if "/" in token:
                path = ROOT / token
                folder = path if token.endswith("/") else path.parent
            elif token.endswith(".py") and folder is not None:
                path = folder / token
            elif (ROOT / token).is_file():  # a file at the top, constraints.txt say
                path = ROOT / token
            elif re.fullmatch(rf"{IDENTIFIER}(\.{IDENTIFIER})+", token):
                path, package = _module_file(token), token.rsplit(".", 1)[0]
            elif re.fullmatch(IDENTIFIER, token) and package is not None:
                path = _module_file(f"{package}.{token}")
            else:
                path = None
            if path is None or not path.exists():
                missing.append(token)
            last_file = path if path is not None and path.is_file() else None
    return missing


def test_the_readme_concept_map_names_files_that_exist():
    cells = _table("Where each paper concept lives", "Code")
    assert len(cells) >= 10
    missing = [(cell, m) for cell in cells for m in _missing_in(cell)]
    assert not missing, missing


def test_the_readme_status_table_names_files_that_exist():
    cells = _table("Status", "Where")
    assert len(cells) >= 5
    missing = [(cell, m) for cell in cells for m in _missing_in(cell)]
    assert not missing, missing


def test_the_readme_checker_finds_what_is_missing():
    assert _missing_in("`dupr/views.py` (`TwoViews`, `NoSuchView`)") == [
        f"NoSuchView (in {ROOT / 'dupr' / 'views.py'})"
    ]
    assert _missing_in("`dupr/evaluation/detectors.py`, `finetune.py`, `nope.py`") == ["nope.py"]
    assert _missing_in("`dupr_platform.recovery`, `cluster`, `no_such_module`") == [
        "no_such_module"
    ]
    assert _missing_in("`python -m dupr.local_pretrain`, `dupr/`, `data_loader=ray`") == []
    assert _missing_in("`python -m dupr.nothing`, `nowhere/`, `Word`") == [
        "dupr.nothing",
        "nowhere/",
        "Word",
    ]
