#!/usr/bin/env python3
"""An in-guest Scheduled Events handler that behaves like Azure's documented Python sample, for
VM owners to start from (and for pausepatch's own tests): standard library only.

Every second it reads http://169.254.169.254/metadata/scheduledevents (header `Metadata: true`,
with `If-None-Match` so an unchanged document costs a 304), approves every `Freeze` event that
lists this VM and whose `DurationInSeconds` is between 0 and 9, and logs events that `Started`.
It talks to nothing but the metadata address, and never through a proxy.

    python3 scheduled_events_handler.py --vm "$(hostname)"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any

ENDPOINT = "http://169.254.169.254/metadata/scheduledevents"
API_VERSION = "2020-07-01"


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


class ScheduledEventsHandler:
    """Polls the document, approves short Freeze events of this VM, logs started ones."""

    def __init__(self, vm: str, endpoint: str = ENDPOINT) -> None:
        self.vm = vm
        self.url = f"{endpoint}?api-version={API_VERSION}"
        # No proxy: the metadata service refuses proxied requests anyway.
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.etag: str | None = None
        self.approved: set[str] = set()
        self.started: set[str] = set()
        self.unchanged = 0

    def fetch(self) -> dict[str, Any] | None:
        """The document, or None while it is unchanged (304)."""
        request = urllib.request.Request(self.url, headers={"Metadata": "true"})
        if self.etag:
            request.add_header("If-None-Match", self.etag)
        try:
            with self.opener.open(request, timeout=5) as response:
                self.etag = response.headers.get("ETag")
                document: dict[str, Any] = json.load(response)
                return document
        except urllib.error.HTTPError as exc:
            if exc.code == 304:
                self.unchanged += 1
                return None
            raise

    def approve(self, event_id: str) -> None:
        """Ask for the event to start now (StartRequests)."""
        body = json.dumps({"StartRequests": [{"EventId": event_id}]}).encode()
        request = urllib.request.Request(
            self.url,
            data=body,
            headers={"Metadata": "true", "Content-Type": "application/json"},
            method="POST",
        )
        with self.opener.open(request, timeout=5) as response:
            log(f"approved {event_id} (HTTP {response.status})")

    def handle(self, document: dict[str, Any]) -> None:
        """React to one new version of the document."""
        log(
            f"DocumentIncarnation {document['DocumentIncarnation']}: "
            f"{len(document['Events'])} event(s), {self.unchanged} poll(s) answered 304 before"
        )
        self.unchanged = 0
        for event in document["Events"]:
            event_id = event["EventId"]
            if self.vm not in event["Resources"]:
                continue
            if event["EventStatus"] == "Started" and event_id not in self.started:
                self.started.add(event_id)
                log(f"Started {event_id} ({event['EventType']})")
            short_freeze = (
                event["EventType"] == "Freeze" and 0 <= event.get("DurationInSeconds", -1) <= 9
            )
            if (
                event["EventStatus"] == "Scheduled"
                and short_freeze
                and event_id not in self.approved
            ):
                self.approved.add(event_id)
                self.approve(event_id)

    def run(self, interval_s: float = 1.0) -> None:
        """Poll forever, once per `interval_s`."""
        while True:
            try:
                document = self.fetch()
                if document is not None:
                    self.handle(document)
            except (OSError, ValueError) as exc:
                log(f"poll failed: {exc}")
            time.sleep(interval_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vm", required=True, help="this VM's name as listed in Resources")
    args = parser.parse_args()
    log(f"handling scheduled events for {args.vm} from {ENDPOINT}")
    try:
        ScheduledEventsHandler(args.vm).run()
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
