"""The crash-safety journal: what the agent is about to pause, on disk before the first suspend."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class JournalEntry:
    """One open window."""

    rollout_id: str | None
    scheduled_event_id: str | None
    event_type: str
    vms: list[str]
    started_at: float
    """Wall clock (epoch seconds) when the window opened."""
    budget_s: float
    window_id: str | None = None
    """Also in the patch's environment (`PP_WINDOW_ID`): what it left running is found by it."""


class PauseJournal:
    """A single JSON file per host, replaced atomically and fsynced (file and directory)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, entry: JournalEntry) -> None:
        """Durably record `entry` before anything is paused."""
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(asdict(entry), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._sync_dir()

    def load(self) -> JournalEntry | None:
        """The open window a previous run left, if any."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            # A torn write cannot happen with the atomic replace; an unreadable file is kept
            # aside for the operator and treated as empty.
            self.path.rename(self.path.with_suffix(".corrupt"))
            return None
        return JournalEntry(**data)

    def clear(self) -> None:
        """The window is closed: every VM it paused runs again."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return
        self._sync_dir()

    def _sync_dir(self) -> None:
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class HandledEvents:
    """Scheduled events this host already ran: a redelivered or replayed start never runs twice."""

    def __init__(self, path: Path, keep: int = 1000) -> None:
        self.path = path
        self.keep = keep
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._ids = self.path.read_text().split()
        except FileNotFoundError:
            self._ids = []
        self._set = set(self._ids)

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._set

    def add(self, event_id: str) -> None:
        """Remember `event_id` durably."""
        if event_id in self._set:
            return
        self._ids.append(event_id)
        self._set.add(event_id)
        if len(self._ids) > self.keep:
            self._ids = self._ids[-self.keep :]
            self._set = set(self._ids)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("\n".join(self._ids) + "\n")
            os.replace(tmp, self.path)
            return
        with open(self.path, "a") as f:
            f.write(event_id + "\n")
            f.flush()
            os.fsync(f.fileno())
