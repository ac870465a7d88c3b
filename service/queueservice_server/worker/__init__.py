"""Worker processes: everything Huey. Stands on core/ only: the consumer and its
supervisor (leases, reaper, hard timeouts, registry), the storage and serializer
Huey is given, and the shared slots between a consumer and its processes."""
