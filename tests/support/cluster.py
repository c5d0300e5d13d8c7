"""This machine's side of a test cluster: free loopback ports, and the processes a cluster started (from /proc)."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def process_table() -> dict[int, tuple[int, str, str]]:
    """{pid: (parent pid, state, command line)} from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        table[int(entry)] = (int(fields[1]), fields[0], cmdline)
    return table


def cluster_processes(root_pid: int, temp_dir: str) -> set[int]:
    """Live processes of this cluster: the tree under `ray start`, and any process naming its temp folder."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root_pid]
    while todo:
        pid = todo.pop()
        if pid in table:
            found.add(pid)
        todo += children.get(pid, [])
    found |= {pid for pid, (_, _, cmd) in table.items() if temp_dir in cmd}
    found.discard(os.getpid())
    return {pid for pid in found if table.get(pid, (0, "Z", ""))[1] != "Z"}
