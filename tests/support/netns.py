"""Network namespaces a test creates for itself: a "host" namespace whose loopback carries the
metadata address 169.254.169.254 (where the notifier listens on port 80) and a "guest" namespace
holding the VMs' addresses on one end of a veth pair. Nothing of this touches the root namespace's
routes: traffic to 169.254.169.254 exists only between these two namespaces.

The notifier in the host namespace reaches the test's nats-server (on the root namespace's
loopback) through `NatsBridge`, a TCP relay whose listening socket is created inside the namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shared.devstack import REPO, ServiceProcess

METADATA_ADDRESS = "169.254.169.254"
CLONE_NEWNET = 0x40000000


def available() -> str | None:
    """None when this machine can create network namespaces, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    probe = f"ppprobe{uuid.uuid4().hex[:6]}"
    created = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if created.returncode != 0:
        return f"ip netns add failed: {created.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def ip(*args: str) -> None:
    """Run `ip ARGS`, raising with its message on failure."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@contextlib.contextmanager
def entered(namespace: str) -> Iterator[None]:
    """Run the block's socket creation inside `namespace` (this thread only, then back)."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {namespace} failed")
        try:
            yield
        finally:
            if libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the root namespace failed")
    finally:
        os.close(target)
        os.close(home)


@dataclass
class MetadataNetwork:
    """Two namespaces joined by a veth pair: `host` (169.254.169.254 on its loopback, the veth
    end 192.0.2.1) and `guest` (the VMs' addresses; 169.254.169.254 routed to `host`).

    Addresses come from TEST-NET-1 (192.0.2.0/24) and exist only inside these namespaces.
    """

    guest_addresses: Sequence[str]
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])

    @property
    def host(self) -> str:
        return f"pp-host-{self.tag}"

    @property
    def guest(self) -> str:
        return f"pp-guest-{self.tag}"

    def create(self) -> MetadataNetwork:
        """Create and wire both namespaces."""
        host_if, guest_if = f"pph{self.tag}", f"ppg{self.tag}"
        ip("netns", "add", self.host)
        ip("netns", "add", self.guest)
        ip("-n", self.host, "link", "set", "lo", "up")
        ip("-n", self.guest, "link", "set", "lo", "up")
        ip("-n", self.host, "addr", "add", f"{METADATA_ADDRESS}/32", "dev", "lo")
        ip("-n", self.host, "link", "add", host_if, "type", "veth", "peer", "name", guest_if)
        ip("-n", self.host, "link", "set", guest_if, "netns", self.guest)
        ip("-n", self.host, "addr", "add", "192.0.2.1/24", "dev", host_if)
        for address in self.guest_addresses:
            ip("-n", self.guest, "addr", "add", f"{address}/24", "dev", guest_if)
        ip("-n", self.host, "link", "set", host_if, "up")
        ip("-n", self.guest, "link", "set", guest_if, "up")
        ip(
            "-n",
            self.guest,
            "route",
            "add",
            f"{METADATA_ADDRESS}/32",
            "via",
            "192.0.2.1",
            "src",
            self.guest_addresses[0],
        )
        return self

    def delete(self) -> None:
        """Remove both namespaces (and with them the veth pair)."""
        for namespace in (self.guest, self.host):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


class NatsBridge:
    """Relays TCP from 127.0.0.1:`port` inside `namespace` to 127.0.0.1:`target` of the root
    namespace (the listening socket is made inside the namespace; connections out are not)."""

    def __init__(self, namespace: str, target: int) -> None:
        self.namespace = namespace
        self.target = target
        self.port = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> NatsBridge:
        with entered(self.namespace):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.server = await asyncio.start_server(self._relay, sock=sock)
        return self

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        for task in (
            asyncio.create_task(pipe(reader, up_writer)),
            asyncio.create_task(pipe(up_reader, writer)),
        ):
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@dataclass
class NamespacedProcess(ServiceProcess):
    """A process started inside a network namespace (`ip netns exec`), logging to a file.

    `module` is a `services.` module, or a path to a script when `script` is set.
    """

    namespace: str = ""
    script: bool = False

    def start(self) -> NamespacedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        target = [self.module] if self.script else ["-m", f"services.{self.module}"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.namespace, sys.executable, *target, *self.args],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def log_text(self) -> str:
        """Everything it logged so far."""
        return Path(self.log_path).read_text(errors="replace") if self.log_path.exists() else ""
