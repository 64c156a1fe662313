"""Which names and addresses are this machine's own (loopback), for the server's safety checks."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit


def is_loopback(host: str | None) -> bool:
    """127.0.0.0/8, ::1 and localhost; a host name that could resolve elsewhere is not."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def url_host(url: str) -> str | None:
    """The host of 'http://localhost:3000' (an Origin header) or of '//127.0.0.1:8080' (a Host header)."""
    try:
        return urlsplit(url).hostname
    except ValueError:
        return None
