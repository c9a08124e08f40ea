"""The compose stack and its images, checked without a Docker engine: `docker-compose config`
validates the file, and the resolved configuration is held against the code (every service, env
var, port, network, volume, NATS user and health check it names exists), since the validator
itself misses most of that."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dockerfile
import pytest
import yaml
from opentelemetry import environment_variables as otel_api_env
from opentelemetry.sdk import environment_variables as otel_env

from shared.devstack import REPO
from shared.settings import BusSettings

COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
NATS_DIR = REPO / "deploy" / "nats"
NODES_DIR = REPO / "deploy" / "compose-nodes"
HOSTS = sorted(p.stem for p in NODES_DIR.glob("*.xml"))
CLUSTER = {
    "COMPOSE_PROFILES": "cluster",
    "NATS_CONFIG": "cluster.conf",
    "NATS_URL": "nats://nats:4222,nats://nats-2:4222,nats://nats-3:4222",
    "STREAM_REPLICAS": "3",
}
"""The four values .env says to set for the 3-node NATS cluster."""

JAEGER_PORTS = {"ui": 16686, "otlp_http": 4318, "health": 13133}
NATS_PORTS = {"client": 4222, "monitor": 8222}
SERVICE_MODULES = {
    "planner": "services.planner.main",
    "notifier": "services.notifier.main",
    "clock-sync": "services.clock_sync.main",
    "host-agent": "services.host_agent.main",
}
"""Dockerfile target -> the FastStream app module it runs."""

# Prints, for every service module, the PP_* variables its settings class reads.
_SETTINGS_PROBE = """
import importlib, json, sys
from shared.settings import BusSettings
found = {}
for target, module in json.loads(sys.argv[1]).items():
    names = vars(importlib.import_module(module)).values()
    classes = [c for c in names if isinstance(c, type) and issubclass(c, BusSettings)]
    settings = max(classes, key=lambda c: len(c.__mro__))
    found[target] = sorted("PP_" + name.upper() for name in settings.model_fields)
print(json.dumps(found))
"""


def compose_config(extra_env: dict[str, str] | None = None) -> tuple[dict[str, Any], str]:
    """`docker-compose config`: the resolved file (anchors merged, .env interpolated), stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PP_", "COMPOSE_"))}
    env.update(extra_env or {})
    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout), result.stderr


@cache
def resolved() -> dict[str, Any]:
    return compose_config({"COMPOSE_PROFILES": "cluster,tools"})[0]


