#!/usr/bin/env bash
# Regenerate the committed Python stubs of pipelines/proto/inference.proto (run from anywhere; needs the dev
# extra's grpcio-tools). The imports in the stubs are package paths (pipelines.proto.inference_pb2) because
# protoc runs from the repository root with -I .
set -euo pipefail
cd "$(dirname "$0")/../.."
python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. pipelines/proto/inference.proto
