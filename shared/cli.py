"""`pausepatch`: the operator's command line. Talks to the planner over NATS (`--nats-url`, env
`PP_NATS_URL`). Errors are one clear line and a non-zero exit code."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from shared.client import CommandError, PlannerClient, connect
from shared.contracts import DEFAULT_NOTICE_S, MAX_PAUSE_BUDGET_S
from shared.jaeger import parse_since

# Reports are wide: keep them readable when piped or logged (no terminal to measure).
console = Console(width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True, soft_wrap=True)

FINAL_STATES = ("completed", "aborted", "failed")


def _fmt_ms(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def submit_body(args: argparse.Namespace) -> dict[str, Any]:
    """The `pp.cmd.rollout.submit` request from the command line."""
    patch: dict[str, Any] = (
        {"command": args.patch_command}
        if args.patch_command is not None
        else {"duration_s": args.patch_duration}
    )
    return {
        "update_id": args.update_id,
        "description": args.description,
        "hosts": args.hosts or None,
        "impact": args.impact,
        "patch": patch,
        "expected_pause_s": args.expected_pause,
        "pause_budget_s": args.pause_budget,
        "notice_s": args.notice,
        "max_hosts_in_flight": args.max_in_flight,
        "notice_ahead_waves": args.notice_ahead_waves,
        "failure_budget": args.failure_budget,
        "allow_placement_violations": args.allow_placement_violations,
    }


async def watch(client: PlannerClient, rollout_id: str, poll_s: float = 0.2) -> dict[str, Any]:
    """A live progress bar until the rollout finishes (or halts); returns its last state."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} hosts"),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task(rollout_id, total=None, detail="")
        while True:
            summary = await client.call("get", {"rollout_id": rollout_id, "summary": True})
            done = summary["hosts_ok"] + summary["hosts_failed"]
            detail = (
                f"wave {min(summary['current_wave'] + 1, summary['waves_total'])}/"
                f"{summary['waves_total']}  in flight {summary['hosts_in_flight']}  "
                f"VMs paused now {summary['vms_paused_now']}  failed {summary['hosts_failed']}  "
                f"[{summary['state']}]"
            )
            progress.update(task, total=summary["hosts_total"], completed=done, detail=detail)
            if summary["state"] in FINAL_STATES or summary["state"] == "halted":
                return summary
            await asyncio.sleep(poll_s)


def print_report(report: dict[str, Any]) -> None:
    """The pause report: per host, then per VM."""
    console.print(
        f"[bold]rollout {report['rollout_id']}[/]  update {report['request']['update_id']}  "
        f"{report['event_type']}  state [bold]{report['state']}[/]  "
        f"waves {report['waves_total']} (lower bound {report['lower_bound']})"
        + (f"  reason: {report['reason']}" if report.get("reason") else "")
    )
    hosts = Table(title="Hosts", title_justify="left")
    for col in (
        "host",
        "wave",
        "result",
        "VMs",
        "pause window ms",
        "patch ms",
        "overhead ms",
        "trace",
    ):
        hosts.add_column(col, justify="right" if "ms" in col or col in ("wave", "VMs") else "left")
    vms = Table(title="VMs", title_justify="left")
    for col in ("host", "vm", "paused ms", "forced", "clock", "skew before ms", "skew after ms"):
        vms.add_column(col, justify="right" if "ms" in col else "left")
    for host in report["hosts"]:
        result = (
            host["state"] if host["state"] != "failed" else f"[red]failed[/]: {host.get('error')}"
        )
        hosts.add_row(
            host["host"],
            str(host["wave"]),
            result,
            str(len(host["vms"])),
            _fmt_ms(host.get("window_ms")),
            _fmt_ms(host.get("patch_ms")),
            _fmt_ms(host.get("overhead_ms"), 2),
            (host.get("trace_id") or "-")[:16],
        )
        for vm, rec in sorted(host["vm_records"].items()):
            clock = _clock_cell(rec)
            vms.add_row(
                host["host"],
                vm,
                _fmt_ms(rec.get("paused_ms")),
                "yes" if rec.get("forced") else "no",
                clock,
                _fmt_ms(rec.get("skew_before_ms")),
                _fmt_ms(rec.get("skew_after_ms")),
            )
    console.print(hosts)
    console.print(vms)


