"""`python -m services.notifier --listen HOST:PORT`."""

from __future__ import annotations

import argparse
import asyncio
import os


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m services.notifier", description=__doc__)
    parser.add_argument("--listen", help="HOST:PORT of the Scheduled Events API (env PP_LISTEN)")
    args = parser.parse_args()
    if args.listen:
        os.environ["PP_LISTEN"] = args.listen
    from services.notifier.main import app

    asyncio.run(app.run())


if __name__ == "__main__":
    main()