@cache
def settings_env() -> dict[str, list[str]]:
    """PP_* variables each service's settings class reads (imported in a child process)."""
    out = subprocess.run(
        [sys.executable, "-c", _SETTINGS_PROBE, json.dumps(SERVICE_MODULES)],
        cwd=REPO,
        env={**os.environ, "PP_HOST": "hv-01", "PP_LOG_FORMAT": "text"},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def dotenv() -> dict[str, str]:
    values = {}
    for line in (REPO / ".env").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def dockerfile_stages() -> dict[str, tuple[str, list[dockerfile.Command]]]:
    """Stage name -> (the stage it is built FROM, its instructions), by BuildKit's own parser."""
    stages: dict[str, tuple[str, list[dockerfile.Command]]] = {}
    current: list[dockerfile.Command] = []
    for command in dockerfile.parse_file(str(DOCKERFILE)):
        if command.cmd == "FROM":
            parent, _, name = command.value
            current = []
            stages[name] = (parent, current)
        elif stages:
            current.append(command)
    return stages


def stage_chain(target: str) -> list[dockerfile.Command]:
    """The instructions of `target` and of every stage it is built FROM, base first."""
    stages = dockerfile_stages()
    chain: list[list[dockerfile.Command]] = []
    while target in stages:
        parent, instructions = stages[target]
        chain.append(instructions)
        target = parent
    return [command for instructions in reversed(chain) for command in instructions]


def image_env(target: str) -> dict[str, str]:
    """The ENV of an image target (its own and its base stages')."""
    env: dict[str, str] = {}
    for command in stage_chain(target):
        if command.cmd == "ENV":
            env.update(zip(command.value[::2], command.value[1::2], strict=True))
    return env


def mounts(svc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Target path -> mount, from the short (compose v1) or long (compose v2) syntax."""
    found = {}
    for volume in svc.get("volumes") or []:
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            kind = "bind" if source.startswith(("/", ".")) else "volume"
            volume = {"type": kind, "source": source, "target": target, "read_only": mode == ["ro"]}
        found[volume["target"]] = volume
    return found


def ports(svc: dict[str, Any]) -> set[tuple[str | None, int]]:
    """(host address, container port) of every published port, from either syntax."""
    found = set()
    for port in svc.get("ports") or []:
        if isinstance(port, str):
            *host, _published, target = port.split("/")[0].split(":")
            found.add((host[0] if host else None, int(target)))
        else:
            found.add((port.get("host_ip"), int(port["target"])))
    return found


def pausepatch_services() -> dict[str, tuple[str, dict[str, Any]]]:
    """Compose services built from our Dockerfile: name -> (target, service)."""
    return {
        name: (svc["build"]["target"], svc)
        for name, svc in resolved()["services"].items()
        if "build" in svc
    }


def test_compose_file_is_valid_in_both_nats_topologies() -> None:
    for extra in ({}, {"COMPOSE_PROFILES": "tools"}, CLUSTER):
        config, stderr = compose_config(extra)
        # Every variable the file uses is defined (compose only warns about a missing one).
        assert "not set" not in stderr, stderr
        assert config["services"]
    single, _ = compose_config()
    profiles = {name: svc.get("profiles") for name, svc in single["services"].items()}
    assert profiles == {
        **dict.fromkeys(("nats", "jaeger", "planner", "notifier", "clock-sync"), None),
        **{f"host-agent-{h}": None for h in HOSTS},
        "nats-2": ["cluster"],
        "nats-3": ["cluster"],
        "cli": ["tools"],
    }
    cluster, _ = compose_config(CLUSTER)
    for name in ("nats", "nats-2", "nats-3"):
        assert "/etc/nats/cluster.conf" in cluster["services"][name]["command"]
    routes = re.findall(r"nats://([\w-]+):6222", (NATS_DIR / "cluster.conf").read_text())
    assert sorted(routes) == ["nats", "nats-2", "nats-3"]


def test_every_service_builds_an_existing_target_that_runs_an_existing_app() -> None:
    stages = dockerfile_stages()
    for name, (target, svc) in pausepatch_services().items():
        assert target in stages, (name, target)
        assert svc["image"].startswith(f"pausepatch/{target}:"), name
        if target == "cli":
            continue
        module = SERVICE_MODULES[target]
        cmd = next(c for c in stages[target][1] if c.cmd == "CMD")
        package = module.removesuffix(".main")
        assert cmd.json and list(cmd.value) == ["python", "-m", package]
        assert (REPO / package.replace(".", "/") / "__main__.py").exists()
    targets = {t for t, _ in pausepatch_services().values()}
    assert targets == {*SERVICE_MODULES, "cli"}
    hosts = sorted(
        svc["environment"]["PP_HOST"]
        for _, (target, svc) in pausepatch_services().items()
        if target == "host-agent"
    )
    assert hosts == HOSTS == ["hv-01", "hv-02", "hv-03"]


def test_every_env_var_is_read_by_the_service_it_is_given_to() -> None:
    known = settings_env()
    otel = {n for m in (otel_env, otel_api_env) for n in dir(m) if n.startswith("OTEL_")}
    for name, (target, svc) in pausepatch_services().items():
        readable = set(known["planner"]) if target == "cli" else set(known[target])
        given = {**image_env(target), **(svc.get("environment") or {})}
        for var in given:
            if var.startswith("PP_"):
                assert var in readable, f"{name}: {var} is read by no setting of {target}"
            elif var.startswith("OTEL_"):
                assert var in otel, f"{name}: {var} is not an OpenTelemetry variable"


def test_addresses_and_ports_point_at_services_that_listen_there() -> None:
    services = resolved()["services"]
    nats_conf = (NATS_DIR / "nats.conf").read_text()
    assert re.search(rf"^port: {NATS_PORTS['client']}$", nats_conf, re.M)
    assert re.search(rf"^http_port: {NATS_PORTS['monitor']}$", nats_conf, re.M)
    for name, (target, svc) in pausepatch_services().items():
        env = svc["environment"]
        for url in env["PP_NATS_URL"].split(","):
            parts = urlsplit(url)
            assert parts.hostname in services and parts.port == NATS_PORTS["client"], (name, url)
        if target == "cli":
            continue
        otlp = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert otlp.hostname == "jaeger" and otlp.port == JAEGER_PORTS["otlp_http"], name
    jaeger = services["jaeger"]
    assert jaeger["image"] == f"jaegertracing/jaeger:{dotenv()['JAEGER_VERSION']}"
    assert dotenv()["JAEGER_VERSION"] == "2.20.0"
    assert ports(jaeger) == {("127.0.0.1", JAEGER_PORTS["ui"])}
    assert str(JAEGER_PORTS["health"]) in " ".join(jaeger["healthcheck"]["test"])

    notifier = services["notifier"]
    listen_port = int(notifier["environment"]["PP_LISTEN"].rpartition(":")[2])
    assert ports(notifier) == {("127.0.0.1", listen_port)}
    assert ports(services["nats"]) == {("127.0.0.1", NATS_PORTS["client"])}
    assert str(NATS_PORTS["monitor"]) in " ".join(services["nats"]["healthcheck"]["test"])


def test_networks_volumes_and_dependencies_are_all_defined() -> None:
    config = resolved()
    services = config["services"]
    for name, svc in services.items():
        for network in svc.get("networks") or {}:
            assert network in config["networks"], (name, network)
        for volume in mounts(svc).values():
            if volume["type"] == "volume":
                assert volume["source"] in config["volumes"], (name, volume)
            else:
                assert Path(volume["source"]).exists(), (name, volume)
        for dependency, spec in (svc.get("depends_on") or {}).items():
            assert dependency in services, (name, dependency)
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], (name, dependency)
        if "build" in svc and name != "cli":
            assert svc["restart"] == "unless-stopped" and "healthcheck" in svc, name
    for name in ("nats", "jaeger"):
        assert services[name]["restart"] == "unless-stopped" and services[name]["healthcheck"]


def test_each_host_agent_runs_its_own_node_file_as_its_own_nats_user() -> None:
    services = resolved()["services"]
    nats_env = services["nats"]["environment"]
    auth = (NATS_DIR / "auth.conf").read_text()
    users = dict(re.findall(r'user: "([^"]+)"\s+password: \$(\w+)', auth))
    # Every password the server config reads reaches the server's environment.
    assert set(users.values()) <= set(nats_env), set(users.values()) - set(nats_env)
    for variable, password in nats_env.items():
        # nats-server parses the value as a config token (see deploy/nats/nats_auth.py).
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", password), variable
    for name, (target, svc) in pausepatch_services().items():
        env = svc["environment"]
        if target == "cli":
            assert urlsplit(env["PP_NATS_URL"]).username == "operator"
            continue
        user = env["PP_NATS_USER"]
        assert user in users, (name, user)
        # The service's password is the very one the server checks for that user.
        assert env["PP_NATS_PASSWORD"] == nats_env[users[user]], name
        if target != "host-agent":
            assert user == target
            continue
        host = env["PP_HOST"]
        assert user == f"host-agent-{host}" and name == f"host-agent-{host}"
        node_path = urlsplit(env["PP_LIBVIRT_URI"]).path
        mounted = mounts(svc)
        assert Path(mounted[node_path]["source"]) == NODES_DIR / f"{host}.xml"
        assert mounted[node_path].get("read_only") is True
        state = mounted[image_env(target)["PP_STATE_DIR"]]
        assert state["type"] == "volume", "the pause journal must survive a restart"
        assert int(re.sub(r"\D", "", svc["stop_grace_period"])) >= 40


@pytest.mark.parametrize("host", HOSTS)
def test_node_files_hold_placed_vms_for_the_test_driver(host: str) -> None:
    from services.host_agent.libvirt_hypervisor import LibvirtHypervisor

    hypervisor = LibvirtHypervisor(f"test://{NODES_DIR / f'{host}.xml'}")
    try:
        vms, skipped = hypervisor.list_vms()
    finally:
        hypervisor.close()
    assert skipped == [] and len(vms) == 4
    assert all(vm.state == "running" and vm.ip for vm in vms)
    assert {vm.availability_set for vm in vms} == {"web", "api", "db", None}


def test_health_checks_call_existing_checks() -> None:
    for name, (target, svc) in pausepatch_services().items():
        if target == "cli":
            continue
        test = svc["healthcheck"]["test"]
        assert test[:2] == ["CMD", "pp-healthcheck"] and test[2] == target, name
    script = REPO / "deploy" / "docker" / "healthcheck.py"
    usage = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, check=True
    ).stdout
    for target in SERVICE_MODULES:
        assert target in usage
    copies = [c.value for c in stage_chain("planner") if c.cmd == "COPY"]
    assert any(value[-1] == "/usr/local/bin/pp-healthcheck" for value in copies)


def test_images_run_unprivileged_and_only_host_agent_carries_libvirt() -> None:
    for target in (*SERVICE_MODULES, "cli"):
        chain = stage_chain(target)
        users = [c.value[0] for c in chain if c.cmd == "USER"]
        assert users and users[-1] not in ("root", "0"), target
        has_libvirt = any("libvirt" in " ".join(c.value) for c in chain)
        assert has_libvirt == (target == "host-agent"), target
    # So the other images must run without libvirt-python: import them with it missing.
    probe = (
        "import sys; sys.modules['libvirt'] = None\n"
        "import services.planner.main, services.notifier.main, services.clock_sync.main\n"
        "import shared.cli\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO,
        env={**os.environ, "PP_LOG_FORMAT": "text"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    # The build context holds what the COPY instructions name, and nothing else.
    allowed = {
        line[1:].rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for command in dockerfile.parse_file(str(DOCKERFILE)):
        if command.cmd == "COPY" and not any(f.startswith("--from") for f in command.flags):
            for source in command.value[:-1]:
                assert source.rstrip("/").replace("[d]", "d") in allowed, source


@pytest.mark.parametrize("target", ["planner", "clock-sync", "host-agent"])
def test_service_readme_names_its_settings_and_how_to_run_it_alone(target: str) -> None:
    readme = (REPO / SERVICE_MODULES[target].replace(".", "/")).parent / "README.md"
    text = readme.read_text()
    common = {"PP_" + name.upper() for name in BusSettings.model_fields}
    own = set(settings_env()[target]) - common
    wanted = own | {"PP_NATS_URL", "PP_NATS_USER", "PP_NATS_PASSWORD"}
    missing = sorted(var for var in wanted if var not in text)
    assert missing == [], f"{readme.relative_to(REPO)} does not mention {missing}"
    assert "shared/settings.py" in text  # where the common bus settings are listed
    assert f"python -m {SERVICE_MODULES[target].removesuffix('.main')}" in text
