"""Holds one TCP connection to a banner server (banner.py) open until someone else closes it.

Tests that a policy change closes a connection that is already open: the client connects,
reads the banner, says it is connected, then keeps talking (one line every --every seconds,
each answered) until the connection is closed by the other end.

usage:
  tcp_hold.py --host H --port P [--every S] [--timeout S]
      prints {"connected": true, "banner": "..."} once the banner arrived, then, when the
      connection was closed, {"closed": true, "after": SECONDS_SINCE_CONNECTED,
      "exchanged": N, "how": "eof" | "<error>"}

Every wait is bounded: connecting and the banner by 10 s, the whole hold by --timeout
(default 30 s).

exit status: 0 when the connection was closed by the other end, 1 when it stayed open for
the whole --timeout or failed before it was established, 2 on bad usage.
"""
import argparse
import json
import socket
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description="Hold a banner connection until it is closed.")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--every", type=float, default=0.2, help="seconds between lines")
    p.add_argument("--timeout", type=float, default=30.0, help="longest hold, seconds")
    args = p.parse_args()
    try:
        sock = socket.create_connection((args.host, args.port), timeout=10)
        banner = sock.makefile("rb").readline(4096)
    except OSError as e:
        print(f"tcp_hold: connect or banner: {e}", file=sys.stderr)
        return 1
    if not banner.startswith(b"220 "):
        print(f"tcp_hold: banner {banner!r}", file=sys.stderr)
        return 1
    connected = time.monotonic()
    print(json.dumps({"connected": True, "banner": banner.decode().strip()}), flush=True)
    exchanged = 0
    how = None
    buf = b""
    while time.monotonic() - connected < args.timeout:
        try:
            sock.settimeout(5)
            sock.sendall(b"PING %d\r\n" % exchanged)
            while b"\n" not in buf:
                chunk = sock.recv(4096)
                if not chunk:
                    how = "eof"
                    break
                buf += chunk
            if how:
                break
            _, _, buf = buf.partition(b"\n")
            exchanged += 1
        except OSError as e:
            how = type(e).__name__
            break
        time.sleep(args.every)
    if how is None:
        print(f"tcp_hold: still open after {args.timeout} s", file=sys.stderr)
        return 1
    after = round(time.monotonic() - connected, 3)
    print(json.dumps({"closed": True, "after": after, "exchanged": exchanged, "how": how}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
