"""A local pausepatch: its own `nats-server -js` on a free loopback port and the services as
separate OS processes over simulated hosts (libvirt test driver). Used by the demo, the tests and
the benchmarks, so that all three run the system the same way."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.placement import placement_element

REPO = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(predicate: object, timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll `predicate()` until true; raise `TimeoutError` naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


class NatsServer:
    """A `nats-server -js` of our own, in a temp dir, on free loopback ports."""

    def __init__(
        self,
        workdir: Path,
        name: str = "nats",
        config: str | None = None,
        port: int | None = None,
        cluster_port: int | None = None,
        routes: list[str] | None = None,
        cluster_name: str = "pp",
    ) -> None:
        self.workdir = workdir
        self.name = name
        self.ports_chosen = port is None
        """Its ports are free ones picked here (not a given port, as a cluster's nodes have)."""
        self.port = port or free_port()
        self.monitor_port = free_port()
        self.cluster_port = cluster_port
        self.routes = routes or []
        self.cluster_name = cluster_name
        self.config = config
        self.store_dir = workdir / f"{name}-js"
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_once = False
        """It ran (on its ports) at least once: clients may know its URL."""

    @property
    def url(self) -> str:
        """The client URL."""
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0, wait: bool = True) -> NatsServer:
        """Start and (unless `wait` is False) wait until JetStream is healthy.

        A free port is free when picked, not always when the server binds it (another process's
        connection may take it meanwhile: seen once in CI). At its first start, a server whose
        ports were picked here starts again on new ones (twice at most); a restart keeps its
        port, which its clients reconnect to."""
        restarts = 2 if self.ports_chosen and not self.started_once and wait else 0
        while True:
            try:
                return self._start(timeout, wait)
            except RuntimeError as exc:
                if "address already in use" not in str(exc) or restarts == 0:
                    raise
            restarts -= 1
            self.port, self.monitor_port = free_port(), free_port()
            self.log_path.unlink(missing_ok=True)
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def _start(self, timeout: float, wait: bool) -> NatsServer:
        binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
        args = [
            binary,
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-m",
            str(self.monitor_port),
            "-sd",
            str(self.store_dir),
            "-n",
            self.name,
            "-l",
            str(self.log_path),
        ]
        if self.config is not None:
            config_path = self.workdir / f"{self.name}.conf"
            config_path.write_text(self.config)
            args += ["-c", str(config_path)]
        if self.cluster_port is not None:
            args += [
                "--cluster_name",
                self.cluster_name,
                "--cluster",
                f"nats://127.0.0.1:{self.cluster_port}",
            ]
            if self.routes:
                args += ["--routes", ",".join(self.routes)]
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait:
            self.started_once = True
            return self
        try:
            wait_until(self.healthy, timeout, f"nats-server {self.name} on :{self.port}")
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"nats-server did not start: {self.log_tail()}") from None
        self.started_once = True
        return self

    def healthy(self) -> bool:
        """JetStream answers on the monitoring port."""
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"nats-server {self.name} exited: {self.log_tail()}")
        try:
            url = f"http://127.0.0.1:{self.monitor_port}/healthz?js-enabled-only=true"
            with urllib.request.urlopen(url, timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def log_tail(self, lines: int = 20) -> str:
        """The end of the server's log."""
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server (SIGKILL for a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class NatsCluster:
    """A NATS cluster with JetStream on loopback: `size` servers routed to each other."""

    def __init__(self, workdir: Path, size: int = 3, config: str | None = None) -> None:
        self.workdir, self.size, self.config = workdir, size, config
        self.nodes = self._new_nodes()

    def _new_nodes(self) -> list[NatsServer]:
        """`size` nodes on free ports, each routed to the others."""
        cluster_ports = [free_port() for _ in range(self.size)]
        return [
            NatsServer(
                self.workdir,
                name=f"n{i}",
                config=self.config,
                cluster_port=port,
                routes=[f"nats://127.0.0.1:{p}" for p in cluster_ports if p != port],
            )
            for i, port in enumerate(cluster_ports)
        ]

    @property
    def url(self) -> str:
        """Every client URL, comma-separated (what services get in `PP_NATS_URL`)."""
        return ",".join(node.url for node in self.nodes)

    def start(self, timeout: float = 30.0) -> NatsCluster:
        """Start every node, then wait until the cluster is formed: a JetStream meta leader that
        sees every other node as a current peer. A meta leader alone is a quorum, which is not
        enough for a stream replicated on every node (its creation is refused until the last
        node has joined); a node that exited is an error at once. A port that another process
        took between `free_port()` and the node's start is not: the cluster starts again on new
        ports (twice at most)."""
        restarts = 2
        while True:
            for node in self.nodes:
                node.start(wait=False)
            try:
                wait_until(self.formed, timeout, f"a JetStream cluster of {self.size} nodes")
                return self
            except RuntimeError as exc:
                self.stop()
                if "address already in use" not in str(exc) or restarts == 0:
                    raise
            restarts -= 1
            for node in self.nodes:  # a fresh start, nothing of the cluster that did not form
                shutil.rmtree(node.store_dir, ignore_errors=True)
            self.nodes = self._new_nodes()

    def _meta(self, node: NatsServer) -> dict[str, Any]:
        """`node`'s view of the meta cluster ({} while it does not answer)."""
        try:
            url = f"http://127.0.0.1:{node.monitor_port}/jsz"
            with urllib.request.urlopen(url, timeout=1) as resp:
                meta: dict[str, Any] = json.load(resp).get("meta_cluster") or {}
                return meta
        except (OSError, ValueError):
            return {}

    def formed(self) -> bool:
        """Every node runs, and the meta leader sees all the others as current peers."""
        for node in self.nodes:
            if node.proc is None or node.proc.poll() is not None:
                raise RuntimeError(f"nats-server {node.name} exited: {node.log_tail()}")
        for node in self.nodes:
            meta = self._meta(node)
            if meta.get("leader") == node.name:
                current = [r for r in meta.get("replicas") or [] if r.get("current")]
                return len(current) == len(self.nodes) - 1
        return False

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()


@dataclass
class ServiceProcess:
    """One service running as its own OS process (`python -m services.<module> ...`)."""

    name: str
    module: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        """Start it with the project's own interpreter, logs to `log_path`."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"services.{self.module}", *self.args],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        return self

    @property
    def running(self) -> bool:
        """The process has not exited."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 40.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout` (a host-agent may finish a window first)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """kill -9: a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        """The end of its log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


@dataclass
class SimVM:
    """A VM of a simulated host, with its placement."""

    name: str
    availability_set: str | None = None
    update_domain: int | None = None
    fault_domain: int | None = None
    ip: str | None = None
    running: bool = True


def sim_node_xml(vms: list[SimVM]) -> str:
    """A libvirt test-driver node document (`test:///path/node.xml`) holding `vms`, each with its
    placement in `<metadata>` under the project's namespace."""
    parts = ["<node>"]
    for vm in vms:
        placement = placement_element(
            {
                "availability_set": vm.availability_set,
                "update_domain": vm.update_domain,
                "fault_domain": vm.fault_domain,
                "ip": vm.ip,
            }
        )
        # The test driver's own namespace sets the initial state (5 = shut off).
        state = "" if vm.running else "\n    <test:runstate>5</test:runstate>"
        parts.append(
            f"""  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
    <name>{vm.name}</name>
    <uuid>{uuid.uuid5(uuid.NAMESPACE_URL, "pausepatch:" + vm.name)}</uuid>
    <memory>131072</memory>
    <vcpu>1</vcpu>
    <os><type>hvm</type></os>
    <metadata>{placement}</metadata>{state}
  </domain>"""
        )
    parts.append("</node>")
    return "\n".join(parts) + "\n"


@dataclass
class LocalStack:
    """nats-server plus the four services as processes, in one work directory."""

    workdir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    nats: NatsServer | None = None
    cluster: NatsCluster | None = None
    services: dict[str, ServiceProcess] = field(default_factory=dict)

    def start_nats(self, config: str | None = None) -> NatsServer:
        """Our own nats-server."""
        self.nats = NatsServer(self.workdir, config=config).start()
        return self.nats

    def start_nats_cluster(self, size: int = 3) -> NatsCluster:
        """Our own NATS cluster; services then replicate the stream and buckets on all nodes."""
        self.cluster = NatsCluster(self.workdir, size).start()
        self.extra_env.setdefault("PP_STREAM_REPLICAS", str(size))
        return self.cluster

    @property
    def nats_url(self) -> str:
        """The URL(s) services connect to."""
        if self.cluster is not None:
            return self.cluster.url
        assert self.nats is not None, "start_nats() first"
        return self.nats.url

    def env(self, **extra: str) -> dict[str, str]:
        """Environment of a service process."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PP_", "OTEL_"))}
        env.update(
            {
                "PP_NATS_URL": self.nats_url,
                "PP_STATE_DIR": str(self.workdir / "state"),
                "PP_LOG_FORMAT": "text",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        env.update(extra)
        return env

    def start_service(
        self, name: str, module: str, args: Sequence[str] = (), **env: str
    ) -> ServiceProcess:
        """Start one service process named `name`."""
        proc = ServiceProcess(
            name, module, list(args), self.env(**env), self.workdir / "logs" / f"{name}.log"
        ).start()
        self.services[name] = proc
        return proc

    def add_sim_host(self, host: str, vms: list[SimVM], **env: str) -> ServiceProcess:
        """A simulated host: a test-driver node file and its host-agent."""
        node = self.workdir / "nodes" / f"{host}.xml"
        node.parent.mkdir(parents=True, exist_ok=True)
        node.write_text(sim_node_xml(vms))
        return self.start_service(
            f"host-agent-{host}",
            "host_agent",
            ["--host", host, "--libvirt-uri", f"test://{node}"],
            **env,
        )

    def add_sim_fleet(self, name: str, hosts: dict[str, list[SimVM]], **env: str) -> ServiceProcess:
        """Many simulated hosts served by one host-agent process (a fleet file)."""
        nodes = self.workdir / "nodes"
        nodes.mkdir(parents=True, exist_ok=True)
        lines = []
        for host, vms in hosts.items():
            node = nodes / f"{host}.xml"
            node.write_text(sim_node_xml(vms))
            lines.append(json.dumps({"host": host, "libvirt_uri": f"test://{node}"}))
        fleet = self.workdir / f"{name}.fleet"
        fleet.write_text("\n".join(lines) + "\n")
        return self.start_service(name, "host_agent", ["--fleet", str(fleet)], **env)

    def stop(self) -> None:
        """Stop every service, then the server."""
        for proc in reversed(list(self.services.values())):
            proc.stop()
        if self.nats is not None:
            self.nats.stop()
        if self.cluster is not None:
            self.cluster.stop()


@contextlib.contextmanager
def temp_workdir(prefix: str = "pausepatch-") -> Iterator[Path]:
    """A temporary work directory, removed afterwards (kept with `PP_KEEP_WORKDIR=1` in the
    environment: the services' logs, nats-server's store and log, for a run to look into)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if not os.environ.get("PP_KEEP_WORKDIR"):
            shutil.rmtree(path, ignore_errors=True)
