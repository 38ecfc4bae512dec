#!/usr/bin/env bash
# Regenerate the gRPC stubs from exo/networking/grpc/node_service.proto. Never edit the generated files by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. exo/networking/grpc/node_service.proto
