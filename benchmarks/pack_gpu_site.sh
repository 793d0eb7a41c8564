#!/usr/bin/env bash
# The platform's Python packages for a GPU machine that has PyTorch but not the platform's
# stack, and cannot download: gpu_checks.sh's Ray rows of gpu_input and its `platform smoke`
# step (the main job's smoke run on the GPU) need them. Writes build/gpu-site/:
#
# - site.tar.xz: what pip adds to that machine's image when it installs pyproject.toml's
#   dependencies at the releases constraints.txt pins, for that machine's Python
#   (gpu_image_packages.txt lists what the image has; pip resolves the rest), without what a
#   local run there does not use: Ray's Java jars, RLlib, Serve and LLM library, MLflow's web
#   UI, boto3 (S3 goes through pyarrow.fs; only the local stack's bucket set-up imports boto3),
#   the virtualenv that Ray's pip runtime environments use, and tests. About 45 MB, where the
#   wheels are 210 MB. typing_extensions goes in too, whatever the image has: pydantic needs a
#   recent one.
# - torchcodec/: TorchCodec 0.16, the release for that machine's PyTorch 2.11 (the loader's JPEG
#   decoder; its release notes give torch >= 2.11); constraints.txt pins the one for ours. Where
#   it does not load, PIL decodes (same pixels).
#
# gpu_checks.sh unpacks each where its import fails; take the folder along with the working tree
# (the device tool's carry, 64 MiB at most).
#
#     bash benchmarks/pack_gpu_site.sh [PYTHON_VERSION]     # default 3.12, the image's
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
DEST=${DEST:-build/gpu-site}  # another folder: DEST=...
PIP=(python3 -m pip)
[ -x .venv/bin/python ] && PIP=(.venv/bin/python -m pip)
TARGET=(--python-version "$PYV" --implementation cp --only-binary=:all: --platform manylinux2014_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
# Not packed, beside the image's packages (see above); pip's names, lower case.
LEAVE_OUT="torch torchvision torchcodec boto3 botocore s3transfer jmespath virtualenv distlib python-discovery py-spy"
ALWAYS="typing-extensions"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# pyproject.toml's dependencies but those left out (PyTorch's is the image's); Hydra's parser
# runtime has only a source release, built here into a wheel (pure Python) for pip to find.
python3 - "$LEAVE_OUT" >"$work/requirements.txt" <<'EOF'
import re, sys, tomllib
name = lambda s: re.sub(r"[-_.]+", "-", re.match(r"[\w.-]+", s)[0].lower())
for requirement in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    if name(requirement) not in sys.argv[1].split():
        print(requirement)
EOF
"${PIP[@]}" wheel -q --no-deps -w "$work/links" "$(grep -i '^antlr4-python3-runtime==' constraints.txt)"
"${PIP[@]}" install -q --dry-run --ignore-installed --report "$work/report.json" \
  --target "$work/none" "${TARGET[@]}" --find-links "$work/links" -c constraints.txt \
  -r "$work/requirements.txt"
python3 - "$work/report.json" benchmarks/gpu_image_packages.txt "$LEAVE_OUT" "$ALWAYS" \
  >"$work/wanted.txt" <<'EOF'
import json, re, sys
report, image, leave_out, always = sys.argv[1:]
name = lambda s: re.sub(r"[-_.]+", "-", s.strip().lower())
skip = {name(n) for n in open(image) if n.strip() and not n.startswith("#")}
skip = (skip | set(leave_out.split())) - set(always.split())
for item in json.load(open(report))["install"]:
    meta = item["metadata"]
    if name(meta["name"]) not in skip:
        print(f"{meta['name']}=={meta['version']}")
EOF
echo "packing $(wc -l <"$work/wanted.txt") packages for Python $PYV: $(tr '\n' ' ' <"$work/wanted.txt")"
"${PIP[@]}" download -q --no-deps "${TARGET[@]}" --find-links "$work/links" -d "$work/wheels" \
  -r "$work/wanted.txt"
"${PIP[@]}" install -q --no-index --no-deps --no-compile "${TARGET[@]}" --target "$work/site" \
  "$work"/wheels/*.whl
# Not Ray's dashboard client: without it the dashboard fails to start, after a minute.
rm -rf "$work"/site/ray/{jars,rllib,serve,llm} "$work/site/mlflow/server/js"
find "$work/site" -type d -name tests -prune -exec rm -rf {} +

rm -rf "$DEST"
mkdir -p "$DEST/torchcodec"
tar -C "$work/site" -cf - . | xz -T0 -6 >"$DEST/site.tar.xz"
"${PIP[@]}" download -q --no-deps "${TARGET[@]}" -d "$DEST/torchcodec" torchcodec==0.16.0
du -sh "$DEST"/site.tar.xz "$DEST"/torchcodec
