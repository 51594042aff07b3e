"""A bounded HTTP load generator for the prefork sample workload (loopback only).

    python load.py PORT SECONDS [--threads 6] [--rate 250]

Sends GET /item/<n> (80 %), /search?tag=... (18 %) and /stats (2 %) to 127.0.0.1:PORT from
THREADS threads at about RATE requests per second in total, for SECONDS seconds, then prints one
JSON line: requests, errors, and the achieved rate.  Item ids follow a skewed (Zipf-like)
distribution, so some records are hot and most are cold.
"""
import http.client
import json
import random
import sys
import threading
import time


def main() -> int:
    port, seconds = int(sys.argv[1]), float(sys.argv[2])
    threads = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 6
    rate = float(sys.argv[sys.argv.index("--rate") + 1]) if "--rate" in sys.argv else 250.0
    per_thread_gap = threads / rate
    end = time.monotonic() + seconds
    counts = {"requests": 0, "errors": 0}
    lock = threading.Lock()

    def run(seed: int) -> None:
        rng = random.Random(seed)
        nxt = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= end:
                return
            if now < nxt:
                time.sleep(nxt - now)
            nxt += per_thread_gap
            r = rng.random()
            if r < 0.80:
                path = f"/item/{min(int(rng.paretovariate(1.1)) * 7 % 60000, 59999)}"
            elif r < 0.98:
                path = f"/search?tag=tag{rng.randrange(200)}&limit=20"
            else:
                path = "/stats"
            ok = False
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", path)
                resp = c.getresponse()
                resp.read()
                ok = resp.status < 500
                c.close()
            except OSError:
                ok = False
            with lock:
                counts["requests"] += 1
                counts["errors"] += 0 if ok else 1

    t0 = time.monotonic()
    ts = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    counts["seconds"] = round(time.monotonic() - t0, 3)
    counts["rate"] = round(counts["requests"] / counts["seconds"], 1)
    print(json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
