"""gRPC fronts: thin translators between protocol messages and the core."""
