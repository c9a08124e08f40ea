"""Writes the NATS users of a pausepatch deployment: one user per service, one per host-agent, and
one for operators, each with the least subject permissions its service really uses.

    python deploy/nats/nats_auth.py hv-01 hv-02 hv-03 > deploy/nats/auth.conf

Passwords are not in the file: each user's password is a NATS config variable read from the
server's environment (`PP_NATS_PASSWORD_PLANNER`, `PP_NATS_PASSWORD_HOST_HV_01`, ...), so a
missing secret stops the server at start instead of opening a hole. The server reads such a value
as a config token: a password must begin with a letter and hold only letters, digits, `-` and `_`
(`-abc`, `10MB` or `1e5` would be read as something else and stop the server).

What each service does on the wire (checked by tests/test_deploy_nats.py on a real nats-server):
JetStream pull consumers ask `$JS.API.CONSUMER.{CREATE,INFO,MSG.NEXT}` for their own durable and
ack on `$JS.ACK.<stream>.<durable>.>`, and listen for their durable's leader elections
(`$JS.EVENT.ADVISORY.CONSUMER.LEADER_ELECTED.<stream>.<durable>`: a waiting fetch is asked again
when its consumer's leader changes; the planner also deletes its inventory consumer at start,
to read the fleet's last inventories afresh); ordered consumers (the notifier's replay) are
ephemeral; replies and deliveries arrive under the user's own inbox
prefix (`_INBOX.<user>.>`, `shared.subjects.inbox_prefix`: no user reads another's); command
handlers answer through `allow_responses`.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field

from shared import subjects
from shared.bus import DLQ_STREAM_NAME, LEADER_ELECTED
from shared.contracts import is_valid_name

STREAM = subjects.STREAM_NAME
ROLLOUTS_BUCKET = "pp_rollouts"
"""The planner's rollout state (`ROLLOUTS_BUCKET` in services/planner/main.py), which only it may
purge (rollouts past their retention)."""
PLANNER_BUCKETS = (ROLLOUTS_BUCKET, "pp_planner_lease")
"""The planner's KV buckets (services/planner/main.py)."""
NOTIFIER_BUCKET = "pp_notifier"
"""The notifier's snapshot bucket (`PP_SNAPSHOT_BUCKET`, services/notifier/settings.py)."""
PLANNER_DURABLES = {
    "planner-approved": subjects.host_approved(),
    "planner-deferred": subjects.host_deferred(),
    "planner-host-paused": subjects.host_paused(),
    "planner-patched": subjects.host_patched(),
    "planner-completed": subjects.host_completed(),
    "planner-host-clock": subjects.host_clock(),
    "planner-inventory": subjects.host_inventory(),
}
"""The planner's durable pull consumers and their filters (services/planner/main.py)."""
CLOCK_SYNC_DURABLES = {"clock-sync-resumed": subjects.vm_resumed()}


def host_agent_durable(host: str) -> str:
    """The durable consumer of one host's `MaintenanceStarted` (services/host_agent/main.py)."""
    return f"host-agent-{host}-started"


def password_variable(user: str) -> str:
    """The environment variable holding `user`'s password."""
    name = user.removeprefix("host-agent-")
    prefix = "PP_NATS_PASSWORD_HOST_" if user.startswith("host-agent-") else "PP_NATS_PASSWORD_"
    return prefix + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


@dataclass
class User:
    """One NATS user and its permissions."""

    name: str
    comment: str
    publish: list[str] = field(default_factory=list)
    subscribe: list[str] = field(default_factory=list)
    """Besides its own inbox (`_INBOX.<user>.>`), which every user may read."""
    responds: bool = False
    """Answers requests (`allow_responses`): may publish once to each request's reply subject."""

    def render(self) -> str:
        lines = [
            f"    # {self.comment}",
            "    {",
            f"      user: {_quote(self.name)}",
            f"      password: ${password_variable(self.name)}",
            "      permissions: {",
            "        publish: {allow: [",
            *(f"          {_quote(s)}," for s in self.publish),
            "        ]}",
            "        subscribe: {allow: [",
            *(f"          {_quote(s)}," for s in self.subscribe),
            f"          {_quote(subjects.inbox_prefix(self.name) + '.>')},",
            "        ]}",
        ]
        if self.responds:
            lines.append("        allow_responses: true")
        lines += ["      }", "    }"]
        return "\n".join(lines)


