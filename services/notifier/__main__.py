"""`python -m services.notifier --listen HOST:PORT`."""

from __future__ import annotations

import argparse
import os

import uvloop


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m services.notifier", description=__doc__)
    parser.add_argument("--listen", help="HOST:PORT of the Scheduled Events API (env PP_LISTEN)")
    args = parser.parse_args()
    if args.listen:
        os.environ["PP_LISTEN"] = args.listen
    from services.notifier.main import app

    # uvloop: the API answers every VM's poll (once a second each), so the event loop is hot.
    uvloop.run(app.run())


if __name__ == "__main__":
    main()
