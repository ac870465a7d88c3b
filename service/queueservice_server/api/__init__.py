"""Everything gRPC: the server factory and serve(), health, the servicers, validation,
error mapping, method wrappers, RPC metrics, and proto conversion."""
