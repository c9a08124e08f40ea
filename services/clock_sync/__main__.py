"""`python -m services.clock_sync`: clock-sync (settings from `PP_*` environment variables)."""

from __future__ import annotations

import asyncio


def main() -> None:
    from services.clock_sync.main import app

    asyncio.run(app.run())


if __name__ == "__main__":
    main()
