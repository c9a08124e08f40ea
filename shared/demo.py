"""`make demo`: the whole system on this machine. Its own nats-server, the four services as
separate processes, three simulated hosts (libvirt test driver, 12 VMs), one rollout with a real
patch command, live progress, then the pause report. Everything it started is stopped."""

from __future__ import annotations

import asyncio

from shared.cli import console, print_hosts, print_report, watch
from shared.client import CommandError, PlannerClient, connect
from shared.devstack import LocalStack, SimVM, free_port, temp_workdir

# Three hosts, four VMs each: three availability sets spread over update domains, and one
# standalone VM per host. Hosts h1 and h2 carry different UDs of "web": never in one wave.
FLEET = {
    "hv-01": [("web-1", "web", 0), ("api-1", "api", 0), ("db-1", "db", 0), ("batch-1", None, None)],
    "hv-02": [("web-2", "web", 1), ("api-2", "api", 1), ("db-2", "db", 1), ("batch-2", None, None)],
    "hv-03": [("web-3", "web", 2), ("api-3", "api", 0), ("db-3", "db", 0), ("batch-3", None, None)],
}
PATCH_COMMAND = "sleep 0.25"  # what the demo "applies": a real process, killed if it overruns


async def _wait_hosts(client: PlannerClient, count: int, timeout: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        try:
            if len(await client.hosts()) >= count:
                return
        except CommandError:
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError("the simulated hosts never reported to the planner")


async def run_demo() -> int:
    """Run the demo; 0 when the rollout completed with no failure."""
    with temp_workdir("pausepatch-demo-") as workdir:
        stack = LocalStack(workdir, extra_env={"PP_HEARTBEAT_S": "5"})
        try:
            nats = stack.start_nats()
            console.print(
                f"[bold]pausepatch demo[/]  nats-server -js on {nats.url} (work dir {workdir})"
            )
            stack.start_service("planner", "planner")
            port = free_port()
            stack.start_service("notifier", "notifier", ["--listen", f"127.0.0.1:{port}"])
            stack.start_service("clock-sync", "clock_sync")
            for i, (host, vms) in enumerate(FLEET.items()):
                sim = [
                    SimVM(name, aset, ud, fault_domain=i % 3, ip=f"127.0.1.{10 * i + j + 1}")
                    for j, (name, aset, ud) in enumerate(vms)
                ]
                stack.add_sim_host(host, sim)
            console.print(
                f"started planner, notifier (Scheduled Events on http://127.0.0.1:{port}), "
                f"clock-sync and {len(FLEET)} host-agents as separate processes"
            )
            nc = await connect(stack.nats_url)
            try:
                client = PlannerClient(nc)
                await _wait_hosts(client, len(FLEET))
                print_hosts(await client.hosts())
                request = {
                    "update_id": "hv-firmware-agent-2026.11",
                    "description": "Host server is undergoing maintenance.",
                    "patch": {"command": PATCH_COMMAND},
                    "expected_pause_s": 1,
                    "pause_budget_s": 10,
                    "notice_s": 2,
                    "max_hosts_in_flight": 2,
                }
                plan = await client.plan(request)
                console.print(
                    f"plan: {plan['waves']} (lower bound {plan['lower_bound']} waves; "
                    f"2 s notice, the next wave's running while a wave is patched; "
                    f"patch `{PATCH_COMMAND}`)"
                )
                summary = await client.submit(request)
                final = await watch(client, summary["rollout_id"])
                await asyncio.sleep(0.5)  # the last clock results
                print_report(await client.get(summary["rollout_id"]))
                ok = final["state"] == "completed" and final["hosts_failed"] == 0
            finally:
                await nc.close()
        finally:
            stack.stop()
        console.print(
            "demo finished: everything it started is stopped" + ("" if ok else " (FAILED)")
        )
        return 0 if ok else 1
