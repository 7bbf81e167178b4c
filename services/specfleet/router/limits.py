"""The bounds the router's APIs enforce, in one place: the gRPC service and the HTTP front validate with them and the
OpenAPI document describes them (no torch, no FastAPI here: every layer may import it). Also the HTTP front's default
model id, which the command line offers as the default of --served-model-name."""

from __future__ import annotations

MIN_TEMPERATURE = 1e-4  # below this (but > 0) logits / temperature overflow float32 and sampling yields NaN
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256  # each stop string is searched for after every round
MAX_BODY_BYTES = 1 << 20  # 1 MiB: the HTTP front's default body limit
MAX_STOP = 4  # OpenAI's limit on stop sequences (the HTTP front's)
INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1  # the gRPC fields' ranges: larger values cannot even be sent on
SERVED_MODEL_NAME = "specfleet-target"  # the model id the HTTP front lists and accepts unless told another
# rolling updates: a caller that cannot resume a stream by its request id (the HTTP front) sends this metadata, so
# a draining router lets its stream run on within the grace instead of handing it over at the next round; a stream
# ended by a draining router carries HANDED_OVER at the start of its UNAVAILABLE message
NO_HANDOVER = ("x-specfleet-handover", "no")
HANDED_OVER = "router draining (rolling update)"
