"""Queue monitoring in the server, without grpc: figures read back from Redis, alerts
and health, the StreamTimings fan-out, the collector, and the Prometheus endpoint.

Every queue-level figure is read from Redis, so any server replica answers the
same; only RPC and stream metrics are per process.
"""
