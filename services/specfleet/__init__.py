"""specfleet: lossless collaborative speculative decoding, served as a fleet of gRPC services."""

__version__ = "0.1.0"
