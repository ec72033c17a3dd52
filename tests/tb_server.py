"""A real TensorBoard server for tests (not part of the library): a free loopback port, JSON over its
HTTP API, and a context manager that starts it, waits until it serves what a test needs, and stops
it by its PID."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, body: dict | None = None, timeout: float = 5.0):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode())


@contextlib.contextmanager
def tensorboard_server(
    logdir: Path,
    log_path: Path,
    ready: Callable[[str], bool],
    what: str = "the expected data",
    timeout: float = 90.0,
) -> Iterator[str]:
    """TensorBoard over ``logdir`` on 127.0.0.1 (``--load_fast=false``, output to ``log_path``);
    yields its base URL once ``ready(base)`` is true, fails the test after ``timeout`` s; stops it by PID."""
    port = free_port()
    exe = Path(sys.executable).with_name("tensorboard")
    cmd = [str(exe), "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port), "--load_fast=false"]
    base = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    tail = Path(log_path).read_text()[-2000:]
                    pytest.fail(f"tensorboard exited with {proc.returncode}: {tail}")
                try:
                    if ready(base):
                        break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
                time.sleep(0.5)
            else:
                tail = Path(log_path).read_text()[-2000:]
                pytest.fail(f"tensorboard served no {what} in {timeout:.0f} s: {tail}")
            print(f"tensorboard ready in {time.monotonic() - started:.1f} s")
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
