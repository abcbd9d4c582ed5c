"""Times GET requests against the API from a process of its own, until its stdin closes.

`python latency_probe.py URL TOKEN PATH`: every 50 ms, a GET of PATH (with the bearer TOKEN, or none
where TOKEN is '-'); on exit, one JSON line per request: {"status", "seconds"}.

The load scenario runs it apart from its load generator: 250 threads in one Python process share one
interpreter lock, and a timer among them would measure its own wait for the lock (up to seconds), not
the server.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import httpx


def main(url: str, token: str, path: str) -> None:
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    headers = {} if token == "-" else {"Authorization": f"Bearer {token}"}
    timings = []
    with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
        while not stop.wait(0.05):
            started = time.monotonic()
            try:
                status = http.get(path).status_code
            except httpx.HTTPError:
                status = 0  # no answer within the timeout
            timings.append({"status": status, "seconds": time.monotonic() - started})
    for timing in timings:
        print(json.dumps(timing))


if __name__ == "__main__":
    main(*sys.argv[1:4])
