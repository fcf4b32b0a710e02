"""First paint of each dashboard in a real browser, against a bare Panel page served the same way.

    python benchmarks/bench_apps_paint.py          # writes results/bench_apps_paint.json

Serves the index and every app with the README's main command (`python -m cortexlab.apps`, models
warmed at start-up) plus a peer page: one Panel template with one plotly figure and no model, the
floor that Bokeh, Panel and plotly.js cost before any cortexlab work. Each page is opened in a fresh
headless Debian chromium tab (Playwright, /usr/bin/chromium) until its first plotly plot is drawn;
--repeats rounds, round-robin, median reported, with the ratio to the peer measured in the same run.
The issue's target is a first paint within 10 s once the model cache is warm.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cortexlab.apps import APPS  # noqa: E402
from cortexlab.apps.__main__ import serve_command  # noqa: E402

PEER = '''
import panel as pn
import plotly.graph_objects as go
from cortexlab.apps import common

pn.extension("plotly")
common.page("peer", "A bare page: one plotly figure, no model.",
            pn.pane.Plotly(go.Figure(go.Scatter(y=[1, 3, 2])))).servable()
'''
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def wait_for_server(url: str, process: subprocess.Popen, timeout: float = 300) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=5)
            return time.monotonic() - start
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"no answer from {url} within {timeout} s")


def first_paint(browser, url: str) -> float:
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    start = time.monotonic()
    page.goto(url)
    page.locator(".js-plotly-plot").first.wait_for(timeout=120_000)
    seconds = time.monotonic() - start
    page.close()
    return seconds


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=5077)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "results" / "bench_apps_paint.json"))
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        peer = Path(tmp) / "peer.py"
        peer.write_text(PEER)
        command = serve_command(args.port)
        command.insert(command.index("--index"), str(peer))          # panel takes its files before the options
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{args.port}"
            startup = wait_for_server(url + "/", process)
            pages = ["peer", *APPS]
            times = {name: [] for name in pages}
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
                first_paint(browser, f"{url}/peer")                  # warm the browser's cache of the JS bundles
                for _ in range(args.repeats):
                    for name in pages:
                        times[name].append(first_paint(browser, f"{url}/{name}"))
                browser.close()
        finally:
            process.terminate()
            process.wait(timeout=30)
    peer_median = statistics.median(times["peer"])
    rows = {name: {"median_s": round(statistics.median(t), 2), "max_s": round(max(t), 2),
                   "vs_peer": round(statistics.median(t) / peer_median, 2)} for name, t in times.items()}
    print(f"server start-up (models warmed): {startup:.1f} s; first paint, median of {args.repeats}:")
    for name, row in rows.items():
        print(f"  {name:16s} {row['median_s']:6.2f} s (max {row['max_s']:.2f})  x{row['vs_peer']:.2f} the bare page")
    result = {"command": "python " + " ".join([Path(__file__).relative_to(REPO).as_posix(), *(argv or sys.argv[1:])]),
              "startup_s": round(startup, 1), "repeats": args.repeats, "pages": rows,
              "target": "first paint within 10 s once the model cache is warm"}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
