"""Processes of a Passerelle cluster on one machine, for tests/cluster/.

Every piece is the real program: a PostgreSQL instance made with ``initdb`` in a
temporary folder, ``redis-server``, ``haproxy``, and ``passerelle serve`` /
``passerelle worker`` processes configured only through ``PASSERELLE_*``
variables, as docs/deployment.md tells an operator to run them. Each listens on
a free port of 127.0.0.1 of its own, so the machine's own PostgreSQL and Redis
(which other tests use) are never touched.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
HAPROXY_TEMPLATE = REPO / "deploy" / "haproxy.cfg"


def postgres_bin() -> Path | None:
    """The newest PostgreSQL server binaries installed (Debian's layout), if any."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def haproxy_bin() -> str | None:
    return shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy",) if Path(p).exists()), None)


def missing_programs() -> list[str]:
    missing = []
    if haproxy_bin() is None:
        missing.append("haproxy")
    if shutil.which("redis-server") is None:
        missing.append("redis-server")
    if postgres_bin() is None:
        missing.append("postgresql (initdb, pg_ctl)")
    elif os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            missing.append("the postgres OS user (PostgreSQL refuses to run as root)")
    return missing


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], bool], seconds: float, what: str,
               every: float = 0.1) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(every)
    raise AssertionError(f"timed out after {seconds:.0f}s waiting for {what}")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Postgres:
    """A PostgreSQL instance of our own: initdb into a folder, one port, trust auth."""

    def __init__(self, root: Path) -> None:
        self.bin = postgres_bin()
        assert self.bin is not None
        self.dir = root / "pg"
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.port = free_port()
        self.dir.mkdir()
        self._as_root = os.geteuid() == 0
        if self._as_root:  # postgres refuses to run as root: hand it the folder
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / args[0]), *args[1:]]
        if self._as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, check=check, capture_output=True, text=True, timeout=120)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/passerelle"

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust",
                  "--no-sync", "-E", "UTF8")
        self.start()
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                  "passerelle")

    def start(self) -> None:
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} "
                   "-c fsync=off -c synchronous_commit=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options,
                  "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop",
                  check=False)


class Redis:
    """redis-server on a port of its own, without persistence (a restart empties it)."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "redis"
        self.dir.mkdir()
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        with (self.dir / "redis.log").open("ab") as log:  # the child keeps its own copy
            self.process = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", str(self.dir)],
                stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: port_open(self.port), 20, "redis-server")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)


@dataclass
class Managed:
    """One long-running program with its log file, restarted when it exits as
    systemd's Restart=always (RestartSec=1) or compose's restart policy would."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    stopping: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        with self._lock:
            self._spawn()
        threading.Thread(target=self._supervise, daemon=True).start()

    def _spawn(self) -> None:
        with self.log.open("ab") as out:  # the child keeps its own copy
            self.process = subprocess.Popen(self.argv, env=self.env, stdout=out,
                                            stderr=subprocess.STDOUT, cwd=REPO)
        self.starts += 1

    def _supervise(self) -> None:
        while not self.stopping:
            process = self.process
            assert process is not None
            process.wait()
            time.sleep(1.0)
            with self._lock:
                if self.stopping:
                    return
                self._spawn()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (the supervisor starts the program again once it exits)."""
        process = self.process
        if process and process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)

    def stop(self) -> None:
        with self._lock:
            self.stopping = True
        self.kill(signal.SIGTERM)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def passerelle_argv(*args: str) -> list[str]:
    script = Path(sys.executable).parent / "passerelle"
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-m", "app.cli", *args]


@dataclass
class Cluster:
    """PostgreSQL, Redis, N web processes behind haproxy, M workers."""

    root: Path
    env: dict[str, str]
    postgres: Postgres
    redis: Redis
    web: list[Managed] = field(default_factory=list)
    web_ports: list[int] = field(default_factory=list)
    workers: list[Managed] = field(default_factory=list)
    proxy: Managed | None = None
    proxy_port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(passerelle_argv(*args), env=self.env, cwd=REPO,
                                capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise AssertionError(f"passerelle {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def add_web(self, threads: int = 8) -> Managed:
        index = len(self.web) + 1
        port = free_port()
        process = Managed(f"web{index}",
                          passerelle_argv("serve", "--host", "127.0.0.1", "--port", str(port),
                                          "--threads", str(threads)),
                          self.env, self.root / f"web{index}.log")
        self.web.append(process)
        self.web_ports.append(port)
        process.start()
        return process

    def web_ready(self, index: int) -> bool:
        answer = httpx.get(f"http://127.0.0.1:{self.web_ports[index]}/readyz", timeout=2)
        return answer.status_code == 200

    def add_worker(self, threads: int = 4) -> Managed:
        index = len(self.workers) + 1
        process = Managed(f"worker{index}", passerelle_argv("worker", "--workers", str(threads)),
                          self.env, self.root / f"worker{index}.log")
        self.workers.append(process)
        process.start()
        return process

    def start_proxy(self, port: int) -> None:
        self.proxy_port = port
        servers = "\n".join(
            f"    server web{i + 1} 127.0.0.1:{port} check" for i, port in
            enumerate(self.web_ports))
        config = (HAPROXY_TEMPLATE.read_text()
                  .replace("bind :80", f"bind 127.0.0.1:{self.proxy_port}")
                  .replace("/etc/haproxy/errors-passerelle/503.http",
                           str(REPO / "deploy" / "haproxy-503.http")))
        head, marker, _servers = config.partition("    # servers\n")
        assert marker, "deploy/haproxy.cfg lost its '# servers' marker"
        path = self.root / "haproxy.cfg"
        path.write_text(head + marker + servers + "\n")
        check = subprocess.run([haproxy_bin(), "-c", "-f", str(path)],  # type: ignore[list-item]
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self.proxy = Managed("haproxy", [haproxy_bin(), "-db", "-f", str(path)],  # type: ignore[list-item]
                             self.env, self.root / "haproxy.log")
        self.proxy.start()
        wait_until(lambda: port_open(self.proxy_port), 20, "haproxy")

    def logs(self) -> str:
        out = []
        for path in sorted(self.root.glob("*.log")) + [self.postgres.log]:
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()
                out.append(f"--- {path.name} (last 40 lines)\n" + "\n".join(lines[-40:]))
        return "\n".join(out)

    def stop(self) -> None:
        for process in [*self.workers, *self.web, *([self.proxy] if self.proxy else [])]:
            process.stop()
        self.redis.stop()
        self.postgres.stop("immediate")


def make_root() -> Path:
    # Not under pytest's tmp_path: its parents are private to root, and PostgreSQL
    # runs as the postgres user.
    root = Path(tempfile.mkdtemp(prefix="passerelle-cluster-"))
    root.chmod(0o755)
    return root