def _clock_cell(record: dict[str, Any]) -> str:
    if record.get("clock_ok"):
        return f"synced ({record.get('clock_method')})"
    error = record.get("clock_error")
    if error is None:
        return "-"
    if "no guest clock" in error:
        return "n/a (no guest clock)"
    return f"[red]failed[/]: {error[:40]}"


def print_hosts(hosts: list[dict[str, Any]]) -> None:
    """The inventory table."""
    table = Table(title="Fleet inventory", title_justify="left")
    for col in ("host", "hypervisor", "vm", "state", "set", "UD", "FD", "ip", "reported"):
        table.add_column(col)
    for host in hosts:
        for vm in host["vms"] or [{}]:
            table.add_row(
                host["host"],
                host.get("hypervisor", ""),
                vm.get("vm", "-"),
                vm.get("state", "-"),
                vm.get("availability_set") or "-",
                str(vm.get("update_domain", "-") if vm.get("update_domain") is not None else "-"),
                str(vm.get("fault_domain") if vm.get("fault_domain") is not None else "-"),
                vm.get("ip") or "-",
                host["occurred_at"][11:19],
            )
    console.print(table)


def print_rollouts(rollouts: list[dict[str, Any]]) -> None:
    """The rollout list."""
    table = Table(title="Rollouts", title_justify="left")
    for col in ("rollout", "update", "type", "state", "waves", "hosts ok", "failed", "created"):
        table.add_column(col)
    for r in rollouts:
        table.add_row(
            r["rollout_id"],
            r["request"]["update_id"],
            r["event_type"],
            r["state"],
            f"{min(r['current_wave'], r['waves_total'])}/{r['waves_total']}",
            str(r["hosts_ok"]),
            str(r["hosts_failed"]),
            r["created_at"][:19],
        )
    console.print(table)


def _wave(summary: dict[str, Any]) -> str:
    total = summary["waves_total"]
    return f"{min(summary['current_wave'] + 1, total)}/{total}"


def print_summary(summary: dict[str, Any]) -> None:
    """One rollout's status."""
    console.print(
        f"[bold]{summary['rollout_id']}[/] {summary['state']}"
        + (f" ({summary['reason']})" if summary.get("reason") else "")
        + f": wave {_wave(summary)},"
        f" {summary['hosts_ok']} ok, {summary['hosts_failed']} failed,"
        f" {summary['hosts_in_flight']} in flight of {summary['hosts_total']} hosts"
    )
    for line in summary.get("log", []):
        console.print(f"  {line}")


async def run(args: argparse.Namespace) -> int:
    """Carry out one CLI command."""
    if args.command == "demo":
        from shared.demo import run_demo

        return await run_demo()
    if args.command == "trace":
        return await run_trace(args)
    nc = await connect(args.nats_url)
    try:
        client = PlannerClient(nc)
        if args.command == "hosts":
            hosts = await client.hosts()
            if args.json:
                console.print_json(json.dumps(hosts))
            else:
                print_hosts(hosts)
        elif args.command == "report":
            report = await client.get(args.rollout_id)
            if args.json:
                print(json.dumps(report, indent=2))
            else:
                print_report(report)
            if args.plot:
                from shared.report_plot import render_timeline

                render_timeline(report, Path(args.plot))
                err.print(f"timeline written to {args.plot}")
        elif args.command == "rollout":
            return await run_rollout(client, args)
    finally:
        await nc.close()
    return 0


async def run_trace(args: argparse.Namespace) -> int:
    """`pausepatch trace ROLLOUT|HOST|TRACE_ID`: the pause traces from Jaeger, as span trees."""
    import httpx

    from shared.jaeger import JaegerClient, JaegerError, pause_traces, render_tree

    client = JaegerClient(args.jaeger)
    try:
        traces = await pause_traces(client, args.target, args.since, args.limit)
    except (httpx.HTTPError, JaegerError) as exc:
        err.print(f"[red]error[/]: cannot read traces from Jaeger at {args.jaeger}: {exc}")
        return 3
    finally:
        await client.close()
    if not traces:
        err.print(f"no pause traces of {args.target} in Jaeger at {args.jaeger}")
        return 1
    for trace in traces:
        for line in render_tree(trace):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
        console.print()
    return 0


