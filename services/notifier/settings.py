"""notifier settings: environment variables with the `PP_` prefix."""

from __future__ import annotations

from shared.settings import BusSettings


class NotifierSettings(BusSettings):
    """notifier settings (`PP_LISTEN`, `PP_WEBHOOKS`, `PP_MAX_DEFERS`, ...)."""

    listen: str = "127.0.0.1:8080"
    """HOST:PORT of the Scheduled Events API (the VMs reach it as 169.254.169.254:80)."""
    max_defers: int = 1
    """Defers a VM may ask per scheduled event; the planner reads the same `PP_MAX_DEFERS`."""
    max_defer_s: float = 600.0
    """Longest postponement one defer may ask; the planner reads the same `PP_MAX_DEFER_S`."""
    extended_retention_s: float = 3600.0
    """How long the extended view keeps an event after it completed or was canceled. Replicas
    must agree on it (it is part of the extended view's incarnation)."""
    long_poll_max_s: float = 300.0
    """Longest `timeout_sec` of a `wait_for_change` request."""
    webhooks: str = ""
    """Comma-separated URLs that receive every change of a scheduled event as a CloudEvent."""
    webhook_max_attempts: int = 8
    """Deliveries tried per CloudEvent and URL before it is dropped (logged)."""
    webhook_backoff_s: float = 0.5
    """First retry delay; doubled on every further attempt."""
    webhook_backoff_max_s: float = 30.0
    """Longest delay between two attempts (a `Retry-After` is honoured up to this)."""
    webhook_timeout_s: float = 5.0
    """One delivery attempt's timeout."""
    webhook_queue_max: int = 10_000
    """CloudEvents queued per URL; beyond it the oldest is dropped (logged)."""
    webhook_max_age_s: float = 120.0
    """Changes older than this when applied (replayed at start) are not pushed again."""
    snapshot_bucket: str = "pp_notifier"
    """KV bucket holding the documents' snapshot (any replica may write it)."""
    snapshot_every: int = 5000
    """Write a snapshot after this many events replayed (those of hosts and rollouts; or as many
    as the snapshot holds records, if more) ..."""
    snapshot_interval_s: float = 30.0
    """... or this long after the last one, whichever comes first."""
    catch_up_timeout_s: float = 120.0
    """At start, the API opens once the replay reached the last event of hosts and rollouts the
    stream held, or after this long at most."""
    replay_heartbeat_s: float = 5.0
    """The server's idle heartbeat on the replay's consumer: two missed (the server lost the
    consumer: a node failed, it was deleted), and the replay is made again from the next event."""

    @property
    def webhook_urls(self) -> list[str]:
        """`webhooks` split into a list."""
        return [u.strip() for u in self.webhooks.split(",") if u.strip()]
