#!/usr/bin/env bash
# Wheels for a bare GPU machine that installs nothing from a registry (bench/gpu_run.sh installs what lies in
# .whl/ with --no-deps into /tmp/site, behind the machine's own packages). That machine has torch, transformers,
# grpcio and protobuf; it lacks gRPC's health and reflection services, llguidance (structured output), and the
# HTTP front's packages (fastapi, uvicorn and what they need), prometheus-client and jsonschema.
#   scripts/gpu_wheels.sh [DIR] [PYTHON_VERSION] [GRPC_VERSION]     (defaults: .whl 3.12 1.84.0)
set -euo pipefail
dir=${1:-.whl}
python=${2:-3.12}
grpc=${3:-1.84.0}
platforms=(--platform manylinux_2_31_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform any)
mkdir -p "$dir"
# gRPC's add-ons without their dependencies: grpcio and protobuf are the machine's own.
pip download -q --no-deps --only-binary=:all: --python-version "$python" "${platforms[@]}" -d "$dir" \
  "grpcio-health-checking==$grpc" "grpcio-reflection==$grpc"
# The rest with their dependencies, as the requirements pin them.
pip download -q --only-binary=:all: --python-version "$python" "${platforms[@]}" -d "$dir" \
  "llguidance>=1.9.1,<2" "fastapi>=0.115,<1" "uvicorn>=0.30,<1" "prometheus-client>=0.20" "jsonschema>=4.20,<5"
ls "$dir"
