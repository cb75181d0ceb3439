"""One client floods the server, another sends one request a second: the flooder gets 429s with ``Retry-After``, the
other is served every time, and its time to first token (TTFT) is measured against the same requests on an idle
server.

The server runs the embedded SmolLM2-135M-Instruct in this process with the default limits (``max_client_requests`` 4,
``max_batch_size`` 16) and two API keys, so the two clients are told apart by key. The flooder is a separate process (so
its loop does not share this process's interpreter lock with the server): ``FLOOD_WORKERS`` connections, twice the
per-client limit, each sending the next completion as soon as the last one answered, 429s included, ignoring
``Retry-After``. The calm client sends a streamed completion every second and times its first token: idle (before the
flood and after it, pooled, since other work on the machine changes its speed), then flooded.

The TTFT figures are measured and reported, never asserted (a timed assertion fails on a loaded machine and proves
nothing on an idle one): printed and written to ``test-artifacts/flood.json``; the issue's goal is a median TTFT under
flood within 2x of idle (README, "Serving a class", has the figures). What the test asserts: the flooder's 429s carry
``Retry-After``, every 429 is counted by the server, the flooder still gets answers and never more than its share
running at once, and the calm client is never refused.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

import decodelab
from decodelab.server import Settings, create_app
from decodelab.server.background import BackgroundServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

FLOOD_KEY, CALM_KEY = "flood-key-5d2e", "calm-key-0b7a"
SHARE = Settings(api_keys=(FLOOD_KEY, CALM_KEY)).max_client_requests  # the default per-client limit (4)
FLOOD_WORKERS = 2 * SHARE
CALM_REQUESTS = 12  # one a second, in each of the three phases
ARTIFACT = Path(__file__).resolve().parents[1] / "test-artifacts" / "flood.json"
# one token: the request ends at its first token, so the calm client really sends one a second, however slow
CALM_BODY = {"prompt": "The capital of France is", "max_tokens": 1, "temperature": 0, "stream": True}

# The flooding client: argv = base URL, key, stop file, workers; it stops sending once the stop file exists. Prints
# {"statuses": {code: count}, "retry_after": [distinct Retry-After values of the 429s], "missing_retry_after": n}.
FLOODER = textwrap.dedent("""
    import asyncio, collections, json, os, sys
    import httpx

    url, key, stop, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    body = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    statuses, retry_after, missing = collections.Counter(), set(), 0

    async def worker(client):
        global missing
        while not os.path.exists(stop):
            try:
                r = await client.post("/v1/completions", json=body)
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1
                continue
            statuses[r.status_code] += 1
            if r.status_code == 429:
                if "retry-after" in r.headers:
                    retry_after.add(r.headers["retry-after"])
                else:
                    missing += 1

    async def main():
        limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": "Bearer " + key}, timeout=120,
                                     limits=limits) as client:
            await asyncio.gather(*(worker(client) for _ in range(workers)))

    asyncio.run(main())
    print(json.dumps({"statuses": {str(k): v for k, v in statuses.items()}, "retry_after": sorted(retry_after),
                      "missing_retry_after": missing}))
""")


@pytest.fixture(scope="module")
def server(embedded):
    lm = decodelab.LM(embedded.model, embedded.tokenizer, embedded.name)
    with BackgroundServer(create_app(lm, Settings(api_keys=(FLOOD_KEY, CALM_KEY)))) as srv:
        yield srv


def first_token_seconds(client: httpx.Client) -> float:
    """Seconds from sending one streamed completion to its first token (the whole stream is then read)."""
    start = time.perf_counter()
    ttft = None
    with client.stream("POST", "/v1/completions", json=CALM_BODY) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if ttft is None and line.startswith("data: {"):
                ttft = time.perf_counter() - start
    assert ttft is not None
    return ttft


def calm_client(url: str) -> list[float]:
    """``CALM_REQUESTS`` streamed completions, one starting every second; their TTFTs in seconds."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {CALM_KEY}"}, timeout=120) as client:
        times = []
        start = time.monotonic()
        for i in range(CALM_REQUESTS):
            times.append(first_token_seconds(client))
            time.sleep(max(0.0, start + i + 1 - time.monotonic()))
        return times


def test_a_flooding_client_gets_429s_and_the_other_keeps_its_time_to_first_token(server, tmp_path):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {CALM_KEY}"}, timeout=120) as c:
        first_token_seconds(c)  # warm-up
    idle = calm_client(server.url)

    before = httpx.get(server.url + "/health").json()
    stop = tmp_path / "stop"
    started = time.monotonic()
    flooder = subprocess.Popen([sys.executable, "-c", FLOODER, server.url, FLOOD_KEY, str(stop), str(FLOOD_WORKERS)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60  # until the flooder holds its whole share
        while httpx.get(server.url + "/health").json()["running"] < SHARE:
            assert time.monotonic() < deadline and flooder.poll() is None, "the flooder never filled its share"
            time.sleep(0.1)
        busy = httpx.get(server.url + "/health").json()
        filled = time.monotonic() - started
        flooded = calm_client(server.url)  # the flood lasts until the calm client's last request has ended
        stop.touch()
        duration = time.monotonic() - started
        out, err = flooder.communicate(timeout=120)
    finally:
        if flooder.poll() is None:
            flooder.kill()
    assert flooder.returncode == 0, err
    flood = json.loads(out)
    after = httpx.get(server.url + "/health").json()
    deadline = time.monotonic() + 120
    while httpx.get(server.url + "/health").json()["running"]:  # the flood's last requests
        assert time.monotonic() < deadline
        time.sleep(0.1)
    idle_after = calm_client(server.url)

    statuses = flood["statuses"]
    rejected = statuses.get("429", 0)
    idle_before, idle = idle, idle + idle_after  # idle before and after the flood: the machine's load drifts
    report = {
        "ttft_idle_before_s": idle_before, "ttft_idle_after_s": idle_after, "ttft_flooded_s": flooded,
        "ttft_idle_median_s": statistics.median(idle), "ttft_flooded_median_s": statistics.median(flooded),
        "ratio_of_medians": statistics.median(flooded) / statistics.median(idle),
        "ttft_idle_max_s": max(idle), "ttft_flooded_max_s": max(flooded),
        "flooder_statuses": statuses, "flooder_seconds": duration, "seconds_to_fill_its_share": filled,
        "flooder_workers": FLOOD_WORKERS,
        "running_while_flooded": busy["running"], "max_rows_of_a_step": after["batching"]["max_rows"],
    }
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    ARTIFACT.write_text(json.dumps(report, indent=1))
    print(f"\nflood: calm client's TTFT median {report['ttft_idle_median_s'] * 1000:.0f} ms idle, "
          f"{report['ttft_flooded_median_s'] * 1000:.0f} ms under flood (x{report['ratio_of_medians']:.2f}); "
          f"max {max(idle) * 1000:.0f} / {max(flooded) * 1000:.0f} ms; "
          f"flooder: {statuses} in {duration:.0f} s from {FLOOD_WORKERS} connections")

    # the flooder: 429s with Retry-After, and still its fair share served
    assert rejected > 0 and flood["missing_retry_after"] == 0 and flood["retry_after"] == ["1"]
    assert statuses.get("200", 0) > 0 and set(statuses) <= {"200", "429"}, statuses
    assert after["rate_limited"] - before["rate_limited"] == rejected
    assert busy["running"] <= SHARE + 1  # its share, plus at most the calm client's one
    # the calm client: never refused (calm_client asserts its 200s); its TTFT is reported above, not asserted
