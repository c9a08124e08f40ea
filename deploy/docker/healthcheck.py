#!/usr/bin/env python3
"""`pp-healthcheck SERVICE`: the container health check of a pausepatch service (exit 0 healthy).

A bus service is healthy when it is pulling from its own durable consumer right now (a pull
request of it is waiting on the server): it is connected, logged in, and its consume loop runs;
and when the liveness files its live processes write in `PP_STATE_DIR` (clock-sync's replicas,
which share one consumer) name no stuck consume loop (`shared/liveness.py`).
The notifier is healthy when its Scheduled Events API answers (it opens once its documents caught
up with the stream). Uses the service's own settings (`PP_NATS_URL`, `PP_NATS_USER`, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import nats

from shared import liveness
from shared.subjects import inbox_prefix

STREAM = "PAUSEPATCH"
DURABLES = {
    "planner": lambda: "planner-completed",
    "clock-sync": lambda: "clock-sync-resumed",
    "host-agent": lambda: f"host-agent-{os.environ['PP_HOST']}-started",
}
"""The durable consumer that shows each service is consuming (see services/*/main.py)."""


async def pulling(durable: str, attempts: int = 10, interval_s: float = 0.3) -> bool:
    """The consumer has a pull request waiting (fetches expire and renew every second)."""
    servers = [u.strip() for u in os.environ.get("PP_NATS_URL", "nats://127.0.0.1:4222").split(",")]
    nc = await nats.connect(
        servers=servers,
        user=os.environ.get("PP_NATS_USER") or None,
        password=os.environ.get("PP_NATS_PASSWORD") or None,
        # The user's own inbox prefix: its permissions allow no other.
        inbox_prefix=inbox_prefix(os.environ.get("PP_NATS_USER") or None),
        name="pausepatch-healthcheck",
        allow_reconnect=False,
        connect_timeout=3,
    )
    try:
        js = nc.jetstream()
        for _ in range(attempts):
            info = await js.consumer_info(STREAM, durable)
            if (info.num_waiting or 0) > 0:
                return True
            await asyncio.sleep(interval_s)
        return False
    finally:
        await nc.close()


def answering(listen: str) -> bool:
    """The Scheduled Events API answers a well-formed request (any non-5xx status)."""
    _, _, port = listen.rpartition(":")
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/metadata/scheduledevents?api-version=2020-07-01",
        headers={"Metadata": "true"},
    )
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            return bool(response.status < 500)
    except urllib.error.HTTPError as exc:
        return exc.code < 500


def main(argv: list[str] | None = None) -> int:
    """Check one service; print why when unhealthy."""
    parser = argparse.ArgumentParser(prog="pp-healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("service", choices=[*DURABLES, "notifier"])
    args = parser.parse_args(argv)
    try:
        if args.service == "notifier":
            healthy = answering(os.environ.get("PP_LISTEN", "127.0.0.1:8080"))
        else:
            # This replica's own consume loops first: a consumer shared with other replicas
            # looks served as long as any of them pulls.
            stuck = liveness.problems(Path(os.environ.get("PP_STATE_DIR", ".state")), args.service)
            if stuck:
                print("unhealthy: " + "; ".join(stuck), file=sys.stderr)
                return 1
            durable = DURABLES[args.service]()
            healthy = asyncio.run(pulling(durable))
    except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy", with its reason
        print(f"unhealthy: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if not healthy:
        print(f"unhealthy: {args.service} is not consuming", file=sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
