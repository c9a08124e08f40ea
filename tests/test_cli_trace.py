"""`pausepatch trace ROLLOUT|HOST`: pause traces from Jaeger's `/api/v3` query API printed as span
trees, read from a recorded Jaeger v2 response and from the project's own OTLP receiver after a
real rollout."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from shared.cli import main
from shared.client import EventWatcher, PlannerClient
from shared.contracts import RolloutStatus, VMResumed
from shared.devstack import LocalStack, free_port
from shared.jaeger import parse_traces, render_tree
from tests.support.fleet import ready, sim_vms, start_core
from tests.support.otlp import OtlpReceiver

RECORDING = Path(__file__).parent / "support" / "jaeger_recording.json"
RECORDED_ROLLOUT = "r20261125191714-69d50f25"
"""The rollout of the recording: hv-01 patched fine, hv-02's patch exited 1 (two VMs each)."""
FINAL = ("completed", "halted", "aborted", "failed")
PAUSE_LINE = re.compile(r"vm\.pause (\S+)  \[host-agent\]  ([\d.]+) ms")


def recorded() -> dict[str, Any]:
    return json.loads(RECORDING.read_text())  # type: ignore[no-any-return]


def raw_spans(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        span
        for rs in body["result"]["resourceSpans"]
        for ss in rs["scopeSpans"]
        for span in ss["spans"]
    ]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """The real command line, in this process."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


@pytest.fixture
def replayed_jaeger() -> Iterator[str]:
    """An HTTP server on a loopback port that answers like Jaeger v2 from the recording:
    `/api/v3/operations` lists the recorded span names of a service, `/api/v3/traces` requires
    the time window as Jaeger does and returns the recorded response."""
    body = recorded()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            status = 404
            reply: dict[str, Any] = {"error": {"httpCode": 404, "message": "404 page not found"}}
            if url.path == "/api/v3/operations":
                names = {
                    span["name"]
                    for rs in body["result"]["resourceSpans"]
                    if {"key": "service.name", "value": {"stringValue": query.get("service")}}
                    in rs["resource"]["attributes"]
                    for ss in rs["scopeSpans"]
                    for span in ss["spans"]
                }
                status = 200
                reply = {"operations": [{"name": n, "spanKind": "internal"} for n in names]}
            elif url.path.startswith("/api/v3/traces/"):
                wanted = url.path.rsplit("/", 1)[1]
                kept = [
                    {**rs, "scopeSpans": [{**ss, "spans": spans}]}
                    for rs in body["result"]["resourceSpans"]
                    for ss in rs["scopeSpans"]
                    if (spans := [s for s in ss["spans"] if s["traceId"] == wanted])
                ]
                if kept:
                    status, reply = 200, {"result": {"resourceSpans": kept}}
            elif url.path == "/api/v3/traces":
                if "query.start_time_min" in query and "query.start_time_max" in query:
                    status, reply = 200, body
                else:
                    message = "query.start_time_min and query.start_time_max are required"
                    status, reply = 400, {"error": {"httpCode": 400, "message": message}}
            data = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_recorded_jaeger_response_becomes_one_tree_per_host_maintenance() -> None:
    body = recorded()
    traces = parse_traces(json.dumps(body))
    assert [t.attribute("pp.host") for t in traces] == ["hv-01", "hv-02"]
    spans = raw_spans(body)
    for trace in traces:
        assert [r.name for r in trace.roots()] == [f"maintenance.plan {trace.attribute('pp.host')}"]
        assert set(trace.services) == {"planner", "notifier", "host-agent", "clock-sync"}
        lines = render_tree(trace)
        # Every span is printed once, under its parent, after a header.
        assert len(lines) == 1 + len(trace.spans)
        assert lines[0].startswith(f"trace {trace.trace_id}  host ")
        assert RECORDED_ROLLOUT in lines[0]
        # The pauses, with the durations the recording holds.
        printed = {vm: float(ms) for vm, ms in PAUSE_LINE.findall("\n".join(lines))}
        expected = {
            s["name"].removeprefix("vm.pause "): round(
                (int(s["endTimeUnixNano"]) - int(s["startTimeUnixNano"])) / 1e6, 1
            )
            for s in spans
            if s["traceId"] == trace.trace_id and s["name"].startswith("vm.pause ")
        }
        assert printed == expected and len(printed) == 2
    failed = "\n".join(render_tree(traces[1]))
    assert "host.maintenance hv-02  [host-agent]" in failed
    assert "ERROR: patch exited with status 1" in failed
    assert "ERROR" not in "\n".join(render_tree(traces[0]))


def test_a_response_streamed_in_chunks_reads_the_same() -> None:
    body = recorded()
    chunks = [{"result": {"resourceSpans": [rs]}} for rs in body["result"]["resourceSpans"]]
    streamed = "\n".join(json.dumps(chunk) for chunk in chunks)
    whole = parse_traces(json.dumps(body))
    parts = parse_traces(streamed)
    assert [(t.trace_id, sorted(s.span_id for s in t.spans)) for t in parts] == [
        (t.trace_id, sorted(s.span_id for s in t.spans)) for t in whole
    ]
    assert parse_traces('{"error":{"httpCode":404,"message":"No traces found"}}\n') == []


def test_trace_prints_a_rollouts_traces_from_jaeger(
    replayed_jaeger: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(
        capsys, "trace", RECORDED_ROLLOUT, "--jaeger", replayed_jaeger, "--since", "3650d"
    )
    assert code == 0
    headers = [line for line in out.splitlines() if line.startswith("trace ")]
    assert len(headers) == 2 and all(RECORDED_ROLLOUT in h for h in headers)
    assert {vm for vm, _ in PAUSE_LINE.findall(out)} == {"web-1", "db-1", "web-2", "db-2"}

    code, out, _ = run_cli(capsys, "trace", "hv-02", "--jaeger", replayed_jaeger)
    assert code == 0
    assert [line.split()[3] for line in out.splitlines() if line.startswith("trace ")] == ["hv-02"]
    assert {vm for vm, _ in PAUSE_LINE.findall(out)} == {"web-2", "db-2"}

    code, out, err = run_cli(capsys, "trace", "hv-77", "--jaeger", replayed_jaeger)
    assert code == 1 and out == "" and "no pause traces of hv-77" in err

    # A trace id, as a log line or `report --json` gives it.
    trace_id = parse_traces(json.dumps(recorded()))[1].trace_id
    code, out, _ = run_cli(capsys, "trace", trace_id, "--jaeger", replayed_jaeger)
    assert code == 0 and out.startswith(f"trace {trace_id}  host hv-02")
    code, _, err = run_cli(capsys, "trace", "0" * 32, "--jaeger", replayed_jaeger)
    assert code == 1 and "no pause traces" in err


def test_trace_says_so_when_jaeger_cannot_be_reached(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, _, err = run_cli(capsys, "trace", "hv-01", "--jaeger", url)
    assert code == 3 and "cannot read traces from Jaeger" in err


async def test_trace_prints_the_pauses_of_a_real_rollout_from_the_otlp_receiver(
    stack: LocalStack,
    bus: tuple[PlannerClient, EventWatcher],
    otlp: OtlpReceiver,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client, watcher = bus
    start_core(stack)
    stack.add_sim_host("hv-01", sim_vms([("web-1", "web", 0), ("db-1", "db", 0)]))
    stack.add_sim_host("hv-02", sim_vms([("web-2", "web", 1), ("db-2", "db", 1)], first_ip=5))
    await ready(stack, client, watcher, ["hv-01", "hv-02"])
    rollout = await client.submit(
        {
            "update_id": "kernel-2026.11",
            "patch": {"command": 'sleep 0.2; test "$PP_HOST" != hv-02'},
            "notice_s": 1,
            "pause_budget_s": 5,
            "failure_budget": 1,
        }
    )
    rollout_id = rollout["rollout_id"]
    final = await watcher.wait_for(
        lambda w: [e for e in w.events(RolloutStatus, rollout_id=rollout_id) if e.state in FINAL],
        60,
        "the rollout to finish",
    )
    assert final[-1].state == "completed" and final[-1].hosts_failed == 1
    paused_ms = {e.vm: e.paused_ms for e in watcher.events(VMResumed, rollout_id=rollout_id)}
    assert len(paused_ms) == 4
    otlp.wait_for(
        lambda spans: (
            sum(s.name.startswith("vm.pause ") for s in spans) >= 4
            and sum(s.name.startswith("host.maintenance ") for s in spans) >= 2
        )
    )

    code, out, _ = await _cli_in_thread(capsys, "trace", rollout_id, "--jaeger", otlp.endpoint)
    assert code == 0, out
    headers = [line for line in out.splitlines() if line.startswith("trace ")]
    assert [h.split()[3] for h in headers] == ["hv-01", "hv-02"]
    # Each VM's blackout as Jaeger shows it is the pause the host-agent measured.
    printed = {vm: float(ms) for vm, ms in PAUSE_LINE.findall(out)}
    assert printed.keys() == paused_ms.keys()
    for vm, ms in printed.items():
        assert abs(ms - paused_ms[vm]) <= 5, (vm, ms, paused_ms[vm])
    hv02 = out[out.index(headers[1]) :]
    assert "ERROR: patch exited with status 1" in hv02
    assert "ERROR" not in out[: out.index(headers[1])]

    code, out, _ = await _cli_in_thread(capsys, "trace", "hv-01", "--jaeger", otlp.endpoint)
    assert code == 0
    assert {vm for vm, _ in PAUSE_LINE.findall(out)} == {"web-1", "db-1"}

    # The trace id the report gives for hv-02 is that host's maintenance.
    report = await client.get(rollout_id)
    trace_id = next(h["trace_id"] for h in report["hosts"] if h["host"] == "hv-02")
    code, out, _ = await _cli_in_thread(capsys, "trace", trace_id, "--jaeger", otlp.endpoint)
    assert code == 0 and out.startswith(f"trace {trace_id}  host hv-02")
    assert {vm for vm, _ in PAUSE_LINE.findall(out)} == {"web-2", "db-2"}


async def _cli_in_thread(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """The CLI runs its own event loop: run it off this test's loop."""
    return await asyncio.to_thread(run_cli, capsys, *argv)
