"""The queue core, shared by the gRPC server and the workers; imports neither grpc nor huey:
Redis clients, key and field names, Lua scripts, the job record, the message codec,
timings, and the producer (the API's writes and reads)."""
