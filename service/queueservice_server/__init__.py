"""The queue service: gRPC API, queue core on Redis, Huey workers."""

import os

# gRPC's C core writes unstructured lines to stderr, at INFO for every failed TLS handshake:
# one a probe or a plaintext client, a flood under attack. Our own logs carry what matters.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
