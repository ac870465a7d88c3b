"""The queue service: gRPC API, queue core on Redis, Huey workers."""
