"""`python -m services.planner`: the planner (settings from `PP_*` environment variables)."""

from __future__ import annotations

import asyncio


def main() -> None:
    from services.planner.main import app

    asyncio.run(app.run())


if __name__ == "__main__":
    main()
