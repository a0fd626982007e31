"""What the benchmark reads about processes and the machine (psutil), in one place (the
stack's own readiness check, `app.embedded.ports.listens`, reads psutil for itself).

psutil ships no type hints and the project does not list `types-psutil` (pyproject's mypy
settings ignore its missing stubs); the functions here are typed for the rest of the
package.
"""

from __future__ import annotations

import psutil


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process and its reaped children have used."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system + times.children_user + times.children_system)


def rss_mib(pid: int) -> float:
    return round(float(psutil.Process(pid).memory_info().rss) / 2**20, 1)


def memory_gib() -> float:
    return round(float(psutil.virtual_memory().total) / 2**30, 1)


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and its live descendants (PostgreSQL's backends, say)."""
    try:
        root = psutil.Process(pid)
        total = cpu_seconds(pid)
        for child in root.children(recursive=True):
            try:
                times = child.cpu_times()
                total += float(times.user + times.system)
            except psutil.NoSuchProcess:
                continue
        return total
    except psutil.NoSuchProcess:
        return 0.0


def own_cpu_seconds(pid: int) -> float:
    """CPU time of the process alone (the benchmark's children are the stack itself)."""
    try:
        times = psutil.Process(pid).cpu_times()
        return float(times.user + times.system)
    except psutil.NoSuchProcess:
        return 0.0


class CpuSplit:
    """Where the machine's CPU went during a run, process by process: the profile that
    tells whether the worker, the server, the database or the load generator is the limit.

    `trees` names the processes whose descendants count too (PostgreSQL's backends).
    """

    def __init__(self, processes: dict[str, int], trees: tuple[str, ...] = ("postgres",)) -> None:
        self._processes = processes
        self._trees = trees
        self._before: dict[str, float] = {}

    def _read(self, name: str, pid: int) -> float:
        return tree_cpu_seconds(pid) if name in self._trees else own_cpu_seconds(pid)

    def start(self) -> None:
        self._before = {name: self._read(name, pid) for name, pid in self._processes.items()}

    def stop(self, wall_s: float) -> dict[str, dict[str, float]]:
        """CPU seconds and cores busy (CPU seconds / wall seconds) per process."""
        split = {}
        for name, pid in self._processes.items():
            used = self._read(name, pid) - self._before.get(name, 0.0)
            split[name] = {"cpu_s": round(used, 2), "cores": round(used / wall_s, 2)}
        return split
