#!/usr/bin/env bash
# Wheels that the shared offline GPU kit (../shared/gpu-kit/build.sh) does not fetch but pelmark needs on a
# GPU machine without a package index: pydantic (every command's settings check), pydicom (pelmark predict)
# and nanodrr with its own dependencies (--renderer nanodrr, make bench-gpu). Run from the project root
# after build.sh; it adds them to .whl/, which build.sh's install line then installs with the rest.
#   ../shared/gpu-kit/build.sh && scripts/gpu-kit-extra.sh
set -euo pipefail
test -d .whl || { echo "scripts/gpu-kit-extra.sh: no .whl/ here: run ../shared/gpu-kit/build.sh from the project root first" >&2; exit 1; }
P="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64"
python3 -m pip download -q --no-deps $P -d .whl \
  pydantic pydantic-core annotated-types typing-inspection typing-extensions pydicom nanodrr==0.1.7 roma platformdirs
du -sh .whl
