"""Settings every service shares: how to reach the bus. Each service subclasses `BusSettings`.

All settings are environment variables with the `PP_` prefix (pydantic-settings).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared import subjects


class BusSettings(BaseSettings):
    """NATS connection settings (`PP_NATS_URL`, `PP_NATS_USER`, `PP_NATS_PASSWORD`, ...)."""

    model_config = SettingsConfigDict(env_prefix="PP_", extra="ignore")

    nats_url: str = "nats://127.0.0.1:4222"
    """One URL, or several separated by commas (a cluster)."""
    nats_user: str | None = None
    nats_password: SecretStr | None = None
    stream_replicas: int = 1
    """Replicas of the PAUSEPATCH stream and KV buckets (3 on a cluster)."""
    stream_max_age_s: float = 7 * 24 * 3600
    """How long events stay in the PAUSEPATCH stream."""
    stream_max_per_subject: int = 8
    """Events of one subject the PAUSEPATCH stream keeps; an older one goes when a newer one
    comes (a host's inventory every heartbeat, a rollout's status). Every other subject holds
    one event per window or rollout. -1: all of them."""
    dlq_max_msgs: int = 10_000
    """Dead letters the PAUSEPATCH_DLQ stream keeps (the newest; each holds at most 64 KiB of
    its message): a flood of bad input must not fill the server's store. -1: all of them."""
    stream_max_bytes: int = -1
    """The PAUSEPATCH stream's size: past it, its oldest events go. -1: no bound but the
    server's store (a bound is reserved on the server's store when the stream is declared)."""
    js_api_timeout_s: float = 5.0
    """How long a JetStream API request (creating or looking up a consumer, reading a stream's
    state) waits for the server before it fails."""
    state_dir: Path = Path(".state")
    """Local files a service keeps (host-agent's journal)."""
    log_format: str = "auto"
    """auto (JSON when stderr is not a terminal), json or text."""
    log_level: str = "INFO"
    max_message_bytes: int = 512 * 1024
    """Larger input is dead-lettered as oversized (NATS itself refuses more than 1 MiB)."""

    @property
    def inbox_prefix(self) -> str:
        """This service's inbox prefix (`_INBOX.<user>`; its NATS user may read nothing else)."""
        return subjects.inbox_prefix(self.nats_user)

    @property
    def pull_inbox(self) -> bytes:
        """The same, as a pull consumer's delivery prefix (FastStream would use `_INBOX.`)."""
        return (self.inbox_prefix + ".").encode()

    @property
    def nats_servers(self) -> list[str]:
        """`nats_url` split into a list of servers."""
        return [u.strip() for u in self.nats_url.split(",") if u.strip()]
