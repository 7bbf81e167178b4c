"""The speculative decoding engine: pure algorithms and the target runner, no network."""