async def run_rollout(client: PlannerClient, args: argparse.Namespace) -> int:
    """`pausepatch rollout ...`."""
    if args.action == "submit":
        body = submit_body(args)
        if args.dry_run:
            console.print_json(json.dumps(await client.plan(body)))
            return 0
        summary = await client.submit(body)
        console.print(
            f"rollout [bold]{summary['rollout_id']}[/] submitted: {summary['waves_total']} wave(s)"
        )
        if args.wait:
            final = await watch(client, summary["rollout_id"])
            print_report(await client.get(summary["rollout_id"]))
            return 0 if final["state"] == "completed" and final["hosts_failed"] == 0 else 1
        return 0
    if args.action == "list":
        print_rollouts(await client.rollouts())
    elif args.action == "status":
        print_summary(await client.call("get", {"rollout_id": args.rollout_id, "summary": True}))
    elif args.action == "halt":
        print_summary(await client.halt(args.rollout_id, args.reason))
    elif args.action == "resume":
        print_summary(await client.resume(args.rollout_id))
    elif args.action == "abort":
        print_summary(await client.abort(args.rollout_id, args.reason))
    return 0


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="pausepatch", description=__doc__)
    p.add_argument(
        "--nats-url",
        default=os.environ.get("PP_NATS_URL", "nats://127.0.0.1:4222"),
        help="NATS server(s), comma-separated (env PP_NATS_URL)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    hosts = sub.add_parser("hosts", help="the fleet inventory")
    hosts.add_argument("--json", action="store_true")
    report = sub.add_parser("report", help="per host and per VM pause report of a rollout")
    report.add_argument("rollout_id")
    report.add_argument("--json", action="store_true")
    report.add_argument(
        "--plot", metavar="FILE", help="also draw the timeline into FILE (.png, .svg or .pdf)"
    )
    sub.add_parser("demo", help="run the embedded demo (own nats-server, 3 simulated hosts)")
    trace = sub.add_parser("trace", help="the pause traces of a rollout or a host, from Jaeger")
    trace.add_argument(
        "target", metavar="ROLLOUT|HOST|TRACE_ID", help="a rollout id, a host name or a trace id"
    )
    trace.add_argument(
        "--jaeger",
        default=os.environ.get("PP_JAEGER_URL", "http://127.0.0.1:16686"),
        help="Jaeger's query address (env PP_JAEGER_URL)",
    )
    trace.add_argument(
        "--since", type=parse_since, default="24h", help="how far back (e.g. 30m, 24h, 7d)"
    )
    trace.add_argument("--limit", type=int, default=100, help="traces per host at most")

    rollout = sub.add_parser("rollout", help="submit and operate rollouts")
    actions = rollout.add_subparsers(dest="action", required=True)
    s = actions.add_parser("submit", help="roll an update out to the fleet")
    s.add_argument("update_id")
    s.add_argument("--description", default="Host server is undergoing maintenance.")
    s.add_argument("--hosts", nargs="*", help="hosts to patch (default: all)")
    s.add_argument("--impact", choices=("freeze", "reboot"), default="freeze")
    patch = s.add_mutually_exclusive_group(required=True)
    patch.add_argument("--patch-command", help="shell command run on each host during the pause")
    patch.add_argument("--patch-duration", type=float, help="simulated patch: seconds")
    s.add_argument("--expected-pause", type=float, default=1.0, help="seconds (default 1)")
    s.add_argument(
        "--pause-budget", type=float, default=MAX_PAUSE_BUDGET_S, help="seconds, at most 30"
    )
    s.add_argument("--notice", type=float, default=DEFAULT_NOTICE_S, help="seconds (default 900)")
    s.add_argument("--max-in-flight", type=int, default=10)
    s.add_argument(
        "--notice-ahead-waves",
        type=int,
        default=1,
        help="waves given notice while the one before is patched (default 1; 0: one at a time)",
    )
    s.add_argument("--failure-budget", type=int, default=0)
    s.add_argument("--allow-placement-violations", action="store_true")
    s.add_argument("--wait", action="store_true", help="show progress until done, then the report")
    s.add_argument("--dry-run", action="store_true", help="print the plan, start nothing")
    actions.add_parser("list", help="every rollout")
    for name in ("status", "halt", "resume", "abort"):
        a = actions.add_parser(name, help=f"{name} a rollout")
        a.add_argument("rollout_id")
        if name in ("halt", "abort"):
            a.add_argument("--reason")
    return p


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    args = parser().parse_args(argv)
    try:
        code = asyncio.run(run(args))
    except CommandError as exc:
        err.print(f"[red]error[/]: {exc}")
        code = 2
    except (OSError, TimeoutError) as exc:
        err.print(f"[red]error[/]: cannot reach NATS at {args.nats_url}: {exc}")
        code = 3
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
