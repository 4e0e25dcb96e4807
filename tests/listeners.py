"""Which TCP addresses a process tree listens on, sampled while a run is in progress."""

from __future__ import annotations

import ipaddress
import os
import threading
from typing import Any

import psutil


def listening(pid: int | None = None) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of `pid` (default: this one) and below."""
    try:
        root = psutil.Process(pid or os.getpid())
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return set()
    out = set()
    for proc in procs:
        try:
            conns = proc.net_connections(kind="tcp")
            name = proc.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        out |= {(name, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
    return out


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or ip).is_loopback


def exposed(seen: set[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    return sorted(s for s in seen if not is_loopback(s[1]))


class ListenerWatch:
    """Samples `listening()` every `every` seconds in a thread until the block ends; `seen` is the union."""

    def __init__(self, every: float = 0.25) -> None:
        self.every = every
        self.seen: set[tuple[str, str, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.seen |= listening()
            self._stop.wait(self.every)

    def __enter__(self) -> ListenerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
