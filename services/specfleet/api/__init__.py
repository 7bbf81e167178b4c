"""The specfleet wire contract: stubs generated from protos/ (do not edit; run `make protos`)."""
