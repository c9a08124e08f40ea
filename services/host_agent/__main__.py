"""`python -m services.host_agent --host NAME --libvirt-uri URI`."""

from __future__ import annotations

import argparse
import os

import uvloop


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m services.host_agent", description=__doc__)
    parser.add_argument("--host", help="this host's name (env PP_HOST; default: hostname)")
    parser.add_argument("--libvirt-uri", help="libvirt URI (env PP_LIBVIRT_URI)")
    parser.add_argument(
        "--fleet", help="simulations: serve every host of this JSON-lines file (env PP_FLEET_FILE)"
    )
    args = parser.parse_args()
    if args.fleet:
        os.environ["PP_FLEET_FILE"] = args.fleet
    if args.host:
        os.environ["PP_HOST"] = args.host
    if args.libvirt_uri:
        os.environ["PP_LIBVIRT_URI"] = args.libvirt_uri
    from services.host_agent.main import app

    # uvloop: less CPU per message than asyncio's own loop (every event goes through it).
    uvloop.run(app.run())


if __name__ == "__main__":
    main()
