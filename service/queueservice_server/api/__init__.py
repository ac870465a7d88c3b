"""The gRPC API: servicers, validation, error mapping and proto conversion."""
