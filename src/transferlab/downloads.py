"""Downloads that fail fast: a bounded socket timeout, so an offline machine gets an answer in seconds."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

DOWNLOAD_TIMEOUT_S = 10


def offline() -> bool:
    """TRANSFERLAB_OFFLINE=1: never try a download."""
    return os.environ.get("TRANSFERLAB_OFFLINE", "0").lower() in ("1", "true", "yes")


@contextmanager
def socket_timeout(seconds: float = DOWNLOAD_TIMEOUT_S) -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)
