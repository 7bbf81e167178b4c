"""The specfleet Kubernetes operator (kopf): thin handlers over a pure scaling policy."""
