#!/usr/bin/env bash
# Ray for a GPU machine that has PyTorch but not Ray, and cannot download: gpu_input.py's
# data_loader=ray rows need it. Writes build/gpu-site/: Ray at the version constraints.txt pins,
# for that machine's Python, without what a local Ray Data pipeline does not use (the Java
# jars, RLlib, Serve, the LLM library, the dashboard's web client, tests), 29 MB as ray.tar.xz
# where the wheel is 79 MB; and the wheels Ray needs beyond PyTorch's usual company (jsonschema
# and its dependencies, pydantic and its), and TorchCodec. gpu_checks.sh unpacks each when its
# import fails there; take the folder along with the working tree.
#
#     bash benchmarks/pack_ray.sh [PYTHON_VERSION]     # default 3.12
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
DEST=build/gpu-site
pin() { grep -i "^$1==" constraints.txt; }
download() {  # download DIR REQUIREMENT...: binary wheels for that Python on x86-64 Linux
  local dir=$1
  shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" \
    --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 -d "$dir" "$@"
}
rm -rf "$DEST"
mkdir -p "$DEST/wheels"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
download "$work" "$(pin ray)"
# Ray Train v2 (ray_data imports ray.train) needs pydantic, which the GPU machine lacked.
download "$DEST/wheels" "$(pin jsonschema)" "$(pin jsonschema-specifications)" \
  "$(pin referencing)" "$(pin rpds-py)" "$(pin pydantic)" "$(pin pydantic_core)" \
  "$(pin annotated-types)" "$(pin typing-inspection)" "$(pin typing_extensions)"
mkdir "$work/site"
python3 -m zipfile -e "$work"/ray-*.whl "$work/site"
# zipfile drops the executable bits that Ray's binaries need; restore them from the wheel.
chmod +x "$work"/site/ray/core/src/ray/raylet/raylet "$work"/site/ray/core/src/ray/gcs/gcs_server
rm -rf "$work"/site/ray/{jars,rllib,serve,llm,dashboard/client/build}
find "$work/site/ray" -type d -name tests -prune -exec rm -rf {} +
tar -C "$work/site" -cf - . | xz -T0 -6 >"$DEST/ray.tar.xz"
# TorchCodec, whose JPEG decoder the loader uses (dupr.data.folder): 0.16, the release that
# brought image decoding, supports torch >= 2.11 (its release notes), the GPU machine's 2.11;
# constraints.txt pins the one for ours. Where it does not load, PIL decodes (same pixels).
mkdir "$DEST/torchcodec"
download "$DEST/torchcodec" torchcodec==0.16.0
du -sh "$DEST"/ray.tar.xz "$DEST"/wheels "$DEST"/torchcodec
