#!/usr/bin/env bash
# Generate Python stubs from protos/ into services/pb (never edit the output by hand).
# The OIP messages are loaded into a private descriptor pool: tritonclient registers the same
# `inference.*` symbols in protobuf's default pool, and both must live in one process.
set -euo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
rm -rf services/pb
mkdir -p services/pb
"$PY" -m grpc_tools.protoc -Iservices/pb=protos \
  --python_out=. --grpc_python_out=. --pyi_out=. protos/*/*.proto
sed -i 's/_descriptor_pool\.Default()\.AddSerializedFile(/_descriptor_pool.DescriptorPool().AddSerializedFile(/' \
  services/pb/inference/grpc_service_pb2.py
touch services/pb/.generated
