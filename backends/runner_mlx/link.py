"""The chat link between `runner launch` (which has the terminal) and rank 0, on one machine.

mlx.launch pipes the ranks' output, so the chat app runs in the launcher process and rank 0 serves
it over a TCP socket on 127.0.0.1: one JSON object per line. Only the user interface goes over
it; the ranks talk to each other through mx.distributed alone.

    launcher -> rank 0: {"tokenize": true, "messages": [{role, content}, ...]}
                        {"generate": id, "messages": [...], "sampling": {temperature, top_p, max_tokens, seed}}
                        {"cancel": id}             {"close": true}
    rank 0 -> launcher: {"progress": {stage, done, total, unit}}
                        {"ready": {"summary": str, "memory": [bytes per rank], "peak": [bytes per rank]}}
                        {"tokens": [ids]}          {"chunk": id, ...GenerationChunk fields}
                        {"error": message}
"""

from __future__ import annotations

import json
import socket


class LinkClosed(Exception):
    """The other end closed the link (or it broke)."""


class JsonLink:
    """Newline-delimited JSON over a connected socket. `receive(timeout)` returns None when nothing
    came within `timeout` seconds, so a caller can check on other things between reads."""

    def __init__(self, connection: socket.socket):
        self.connection = connection
        self._buffer = bytearray()

    @classmethod
    def connect(cls, address: str, timeout: float = 30.0) -> "JsonLink":
        host, _, port = address.rpartition(":")
        return cls(socket.create_connection((host, int(port)), timeout=timeout))

    def send(self, message: dict) -> None:
        try:
            self.connection.sendall(json.dumps(message).encode() + b"\n")
        except OSError as error:
            raise LinkClosed(str(error)) from None

    def receive(self, timeout: float | None) -> dict | None:
        while b"\n" not in self._buffer:
            self.connection.settimeout(timeout)
            try:
                data = self.connection.recv(65536)
            except TimeoutError:
                return None
            except OSError as error:
                raise LinkClosed(str(error)) from None
            if not data:
                raise LinkClosed("the other end closed the link")
            self._buffer += data
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        return json.loads(line)

    def close(self) -> None:
        try:
            self.connection.close()
        except OSError:
            pass