def _quote(value: str) -> str:
    return f'"{value}"'


def _pull_consumers(stream: str, durables: dict[str, str]) -> list[str]:
    """What a durable pull consumer needs: create (with its own filter), info, fetch, ack."""
    allowed = []
    for durable, filter_subject in durables.items():
        allowed += [
            f"$JS.API.CONSUMER.CREATE.{stream}.{durable}.{filter_subject}",
            f"$JS.API.CONSUMER.INFO.{stream}.{durable}",
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
            f"$JS.ACK.{stream}.{durable}.>",
        ]
    return allowed


def _leader_elections(stream: str, durables: dict[str, str] | list[str]) -> list[str]:
    """The server's advisory that one of these durables has a new leader: a fetch waiting on
    the old one is asked again at once (`shared.bus._fetch_asking_again`)."""
    return [f"{LEADER_ELECTED}.{stream}.{durable}" for durable in durables]


def _ephemeral_consumer(stream: str) -> list[str]:
    """A push or ordered consumer without a name (its filter is in the request body), its acks
    and its flow-control replies."""
    return [f"$JS.API.CONSUMER.CREATE.{stream}", f"$JS.ACK.{stream}.>", f"$JS.FC.{stream}.>"]


def _ordered_consumer(stream: str) -> list[str]:
    """An ordered consumer: created without a name, acknowledges nothing (AckNone), answers flow
    control. No `$JS.ACK`: with it, a user could acknowledge other consumers' messages."""
    return [f"$JS.API.CONSUMER.CREATE.{stream}", f"$JS.FC.{stream}.>"]


def _kv_bucket(bucket: str) -> list[str]:
    """Create, read, write and list the keys of one KV bucket."""
    stream = f"KV_{bucket}"
    return [
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.STREAM.CREATE.{stream}",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.*",
        f"$JS.API.CONSUMER.DELETE.{stream}.*",
        f"$JS.FC.{stream}.>",
        f"$KV.{bucket}.>",
    ]


def planner() -> User:
    """Owns the streams and the rollout state, answers `pp.cmd.rollout.*`, announces and starts
    maintenance; reads a host's last clock results from the stream when their delivery is late."""
    streams = [
        f"$JS.API.STREAM.{verb}.{name}"
        for name in (STREAM, DLQ_STREAM_NAME)
        for verb in ("INFO", "CREATE", "UPDATE")
    ]
    return User(
        "planner",
        "planner: owns the streams and KV buckets, plans and starts maintenance",
        publish=[
            subjects.host_planned(),
            subjects.host_started(),
            subjects.host_cancelled(),
            subjects.rollout_status(),
            subjects.dead_letter("planner"),
            *streams,
            "$JS.API.STREAM.NAMES",
            *_pull_consumers(STREAM, PLANNER_DURABLES),
            *(s for bucket in PLANNER_BUCKETS for s in _kv_bucket(bucket)),
            # The inventory consumer is made anew by each planner that becomes active.
            f"$JS.API.CONSUMER.DELETE.{STREAM}.planner-inventory",
            # Rollouts past their retention are purged from the bucket's stream by subject.
            f"$JS.API.STREAM.PURGE.KV_{ROLLOUTS_BUCKET}",
            # Heartbeats beyond the stream's bound per subject, once, when the bound is added.
            f"$JS.API.STREAM.PURGE.{STREAM}",
            # A host's clock results read from the stream when their delivery is late.
            f"$JS.API.STREAM.MSG.GET.{STREAM}",
        ],
        subscribe=[subjects.rollout_command("*"), *_leader_elections(STREAM, PLANNER_DURABLES)],
        responds=True,
    )


