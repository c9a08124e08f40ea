"""`python -m services.planner`: the planner (settings from `PP_*` environment variables)."""

from __future__ import annotations

import uvloop


def main() -> None:
    from services.planner.main import app

    # uvloop: less CPU per message than asyncio's own loop (every event goes through it).
    uvloop.run(app.run())


if __name__ == "__main__":
    main()
