"""`pausepatch report ROLLOUT --plot FILE`: the rollout's timeline, one row per host, waves
coloured, every pause window drawn to scale, failures marked."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from matplotlib.figure import Figure
from PIL import Image

from shared.cli import main
from shared.client import EventWatcher, PlannerClient
from shared.contracts import RolloutStatus
from shared.devstack import LocalStack
from shared.report_plot import FAILED_COLOUR, render_timeline
from tests.support.fleet import ready, sim_vms, start_core

T0 = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)


def at(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat()


def host_run(
    host: str,
    wave: int,
    noticed: float,
    start: float,
    pauses: dict[str, tuple[float, float]],
    state: str = "done",
    error: str | None = None,
    forced: bool = False,
) -> dict[str, Any]:
    """One host of a report as the planner answers it (`pp.cmd.rollout.get`)."""
    first = min(p for p, _ in pauses.values())
    last = max(r for _, r in pauses.values())
    return {
        "host": host,
        "wave": wave,
        "state": state,
        "noticed_at": at(noticed),
        "not_before": at(noticed + 60),
        "started_at": at(start),
        "completed_at": at(last + 0.01),
        "window_ms": (last - first) * 1000,
        "patch_ms": (last - first) * 1000 - 0.6,
        "error": error,
        "vm_records": {
            vm: {
                "paused_at": at(p),
                "resumed_at": at(r),
                "paused_ms": (r - p) * 1000,
                "forced": forced,
            }
            for vm, (p, r) in pauses.items()
        },
    }


REPORT = {
    "rollout_id": "r20261125100000-0123abcd",
    "request": {"update_id": "kernel-2026.11", "pause_budget_s": 10},
    "event_type": "Freeze",
    "state": "completed",
    "created_at": at(0),
    "hosts": [
        host_run("hv-02", 1, 70.0, 95.0, {"b": (95.01, 95.31)}, "failed", "patch exited with 1"),
        host_run("hv-01", 0, 1.0, 30.0, {"a": (30.02, 30.33), "c": (30.02, 30.35)}),
        host_run("hv-03", 1, 70.0, 95.0, {"d": (95.0, 95.9)}, forced=True),
    ],
}


def drawn(figure: Figure) -> dict[str, Any]:
    """Every artist the timeline marked with a gid."""
    artists = [a for axis in figure.axes for a in (*axis.patches, *axis.lines)]
    return {str(a.get_gid()): a for a in artists if a.get_gid()}


def test_each_host_is_a_row_with_its_pause_window_to_scale(tmp_path: Path) -> None:
    path = tmp_path / "timeline.png"
    figure = render_timeline(REPORT, path)
    artists = drawn(figure)
    timeline, windows = figure.axes[:2]

    # Rows by wave then host; the failed host's label is red.
    labels = [t.get_text() for t in timeline.get_yticklabels()]
    assert labels == ["hv-01", "hv-02", "hv-03"]
    assert [t.get_color() for t in timeline.get_yticklabels()][1] == FAILED_COLOUR

    # Left: seconds since submission; the pause is first VM paused to last VM resumed.
    hv01 = artists["pause:hv-01"]
    assert hv01.get_x() == pytest.approx(30.02) and hv01.get_width() == pytest.approx(0.33)
    notice = artists["notice:hv-01"]
    assert notice.get_x() == pytest.approx(1.0) and notice.get_width() == pytest.approx(29.0)
    # Right: the window in milliseconds, the patch inside it.
    assert artists["window:hv-03"].get_width() == pytest.approx(900.0)
    assert artists["patch:hv-03"].get_width() == pytest.approx(899.4)
    assert windows.get_xlim()[1] > 900.0

    # Waves share a colour; different waves do not.
    colour = {h: artists[f"pause:{h}"].get_facecolor() for h in ("hv-01", "hv-02", "hv-03")}
    assert colour["hv-02"] == colour["hv-03"] != colour["hv-01"]

    # Only the failed host is crossed out, at the end of its window.
    assert [g for g in artists if g.startswith("failed:")] == ["failed:hv-02"]
    assert artists["failed:hv-02"].get_xdata()[0] == pytest.approx(95.31)
    texts = [t.get_text() for axis in figure.axes for t in axis.texts]
    assert "patch exited with 1" in texts and "900 ms forced" in texts

    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert (width, height) == (
            round(figure.get_figwidth() * figure.dpi),
            round(figure.get_figheight() * figure.dpi),
        )


def test_a_host_noticed_ahead_shows_its_wait_for_the_wave_before_it(tmp_path: Path) -> None:
    # Noticed at 1 s with the wave ahead (notice ends at 61 s), started at 75 s when it finished.
    late = host_run("hv-04", 1, 1.0, 75.0, {"e": (75.0, 75.3)})
    artists = drawn(render_timeline({**REPORT, "hosts": [late]}, tmp_path / "t.svg"))
    assert artists["notice:hv-04"].get_width() == pytest.approx(60.0)
    assert list(artists["waiting:hv-04"].get_xdata()) == pytest.approx([61.0, 75.0])
    assert not [g for g in drawn(render_timeline(REPORT, tmp_path / "u.svg")) if "waiting" in g]


async def test_report_plot_draws_a_real_rollout_with_its_failed_host(
    stack: LocalStack,
    bus: tuple[PlannerClient, EventWatcher],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client, watcher = bus
    start_core(stack)
    stack.add_sim_host("hv-01", sim_vms([("web-1", "web", 0), ("db-1", "db", 0)]))
    stack.add_sim_host("hv-02", sim_vms([("web-2", "web", 1)], first_ip=5))
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
    await watcher.wait_for(
        lambda w: [
            e
            for e in w.events(RolloutStatus, rollout_id=rollout_id)
            if e.state in ("completed", "halted", "aborted", "failed")
        ],
        60,
        "the rollout to finish",
    )

    def cli(*argv: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exit_info:
            main(["--nats-url", stack.nats_url, *argv])
        out, err = capsys.readouterr()
        return int(exit_info.value.code or 0), out, err

    picture = tmp_path / "timeline.png"
    code, out, err = await asyncio.to_thread(cli, "report", rollout_id, "--plot", str(picture))
    assert code == 0 and rollout_id in out and f"timeline written to {picture}" in err
    with Image.open(picture) as image:
        assert image.format == "PNG" and image.size[0] > 800

    # What was drawn, from the same report: both hosts, the failed one crossed out.
    code, out, _ = await asyncio.to_thread(cli, "report", rollout_id, "--json")
    report = json.loads(out)
    artists = drawn(render_timeline(report, tmp_path / "again.svg"))
    assert {"pause:hv-01", "pause:hv-02", "failed:hv-02"} <= set(artists)
    assert "failed:hv-01" not in artists
    by_host = {h["host"]: h for h in report["hosts"]}
    width_ms = artists["window:hv-01"].get_width()
    assert width_ms == pytest.approx(by_host["hv-01"]["window_ms"])
    assert 200 <= artists["pause:hv-01"].get_width() * 1000 <= 5000
