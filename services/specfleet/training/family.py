"""The names of the bundled model family and each drafter's domains: one table, importable without torch."""

from __future__ import annotations

from specfleet.training.corpus import DOMAINS

# Drafter name -> the domains it is distilled on.
DRAFTERS: dict[str, tuple[str, ...]] = {
    "drafter-python": ("python",),
    "drafter-prose": ("prose",),
    "drafter-c": ("c",),
    "drafter-general": DOMAINS,
}
DRAFTER_NAMES = tuple(DRAFTERS)
MODEL_NAMES = ("target",) + DRAFTER_NAMES
