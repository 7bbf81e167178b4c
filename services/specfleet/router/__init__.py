"""The router service: the public entry point (gRPC `specfleet.api.v1.Router`)."""
