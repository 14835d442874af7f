"""A small HTTP/1.1 load client for the resilience tests: COUNT requests (or requests for
DURATION seconds) to URL over CONCURRENCY keep-alive connections, and one JSON line with
what came back:

  {"total": n, "ok": n2xx, "failed": n, "statuses": {"200": n, ...},
   "pods": {pod: n},            # the "pod" field of JSON answers (the demo apps name it)
   "errors": {x-muon-error: n}, # the proxy's reason, on answers it made itself
   "exceptions": n,             # requests that got no answer at all
   "slowest_ms": {status: ms},  # the slowest answer of each status
   "seconds": elapsed}

usage: http_load.py --url URL [--count N | --duration S] [--concurrency C] [--timeout S]
exit status: 0 whatever the answers (the test judges them), 2 on bad usage.
"""
import argparse
import http.client
import json
import sys
import threading
import time
import urllib.parse


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--duration", type=float, default=0.0)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--timeout", type=float, default=10.0)
    a = p.parse_args()
    if (a.count > 0) == (a.duration > 0) or a.concurrency < 1:
        p.error("give one of --count and --duration, and a positive --concurrency")
    url = urllib.parse.urlsplit(a.url)
    path = url.path or "/"
    if url.query:
        path += "?" + url.query

    lock = threading.Lock()
    out = {"total": 0, "ok": 0, "failed": 0, "statuses": {}, "pods": {}, "errors": {},
           "exceptions": 0, "slowest_ms": {}}
    left = [a.count]
    started = time.monotonic()
    deadline = started + a.duration

    def take() -> bool:
        with lock:
            if a.count > 0:
                if left[0] <= 0:
                    return False
                left[0] -= 1
                return True
            return time.monotonic() < deadline

    def record(status, pod, error, ms):
        with lock:
            out["total"] += 1
            if status is None:
                out["exceptions"] += 1
                out["failed"] += 1
                return
            key = str(status)
            out["statuses"][key] = out["statuses"].get(key, 0) + 1
            if 200 <= status < 300:
                out["ok"] += 1
            else:
                out["failed"] += 1
            if pod:
                out["pods"][pod] = out["pods"].get(pod, 0) + 1
            if error:
                out["errors"][error] = out["errors"].get(error, 0) + 1
            out["slowest_ms"][key] = max(out["slowest_ms"].get(key, 0.0), round(ms, 1))

    def worker():
        conn = None
        while take():
            t0 = time.monotonic()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(url.hostname, url.port or 80,
                                                      timeout=a.timeout)
                conn.request("GET", path)
                resp = conn.getresponse()
                body = resp.read()
                pod = None
                try:
                    pod = json.loads(body).get("pod")
                except (ValueError, AttributeError):
                    pass
                record(resp.status, pod, resp.getheader("x-muon-error"),
                       (time.monotonic() - t0) * 1000)
                if resp.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                record(None, None, None, 0)
                if conn is not None:
                    conn.close()
                conn = None

    threads = [threading.Thread(target=worker) for _ in range(a.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["seconds"] = round(time.monotonic() - started, 3)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
