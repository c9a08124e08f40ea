"""The timeline picture of a rollout, for `pausepatch report ROLLOUT --plot FILE` (matplotlib).

One row per host, in both panels. Left: the rollout on its own clock, seconds since it was
submitted: each host's notice (light) and its pause window (solid), coloured by wave. Right: each
host's pause window on a millisecond scale, the patch's part solid and pausepatch's overhead
light, since a pause of a few hundred milliseconds is a sliver beside minutes of notice. Both are
drawn to scale. A failed host is marked with a red cross and its error.

Each drawn bar carries a gid (`notice:<host>`, `pause:<host>`, `window:<host>`, `patch:<host>`,
`failed:<host>`) so that what was drawn can be checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

FAILED_COLOUR = "#c0392b"


@dataclass(frozen=True)
class HostRow:
    """One host of the rollout, in seconds since the rollout was created (and milliseconds)."""

    host: str
    wave: int
    state: str
    notice: tuple[float, float] | None
    """Notice given, to the time it ended (not_before, or the start if approved earlier)."""
    waiting: tuple[float, float] | None
    """Notice over, to the start: the wave ahead of it was still being patched."""
    pause: tuple[float, float] | None
    """First VM paused to last VM resumed (host clock)."""
    window_ms: float | None
    patch_ms: float | None
    forced: bool
    error: str | None

    @property
    def failed(self) -> bool:
        return self.state == "failed"


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def timeline_rows(report: dict[str, Any]) -> list[HostRow]:
    """The rows of a report (`pp.cmd.rollout.get`), by wave then host."""
    origin = _time(report["created_at"])
    assert origin is not None

    def since(value: datetime) -> float:
        return (value - origin).total_seconds()

    rows = []
    for host in report["hosts"]:
        noticed, not_before = _time(host.get("noticed_at")), _time(host.get("not_before"))
        started = _time(host.get("started_at"))
        notice = waiting = None
        if noticed is not None:
            ends = [t for t in (not_before, started) if t is not None]
            end = max(min(ends), noticed) if ends else noticed
            notice = (since(noticed), since(end))
            if started is not None and started > end:
                waiting = (since(end), since(started))
        records = host.get("vm_records") or {}
        paused = [_time(r.get("paused_at")) for r in records.values()]
        resumed = [_time(r.get("resumed_at")) for r in records.values()]
        paused_at = [t for t in paused if t is not None]
        resumed_at = [t for t in resumed if t is not None]
        pause = None
        if paused_at and resumed_at:
            pause = (since(min(paused_at)), since(max(resumed_at)))
        rows.append(
            HostRow(
                host=host["host"],
                wave=int(host["wave"]),
                state=host["state"],
                notice=notice,
                waiting=waiting,
                pause=pause,
                window_ms=host.get("window_ms"),
                patch_ms=host.get("patch_ms"),
                forced=any(r.get("forced") for r in records.values()),
                error=host.get("error"),
            )
        )
    return sorted(rows, key=lambda r: (r.wave, r.host))


def render_timeline(report: dict[str, Any], path: Path) -> Figure:
    """Draw the timeline of `report` into `path` (PNG, SVG or PDF by its suffix); return it."""
    rows = timeline_rows(report)
    waves = sorted({r.wave for r in rows})
    figure = Figure(figsize=(13, 2.0 + 0.5 * max(len(rows), 1)), layout="constrained")
    timeline, windows = figure.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    palette = _palette(len(waves))
    colour = {wave: palette[i] for i, wave in enumerate(waves)}
    for y, row in enumerate(rows):
        _draw_host(timeline, windows, y, row, colour[row.wave])

    timeline.set_yticks(range(len(rows)), [r.host for r in rows])
    for label, row in zip(timeline.get_yticklabels(), rows, strict=True):
        if row.failed:
            label.set_color(FAILED_COLOUR)
    timeline.invert_yaxis()
    timeline.set_xlabel("seconds since the rollout was submitted")
    timeline.set_title(
        "notice (light), waiting for the wave ahead (dotted), pause window (solid) per host"
    )
    windows.set_xlabel("pause window, ms (solid: patch, light: overhead)")
    windows.set_title("pause windows to scale")
    longest = max((r.window_ms or 0.0 for r in rows), default=0.0)
    windows.set_xlim(0, max(longest * 1.6, 1.0))
    timeline.margins(x=0.1)
    for axis in (timeline, windows):
        axis.grid(axis="x", alpha=0.3)
    handles: list[Any] = [Patch(color=colour[w], label=f"wave {w + 1}") for w in waves]
    if any(r.failed for r in rows):
        handles.append(
            Line2D([], [], marker="x", ls="", color=FAILED_COLOUR, mew=2.5, label="failed")
        )
    if handles:
        figure.legend(
            handles=handles, loc="outside lower center", ncols=len(handles), fontsize="small"
        )
    request = report.get("request", {})
    figure.suptitle(
        f"rollout {report['rollout_id']}  update {request.get('update_id', '-')}  "
        f"{report.get('event_type', '')}  {report['state']}  "
        f"budget {request.get('pause_budget_s', '-')} s",
        fontsize="medium",
    )
    figure.savefig(path)
    return figure


def _palette(count: int) -> list[Any]:
    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(count)]


def _draw_host(timeline: Any, windows: Any, y: int, row: HostRow, colour: Any) -> None:
    if row.notice is not None:
        start, end = row.notice
        timeline.barh(y, end - start, left=start, height=0.5, color=colour, alpha=0.25)[0].set_gid(
            f"notice:{row.host}"
        )
    if row.waiting is not None:
        start, end = row.waiting
        (line,) = timeline.plot([start, end], [y, y], ls=":", lw=2, color=colour)
        line.set_gid(f"waiting:{row.host}")
    if row.pause is not None:
        start, end = row.pause
        bar = timeline.barh(y, end - start, left=start, height=0.7, color=colour)[0]
        bar.set_gid(f"pause:{row.host}")
        timeline.annotate(
            f"{(end - start) * 1000:.0f} ms" + (" forced" if row.forced else ""),
            (end, y),
            xytext=(12 if row.failed else 4, 0),
            textcoords="offset points",
            va="center",
            fontsize="x-small",
        )
    if row.window_ms is not None:
        windows.barh(y, row.window_ms, height=0.7, color=colour, alpha=0.35)[0].set_gid(
            f"window:{row.host}"
        )
        if row.patch_ms is not None:
            windows.barh(y, min(row.patch_ms, row.window_ms), height=0.7, color=colour)[0].set_gid(
                f"patch:{row.host}"
            )
        windows.annotate(
            f"{row.window_ms:.1f} ms",
            (row.window_ms, y),
            xytext=(4, 0),
            textcoords="offset points",
            va="center",
            fontsize="x-small",
        )
    if row.failed:
        at = row.pause[1] if row.pause else (row.notice[1] if row.notice else 0.0)
        (marker,) = timeline.plot(at, y, "x", color=FAILED_COLOUR, markersize=11, mew=2.5)
        marker.set_gid(f"failed:{row.host}")
        windows.annotate(
            (row.error or "failed")[:60],
            (row.window_ms or 0.0, y),
            xytext=(4, -10),
            textcoords="offset points",
            fontsize="x-small",
            color=FAILED_COLOUR,
        )
