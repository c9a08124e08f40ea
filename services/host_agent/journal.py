"""The crash-safety journal: what the agent is about to pause, on disk before the first suspend."""

from __future__ import annotations

import json
import logging
import os
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


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
    """One host's open window, on disk before its first suspend: one file, rewritten in place.

    The file holds `{"crc32": ..., "entry": ...}` (the entry, or null once the window is
    closed), padded with spaces to the file's length, and each write is made durable with one
    `fdatasync` of that file: no new file, rename or directory flush per window (a record cost
    the window's thread 0.26 ms of CPU that way, 0.06 ms in place; more under load, with a
    hundred hosts' windows opening at once). A write cut short by a crash cannot be taken for a
    window: its checksum does not match, and it is read as none. It is safe to read so, because
    an in-place write is only ever cut while recording over a closed window (before the first
    suspend: nothing is paused yet) or while clearing (after the last resume). A record over a
    window still open (its VMs could not all be started, or a previous run's) and the first write
    of a process replace the file atomically instead, as every write used to; a file in that
    older format (the entry alone) is still read.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = None
        self._size = 0
        self._open = True
        """What is on disk may be an open window (so far as this process knows)."""

    def record(self, entry: JournalEntry) -> None:
        """Durably record `entry` before anything is paused."""
        data = _encode(asdict(entry))
        if self._fd is None or self._open:
            self._replace(data)
        else:
            self._overwrite(data)
        self._open = True

    def clear(self) -> None:
        """The window is closed: every VM it paused runs again (also: the journal made ready at
        start, so that the first window records in place)."""
        data = _encode(None)
        if self._fd is None:
            self._replace(data)
        else:
            self._overwrite(data)
        self._open = False

    def load(self) -> JournalEntry | None:
        """The open window a previous run left, if any."""
        try:
            stored = json.loads(self.path.read_bytes())
            if isinstance(stored, dict) and "crc32" in stored:
                entry = stored.get("entry")
                if stored["crc32"] != zlib.crc32(_canonical(entry)):
                    raise ValueError("checksum does not match: a write cut short")
            else:
                entry = stored  # the older format: the entry alone, always replaced whole
            if entry is None:
                return None
            if not isinstance(entry, dict) or not isinstance(entry.get("vms"), list):
                raise ValueError("not a journal entry")
            known = {f.name for f in fields(JournalEntry)}
            return JournalEntry(**{k: v for k, v in entry.items() if k in known})
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            # Kept aside for the operator and read as no window: see the class.
            aside = self.path.with_suffix(".corrupt")
            log.warning("unreadable pause journal %s (%s): kept as %s", self.path, exc, aside)
            self.path.replace(aside)
            return None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _replace(self, data: bytes) -> None:
        _replace_durably(self.path, data)
        self.close()
        self._fd = os.open(self.path, os.O_RDWR)
        self._size = len(data)

    def _overwrite(self, data: bytes) -> None:
        assert self._fd is not None
        os.pwrite(self._fd, data.ljust(self._size), 0)
        os.fdatasync(self._fd)
        self._size = max(self._size, len(data))


def _canonical(entry: dict[str, Any] | None) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()


def _encode(entry: dict[str, Any] | None) -> bytes:
    return json.dumps({"crc32": zlib.crc32(_canonical(entry)), "entry": entry}).encode()


class HandledEvents:
    """Scheduled events this host already ran: a redelivered or replayed start never runs twice.

    One id per line, appended and made durable (`fsync`) before the window opens; the directory
    is flushed too when the append created the file. Past `2 * keep` ids the file is rewritten
    with the last `keep` (once every `keep` adds, not at each one), atomically and durably: the
    new file is flushed before it replaces the old one and the directory after, so a crash
    leaves either list whole, never an empty file that would let a replayed start run again.
    """

    def __init__(self, path: Path, keep: int = 1000) -> None:
        self.path = path
        self.keep = keep
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            text = ""
        self._ids = text.split()
        self._set = set(self._ids)
        self._torn = bool(text) and not text.endswith("\n")
        """The last append was cut short by a crash: the next one starts on a line of its own."""

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._set

    def add(self, event_id: str) -> None:
        """Remember `event_id` durably."""
        if event_id in self._set:
            return
        self._ids.append(event_id)
        self._set.add(event_id)
        if len(self._ids) > 2 * self.keep:
            self._ids = self._ids[-self.keep :]
            self._set = set(self._ids)
            _replace_durably(self.path, ("\n".join(self._ids) + "\n").encode())
        else:
            created = not self.path.exists()
            with open(self.path, "a") as f:
                f.write(("\n" if self._torn else "") + event_id + "\n")
                f.flush()
                os.fsync(f.fileno())
            if created:
                _sync_dir(self.path.parent)
        self._torn = False


def _replace_durably(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably: a crash leaves the old or the new."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _sync_dir(path.parent)


def _sync_dir(directory: Path) -> None:
    """Flush `directory`'s entries: a file created or renamed in it survives a crash."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
