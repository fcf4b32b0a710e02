"""`python -m cortexlab.apps [--port N] [--address A] [--show]`: serve every dashboard with `panel serve`.

The index page is at `/`, each app at `/<name>` (see `cortexlab.apps.APPS`). Panel's `--warm` runs
every app once at start-up, so the models are loaded before the first browser arrives. The server
listens on loopback unless `--address` says otherwise (e.g. 0.0.0.0 to reach it from other machines).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import APPS

APP_DIR = Path(__file__).resolve().parents[2] / "apps"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve_command(port: int = 5006, address: str = "127.0.0.1", *, show: bool = False, warm: bool = True) -> list[str]:
    """The `panel serve` command line for the index page and every app in `APPS`."""
    missing = [name for name in ("index", *APPS) if not (APP_DIR / f"{name}.py").is_file()]
    if missing:
        raise FileNotFoundError(f"no app scripts {missing} in {APP_DIR}: serve the apps from a cortexlab checkout")
    files = [str(APP_DIR / f"{name}.py") for name in ("index", *APPS)]
    origins = [f"{address}:{port}", f"localhost:{port}"] if address in LOOPBACK else ["*"]   # all interfaces: any host
    command = [sys.executable, "-m", "panel", "serve", *files, "--index", "index", "--port", str(port),
               "--address", address, *(f"--allow-websocket-origin={origin}" for origin in origins)]
    return command + (["--warm"] if warm else []) + (["--show"] if show else [])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cortexlab.apps", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=5006)
    parser.add_argument("--address", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    parser.add_argument("--show", action="store_true", help="open the index page in a browser")
    args = parser.parse_args(argv)
    command = serve_command(args.port, args.address, show=args.show)
    print(f"cortexlab dashboards: http://{args.address}:{args.port}/", flush=True)
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
