"""A private redis-server for the bench and the tests: Debian's ``redis-server`` started on a unix
socket in a temporary directory (no TCP port: ``--port 0``), without persistence, stopped at the
end. ``scripts/test.sh`` installs the package when it runs as root."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Optional


def find_redis_server() -> Optional[str]:
    return shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if os.access(p, os.X_OK)), None)


class RedisServer:
    """``start()``/``stop()``/``restart()`` a redis-server on ``self.socket``."""

    def __init__(self, executable: Optional[str] = None, maxmemory: str = "256mb") -> None:
        exe = executable or find_redis_server()
        if exe is None:
            raise FileNotFoundError("redis-server is not on PATH (Debian: apt-get install redis-server)")
        self.executable = exe
        self.dir = tempfile.mkdtemp(prefix="llmem-redis-")
        self.socket = os.path.join(self.dir, "redis.sock")
        self.maxmemory = maxmemory
        self.proc: Optional[subprocess.Popen[bytes]] = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout: float = 20.0) -> None:
        assert self.proc is None, "already running"
        log = open(os.path.join(self.dir, "redis.log"), "ab")
        self.proc = subprocess.Popen(
            [self.executable, "--port", "0", "--unixsocket", self.socket, "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--dir", self.dir, "--maxmemory", self.maxmemory,
             "--maxmemory-policy", "allkeys-lru", "--daemonize", "no"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        import redis

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: "
                                   + open(os.path.join(self.dir, "redis.log")).read()[-2000:])
            try:
                client = redis.Redis(unix_socket_path=self.socket, socket_timeout=1)
                if client.ping():
                    client.close()
                    return
            except (redis.RedisError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("redis-server did not answer within %.0fs" % timeout)
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        try:
            os.unlink(self.socket)
        except FileNotFoundError:
            pass

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
