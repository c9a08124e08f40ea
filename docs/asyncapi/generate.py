"""Writes the AsyncAPI documents of the bus, one per service, from the services' FastStream apps
with `faststream docs gen` (what each app subscribes to, with the payload schemas of
shared/contracts.py).

    python docs/asyncapi/generate.py          # rewrite docs/asyncapi/<service>.yaml
    python docs/asyncapi/generate.py --check  # exit 1 when a document is out of date

Per-host subjects are shown for a host named HOST; the server is the compose stack's `nats`.
Channels, operations, messages and schemas are sorted by name, so that a change in a service shows
as a change of its own lines (faststream's order follows internal hashes).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
APPS = {
    "planner": "services.planner.main:app",
    "notifier": "services.notifier.main:app",
    "clock-sync": "services.clock_sync.main:app",
    "host-agent": "services.host_agent.main:app",
}
ENV = {
    "PP_HOST": "HOST",
    "PP_NATS_URL": "nats://nats:4222",
    "PP_LOG_FORMAT": "text",
    "OTEL_SDK_DISABLED": "true",
}


def generate(out_dir: Path) -> dict[str, Path]:
    """Every service's document in `out_dir` (the apps are imported in parallel processes)."""
    faststream = Path(sys.executable).parent / "faststream"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PP_", "OTEL_"))} | ENV
    paths = {name: out_dir / f"{name}.yaml" for name in APPS}
    procs = {
        name: subprocess.Popen(
            [
                str(faststream),
                "docs",
                "gen",
                "--yaml",
                "--app-dir",
                str(REPO),
                "-o",
                str(path),
                APPS[name],
            ],
            cwd=out_dir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, path in paths.items()
    }
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"faststream docs gen {APPS[name]} failed:\n{output}")
    return paths


def normalized(text: str) -> str:
    """The document with its named sections in name order."""
    doc: dict[str, Any] = yaml.safe_load(text)
    for section in (doc, doc.get("components", {})):
        for key in ("channels", "operations", "messages", "schemas"):
            if isinstance(section.get(key), dict):
                section[key] = dict(sorted(section[key].items()))
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=100)


def main(argv: list[str] | None = None) -> int:
    """Write the documents, or with --check say which ones are stale."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 if stale")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        stale = []
        for path in generate(Path(tmp)).values():
            target = HERE / path.name
            fresh = normalized(path.read_text())
            if not target.exists() or target.read_text() != fresh:
                stale.append(target.name)
                if not args.check:
                    target.write_text(fresh)
    if args.check and stale:
        print(f"stale: {', '.join(stale)}; run python docs/asyncapi/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
