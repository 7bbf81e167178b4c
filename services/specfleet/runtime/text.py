"""Committed token ids to streamed text: whole characters only, cut at the first stop string. The router streams
with it, and so does `specfleet generate`."""

from __future__ import annotations


class TextDeltas:
    """Turns committed tokens into text deltas: holds back incomplete UTF-8 and cuts at the first stop string."""

    def __init__(self, tokenizer, stop: list[str] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0

    def feed(self, new: list[int]) -> tuple[str, bool]:
        """(text to send now, whether a stop string was reached)."""
        self.ids += new
        text = self.tokenizer.decode(self.ids)
        hits = [text.find(s, max(0, self.sent - max(map(len, self.stop)))) for s in self.stop]
        hits = [h for h in hits if h >= 0]
        if hits:
            end = min(hits)
            delta, self.sent = text[self.sent:end], max(self.sent, end)
            return delta, True
        if text.endswith("\ufffd"):
            return "", False
        delta, self.sent = text[self.sent:], len(text)
        return delta, False
