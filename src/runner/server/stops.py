"""Stop strings in streamed text: the reply ends before the first one, which is never sent."""

from __future__ import annotations


class StopScanner:
    """Feed the reply's text piece by piece; get back the text that is safe to send. The tail that
    could still turn into a stop string (a stop may span two pieces) is held back until the next
    piece decides, and given back by `flush` when the reply ends without one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text to send, whether a stop string was found)."""
        if not self.stops:
            return text, False
        self.pending += text
        found = [i for i in (self.pending.find(stop) for stop in self.stops) if i >= 0]
        if found:
            safe, self.pending = self.pending[:min(found)], ""
            return safe, True
        held = self._start_of_a_stop()
        safe, self.pending = self.pending[:len(self.pending) - held], self.pending[len(self.pending) - held:]
        return safe, False

    def flush(self) -> str:
        rest, self.pending = self.pending, ""
        return rest

    def _start_of_a_stop(self) -> int:
        """Length of the longest end of `pending` that some stop string begins with."""
        for size in range(min(len(self.pending), max(map(len, self.stops)) - 1), 0, -1):
            tail = self.pending[-size:]
            if any(stop.startswith(tail) for stop in self.stops):
                return size
        return 0
