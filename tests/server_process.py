"""Start ``serve.py`` as a subprocess on a free loopback port and wait until it is healthy.

A test helper (it uses httpx, a test-only dependency), used by the end-to-end tests and
``bench/bench_serve.py``: they talk to a real server process over real HTTP, exactly as a client would.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, procs: Sequence[subprocess.Popen], timeout: float = 120.0,
                 output: Callable[[], str] = str) -> None:
    """Poll ``url + "/health"`` until it answers 200. Raises at once if one of ``procs`` (the server's
    processes) exits, and after ``timeout`` seconds; either way with the tail of ``output()``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"serve.py (pid {proc.pid}) exited with {proc.returncode}:\n{output()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"serve.py not healthy at {url} after {timeout} s:\n{output()[-3000:]}")


class ServerProcess:
    """``LAUNCHER serve.py --port P ARGS`` with its own log file; ``url`` once :meth:`wait_healthy` returned.

    ``launcher``: what runs ``serve.py`` (default: this Python; e.g. ``[python, -m, torch.distributed.run,
    ...]`` for expert parallelism). ``new_session``: start it in its own process group (to signal a
    whole torchrun job)."""

    def __init__(self, args: Sequence[str] = (), env: dict[str, str] | None = None, port: int | None = None,
                 launcher: Sequence[str] = (sys.executable,), new_session: bool = False) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="serve-", suffix=".log", delete=False)
        full_env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(
            [*launcher, str(REPO / "serve.py"), "--port", str(self.port), *args],
            cwd=REPO, env=full_env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=new_session,
        )

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def wait_healthy(self, timeout: float = 120.0) -> ServerProcess:
        try:
            wait_healthy(self.url, [self.proc], timeout, self.output)
        except TimeoutError:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        try:
            return self.wait_healthy()
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
        os.unlink(self.log.name)


def scrape_metrics(url: str, headers: dict | None = None) -> dict[str, float]:
    """``/metrics`` as ``{"name{labels}": value}`` (comments dropped)."""
    text = httpx.get(url + "/metrics", headers=headers, timeout=10).text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def start_ranks(cache: Path, http_port: int, serve_args: Sequence[str], world: int = 2) -> list[subprocess.Popen]:
    """``serve.py`` ranks started by hand (not torchrun, so a test can watch rank 0's own exit status): the
    environment torchrun would give each rank, the tiny model cached in ``cache``, short collective
    timeouts, one torch thread per rank."""
    master_port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "HWLAYER_CACHE": str(cache), "GLM_BACKEND": "cpu", "RANK": str(rank),
               "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port), "HWLAYER_DIST_TIMEOUT": "60",
               "HWLAYER_DIST_PROBE_TIMEOUT": "5", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, str(REPO / "serve.py"), "--port", str(http_port), *serve_args],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs
