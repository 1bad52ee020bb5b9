"""Real redis-server processes for the remote-tier tests: one per session, per test, or a 3-node cluster.

Each server listens on a free loopback port with persistence off (``--save '' --appendonly no``); start-up
waits are bounded; every process started is killed at teardown. Without the ``redis-server`` binary (or
the ``redis`` client library) the tests that need one are skipped, except when the environment variable
``CI`` is set: then they fail (CI must install them: ``.ci/run``).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest

START_WAIT_S = 10.0


def _require() -> None:
    missing = []
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        missing.append("the redis-server binary (apt-get install -y redis-server)")
    try:
        import redis  # noqa: F401
    except ImportError:
        missing.append("the redis client library (pip install -e '.[remote]')")
    if missing:
        why = "remote-tier tests need " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(why + " (CI is set: not skipping)")
        pytest.skip(why)


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(cluster: bool = False) -> int:
    """A free loopback port; for a cluster node one <= 55535 whose bus port (+10000) is free too."""
    if not cluster:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(20000, 55535)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free loopback port pair for a cluster node")


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1 (``url``); stop/kill/pause/resume/restart for fault tests."""

    def __init__(self, directory: Path, *args: str, port: Optional[int] = None) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.args = list(args)
        self.proc: Optional[subprocess.Popen] = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(self.dir), *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_WAIT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited with {self.proc.returncode}")
            answer = self.cli("PING", check=False)
            if answer == "PONG" or answer.startswith("NOAUTH"):  # up (a --requirepass server says NOAUTH)
                return
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server on port {self.port} did not answer within {START_WAIT_S} s")

    def cli(self, *args: str, check: bool = True) -> str:
        """Run ``redis-cli -p PORT args...``; its stdout, stripped."""
        out = subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True, timeout=10)
        if check and out.returncode != 0:
            raise RuntimeError(f"redis-cli {args} failed: {out.stderr}")
        return out.stdout.strip()

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        """Kill, then start empty on the same port."""
        self.kill()
        self.start()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    """One server for the session (tests isolate themselves by namespace or flush it)."""
    _require()
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def own_redis(tmp_path) -> Iterator:
    """``own_redis(*args)`` starts a server for this test only (fault tests pause, kill and restart it)."""
    _require()
    servers: list[RedisServer] = []

    def start(*args: str) -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(servers)}", *args)
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for s in servers:
            s.kill()


class RedisCluster:
    """Three ``--cluster-enabled`` servers joined with ``redis-cli --cluster create`` (no replicas)."""

    def __init__(self, directory: Path) -> None:
        self.nodes: list[RedisServer] = []
        try:
            for i in range(3):
                port = free_port(cluster=True)
                self.nodes.append(RedisServer(
                    directory / f"node{i}", "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                    "--cluster-node-timeout", "2000", port=port,
                ))
            addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
            out = subprocess.run(
                ["redis-cli", "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True, text=True, timeout=30,
            )
            if out.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout} {out.stderr}")
            deadline = time.monotonic() + START_WAIT_S
            while not all("cluster_state:ok" in n.cli("CLUSTER", "INFO") for n in self.nodes):
                if time.monotonic() > deadline:
                    raise RuntimeError("the redis cluster did not reach cluster_state:ok in time")
                time.sleep(0.05)
        except BaseException:
            self.kill()
            raise

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def kill(self) -> None:
        for n in self.nodes:
            n.kill()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory) -> Iterator[RedisCluster]:
    _require()
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield cluster
    finally:
        cluster.kill()
