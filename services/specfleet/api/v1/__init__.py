"""Generated from protos/specfleet/api/v1/*.proto by `make protos`; checked in; a test fails when they drift."""
