"""The host-agent's systemd unit for a bare-metal hypervisor host, checked by `systemd-analyze
verify` (it works without systemd as PID 1: it loads the unit file offline) and against what the
agent needs: libvirt before it, restarts forever, time to finish a window on stop, hardening."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shared.contracts import MAX_PAUSE_BUDGET_S
from shared.devstack import REPO

UNIT = REPO / "deploy" / "systemd" / "pausepatch-host-agent.service"
INSTALLED_PYTHON = "/opt/pausepatch/venv/bin/python"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)\s*(s|min)?", value)
    assert match, value
    return float(match.group(1)) * (60 if match.group(2) == "min" else 1)


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze (Debian package systemd)")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify also checks that ExecStart's program exists: the installed virtualenv is not here,
    # so the copy under test runs this interpreter instead (everything else is byte for byte).
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_PYTHON} " in text
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(INSTALLED_PYTHON, sys.executable))
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Unknown keys or bad values are only warnings for systemd: any output is a failure here.
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def test_unit_starts_after_libvirt_and_never_leaves_a_window_half_done() -> None:
    config = unit()
    unit_section, service = config["Unit"], config["Service"]
    assert "libvirtd.service" in unit_section["After"].split()
    assert unit_section["StartLimitIntervalSec"] == "0"
    assert service["Restart"] == "always"
    assert service["ExecStart"].split()[1:] == ["-m", "services.host_agent"]
    assert (REPO / "services" / "host_agent" / "__main__.py").exists()
    # On stop only the agent gets SIGTERM, and has the whole budget plus its grace to resume.
    assert service["KillMode"] == "mixed"
    assert seconds(service["TimeoutStopSec"]) > MAX_PAUSE_BUDGET_S + 10
    # Its journal lives in a state directory that survives restarts, where the agent looks.
    assert service["StateDirectory"] == "pausepatch"
    assert "PP_STATE_DIR=/var/lib/pausepatch" in service["Environment"].split()
    assert config["Install"]["WantedBy"] == "multi-user.target"


def test_unit_is_hardened_where_a_host_patch_allows() -> None:
    service = unit()["Service"]
    for option in (
        "NoNewPrivileges",
        "PrivateTmp",
        "ProtectHome",
        "ProtectClock",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "LockPersonality",
    ):
        assert service[option] == "yes", option
    # Real-time stays allowed: the pause window runs SCHED_FIFO (PP_RT_PRIORITY).
    assert service.get("RestrictRealtime", "no") == "no"
    assert set(service["RestrictAddressFamilies"].split()) == {
        "AF_UNIX",
        "AF_INET",
        "AF_INET6",
        "AF_NETLINK",
    }
    # The patch updates this host: a read-only /usr or /etc would make every update fail.
    assert "ProtectSystem" not in service
    assert int(service["OOMScoreAdjust"]) < 0