def notifier() -> User:
    """Replays the events that make up the Scheduled Events documents (ordered consumer, snapshot
    in its KV bucket; at start it reads the last of them, up to which it replays before serving),
    reads the VM events no other service reads for dead letters only (one each), publishes the
    approvals and defers of VMs."""
    return User(
        "notifier",
        "notifier: Scheduled Events API; publishes only what VMs ask (approve, defer)",
        publish=[
            subjects.host_approved(),
            subjects.host_deferred(),
            subjects.dead_letter("notifier"),
            f"$JS.API.STREAM.INFO.{STREAM}",
            f"$JS.API.STREAM.MSG.GET.{STREAM}",
            *_ordered_consumer(STREAM),
            *_kv_bucket(NOTIFIER_BUCKET),
        ],
    )


def clock_sync() -> User:
    """Consumes `VMResumed`, asks the host's agent to set the clock, reports `ClockSynced` (and
    `HostClockSynced` per host); reads a VM's last `ClockSynced` from the stream when an old
    copy of a resume comes again."""
    return User(
        "clock-sync",
        "clock-sync: asks host-agents to set guest clocks, reports the skew",
        publish=[
            subjects.vm_clock(),
            subjects.host_clock(),
            subjects.host_clock_command(),
            subjects.dead_letter("clock-sync"),
            f"$JS.API.STREAM.INFO.{STREAM}",
            *_pull_consumers(STREAM, CLOCK_SYNC_DURABLES),
            f"$JS.API.STREAM.MSG.GET.{STREAM}",
        ],
        subscribe=_leader_elections(STREAM, CLOCK_SYNC_DURABLES),
    )


def host_agent(host: str) -> User:
    """One host's agent: only its own host's subjects, only the events a host-agent emits."""
    return User(
        f"host-agent-{host}",
        f"host-agent of {host}: its own host's events only",
        publish=[
            subjects.host_inventory(host),
            subjects.host_paused(host),
            subjects.host_patched(host),
            subjects.host_completed(host),
            subjects.vm_paused(host),
            subjects.vm_resumed(host),
            subjects.dead_letter("host-agent"),
            f"$JS.API.STREAM.INFO.{STREAM}",
            *_pull_consumers(STREAM, {host_agent_durable(host): subjects.host_started(host)}),
        ],
        subscribe=[
            subjects.host_clock_command(host),
            *_leader_elections(STREAM, [host_agent_durable(host)]),
        ],
        responds=True,
    )


def operator() -> User:
    """The operator's CLI: planner commands, guest clock reads, and reading the streams."""
    read = [f"$JS.API.STREAM.INFO.{name}" for name in (STREAM, DLQ_STREAM_NAME)] + [
        s
        for name in (STREAM, DLQ_STREAM_NAME)
        for s in (
            f"$JS.API.STREAM.MSG.GET.{name}",
            f"$JS.API.DIRECT.GET.{name}.>",
            *_ephemeral_consumer(name),
            f"$JS.API.CONSUMER.INFO.{name}.*",
        )
    ]
    return User(
        "operator",
        "operator: the pausepatch CLI (commands and read-only access to the streams)",
        publish=[
            subjects.rollout_command("*"),
            subjects.host_clock_command(),
            "$JS.API.STREAM.NAMES",
            *read,
        ],
    )


def render(hosts: list[str]) -> str:
    """The `authorization` block for a fleet of `hosts`."""
    bad = [h for h in hosts if not is_valid_name(h)]
    if bad:
        raise ValueError(f"not valid host names (one subject token each): {bad}")
    users = [planner(), notifier(), clock_sync(), operator(), *(host_agent(h) for h in hosts)]
    variables = [password_variable(u.name) for u in users]
    if len(set(variables)) != len(variables):
        raise ValueError("two host names map to one password variable; rename one host")
    body = "\n".join(u.render() for u in users)
    return (
        "# Generated by deploy/nats/nats_auth.py for hosts: "
        + " ".join(hosts)
        + "\n# Do not edit: regenerate with `python deploy/nats/nats_auth.py HOST...`.\n"
        + "authorization {\n  users = [\n"
        + body
        + "\n  ]\n}\n"
    )


def main(argv: list[str] | None = None) -> None:
    """Print the users for the hosts named on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hosts", nargs="+", help="every hypervisor host that runs a host-agent")
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(render(args.hosts))
    except ValueError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    main()
