"""Real QEMU guests under libvirtd, for the tests that need a real hypervisor.

The shell side lives in ``deploy/libvirt/``: ``libvirtd-up.sh`` starts the system libvirtd
without systemd and ``build-guest.sh`` builds a tiny guest (Debian kernel + busybox initramfs
running ``qemu-ga``) from Debian packages. This module is what the pytest fixtures call: start the
daemon, build the guest, boot guests that carry their placement in the domain XML, wait until
their guest agent answers, and remove them again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import libvirt

from shared.placement import Placement, placement_element

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY_DIR = REPO_ROOT / "deploy" / "libvirt"
GUEST_DIR = REPO_ROOT / "build" / "guest"
QEMU_GUEST_DIR = Path("/var/lib/pausepatch-tests/guest")
"""Where QEMU (user libvirt-qemu) reads the guest from: the checkout may sit below a directory
it cannot enter (a clone under `mktemp -d`, mode 0700)."""
SYSTEM_URI = "qemu:///system"
CONSOLE_LOG_DIR = Path("/var/log/libvirt/qemu")
AGENT_POLL_S = 0.5
AGENT_TIMEOUT_S = 60.0
"""Boot to agent under TCG, three guests on two cores: ~10 s idle, ~27 s beside a CPU-bound test."""


# Every failure also raises libvirtError; without a handler libvirt would print each one to
# stderr as well, e.g. once per poll while a guest agent is still starting.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def _run_script(script: str, *args: str) -> None:
    """Run a deploy/libvirt script; if it fails, raise RuntimeError with all of its output."""
    result = subprocess.run(
        [str(DEPLOY_DIR / script), *args], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{script} failed (exit {result.returncode}):\n{result.stdout}{result.stderr}"
        )


@contextlib.contextmanager
def _connection(uri: str) -> Iterator[libvirt.virConnect]:
    """A libvirt connection closed on exit."""
    conn = libvirt.open(uri)
    try:
        yield conn
    finally:
        conn.close()


def ensure_libvirtd() -> str:
    """Start libvirtd (and virtlogd) unless already running; return the URI to connect to.

    Installs the Debian packages first if missing. Raises RuntimeError with the script's output
    (including the daemon's log tail) if the daemon cannot be started.
    """
    _run_script("libvirtd-up.sh")
    return SYSTEM_URI


def build_guest() -> tuple[Path, Path]:
    """Build the test guest, or reuse it if its packages did not change; return (kernel, initrd).

    Raises RuntimeError with the script's output if the build fails.
    """
    _run_script("build-guest.sh", str(GUEST_DIR))
    # One directory per build (its stamp names the packages): a session never replaces the
    # files another one's guests boot from.
    key = hashlib.sha256((GUEST_DIR / ".stamp").read_bytes()).hexdigest()[:16]
    target = QEMU_GUEST_DIR / key
    if not (target / "initrd.img").is_file():
        staging = QEMU_GUEST_DIR / f".{key}.{os.getpid()}"
        staging.mkdir(parents=True, exist_ok=True)
        for name in ("vmlinuz", "initrd.img"):
            shutil.copyfile(GUEST_DIR / name, staging / name)
            (staging / name).chmod(0o644)
        for directory in (staging, QEMU_GUEST_DIR, QEMU_GUEST_DIR.parent):
            directory.chmod(0o755)
        try:
            staging.rename(target)
        except OSError:  # another session published the same build meanwhile
            shutil.rmtree(staging)
    return target / "vmlinuz", target / "initrd.img"


def console_log(name: str) -> Path:
    """Where the guest's serial console (kernel messages, qemu-ga errors) is written."""
    return CONSOLE_LOG_DIR / f"{name}-console.log"


def domain_xml(
    name: str, kernel: Path, initrd: Path, placement: Placement, guest_agent: bool = True
) -> str:
    """Domain XML of a test guest: TCG, 128 MiB, 1 vCPU, direct kernel boot, no disk.

    The guest agent talks over a virtio-serial channel (libvirt picks the socket path); the serial
    console goes to :func:`console_log`. USB and the balloon are off: nothing uses them, and under
    TCG every emulated device costs boot time.
    """
    return f"""\
<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <metadata>
    {placement_element(placement)}
  </metadata>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(kernel))}</kernel>
    <initrd>{escape(str(initrd))}</initrd>
    <cmdline>console=ttyS0 quiet</cmdline>
  </os>
  <features>
    <acpi/>
  </features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <serial type='pty'>
      <log file={quoteattr(str(console_log(name)))} append='off'/>
      <target port='0'/>
    </serial>
    <console type='pty'>
      <target type='serial' port='0'/>
    </console>
{_AGENT_CHANNEL if guest_agent else ""}    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


_AGENT_CHANNEL = """    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
"""


def _remove_domain(dom: libvirt.virDomain) -> None:
    """Power off (if running) and undefine (if persistent) one domain; one that is already gone
    (removed by someone else since it was listed) is fine."""
    try:
        persistent = dom.isPersistent()  # asked first: a transient domain is gone once destroyed
        if dom.isActive():
            dom.destroy()
        if persistent:
            dom.undefine()
    except libvirt.libvirtError as error:
        if error.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise


def _lookup(conn: libvirt.virConnect, name: str) -> libvirt.virDomain | None:
    """The domain of that name, or None if there is none."""
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as error:
        if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


def boot_guests(
    uri: str,
    names_and_placements: Mapping[str, Placement],
    kernel: Path,
    initrd: Path,
    without_agent: Collection[str] = (),
) -> list[str]:
    """Define and start one guest per name; return the names in order.

    Guests are persistent, so that a Reboot maintenance can shut them down and start them again.
    A leftover domain of the same name (from an aborted run) is removed first. The guests boot in
    parallel; use :func:`wait_guest_agent` before talking to them.
    """
    with _connection(uri) as conn:
        for name, placement in names_and_placements.items():
            leftover = _lookup(conn, name)
            if leftover is not None:
                _remove_domain(leftover)
            xml = domain_xml(name, kernel, initrd, placement, name not in without_agent)
            conn.defineXML(xml).create()
    return list(names_and_placements)


def wait_guest_agent(uri: str, name: str, timeout: float = AGENT_TIMEOUT_S) -> float:
    """Wait until the guest's agent answers ``getTime``; return the seconds waited.

    "Agent unresponsive" (the agent is not up yet) means keep waiting; any other libvirt error is
    raised at once. On timeout, raises TimeoutError with the tail of the guest's console log.
    """
    started = time.monotonic()
    with _connection(uri) as conn:
        dom = conn.lookupByName(name)
        while True:
            try:
                dom.getTime()
                return time.monotonic() - started
            except libvirt.libvirtError as error:
                if error.get_error_code() != libvirt.VIR_ERR_AGENT_UNRESPONSIVE:
                    raise
                if time.monotonic() - started >= timeout:
                    raise TimeoutError(
                        f"guest agent of {name} did not answer within {timeout:.0f} s; "
                        f"console log {console_log(name)} ends with:\n{_log_tail(name)}"
                    ) from error
            time.sleep(AGENT_POLL_S)


def _log_tail(name: str, lines: int = 20) -> str:
    """The last lines of a guest's console log, or why there are none."""
    try:
        return "\n".join(console_log(name).read_text(errors="replace").splitlines()[-lines:])
    except OSError as error:
        return f"(unreadable: {error})"


def destroy_guests(uri: str, prefix: str) -> list[str]:
    """Power off and undefine every domain whose name starts with prefix; return their names.

    For cleaning up after a crashed run; :func:`running_guests` removes its own guests.
    """
    removed = []
    with _connection(uri) as conn:
        for dom in conn.listAllDomains():
            if dom.name().startswith(prefix):
                _remove_domain(dom)
                removed.append(dom.name())
    return removed


@contextlib.contextmanager
def running_guests(
    names_and_placements: Mapping[str, Placement], agent_timeout: float = AGENT_TIMEOUT_S
) -> Iterator[tuple[str, list[str]]]:
    """Guests booted and answering through their agent for the block; yields (uri, names).

    Starts libvirtd and builds the guest as needed; removes the guests afterwards, also when
    the block (or the wait for an agent) fails.
    """
    uri = ensure_libvirtd()
    kernel, initrd = build_guest()
    names = boot_guests(uri, names_and_placements, kernel, initrd)
    try:
        # They boot in parallel: after the first agent answers the others follow within seconds.
        for name in names:
            wait_guest_agent(uri, name, agent_timeout)
        yield uri, names
    finally:
        with _connection(uri) as conn:
            for name in names:
                dom = _lookup(conn, name)
                if dom is not None:
                    _remove_domain(dom)
