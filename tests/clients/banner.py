"""A server-first protocol (SMTP-like): the server speaks before the client sends a byte.

Tests that a proxy doing protocol detection does not wait forever for the client's first
bytes: on a port where the server talks first, the banner must still reach the client.

usage:
  banner.py serve --port 2525 [--host ::]
      accepts TCP connections ([::] dual-stack, else 0.0.0.0), writes
      "220 <pod> ready\\r\\n" at once ($POD_NAME, else the host name), then answers each
      line L with "250 L\\r\\n" until the client closes; prints "ready" once listening,
      runs until SIGTERM or SIGINT
  banner.py call --host H --port P [--line "HELO x"] [--timeout S]
      connects, reads the banner line WITHOUT sending anything first, sends LINE, reads
      the reply, checks it is "250 LINE", prints {"banner": "...", "reply": "..."}

Every network wait of the client (connect, each line) is bounded by --timeout (default
10 s).

exit status: 0 on success, 1 on any failure (with a message on stderr), 2 on bad usage.
"""
import argparse
import json
import os
import signal
import socket
import sys
import threading
import time

MAX_LINE = 64 * 1024


class Failure(Exception):
    """A check failed: the message goes to stderr and the exit status is 1."""


def pod_name() -> str:
    return os.environ.get("POD_NAME") or socket.gethostname()


def listen(host: str, port: int) -> socket.socket:
    """A listening socket: host "::" means dual-stack [::] if possible, else 0.0.0.0."""
    if host == "::":
        if socket.has_dualstack_ipv6():
            try:
                return socket.create_server(
                    ("::", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=128
                )
            except OSError as e:
                print(f"banner: [::]:{port}: {e}; trying 0.0.0.0", file=sys.stderr)
        return socket.create_server(("0.0.0.0", port), backlog=128)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=128)


def session(conn: socket.socket, banner: bytes) -> None:
    with conn:
        try:
            conn.sendall(banner)
            with conn.makefile("rb") as lines:
                while True:
                    line = lines.readline(MAX_LINE)
                    if not line:
                        return
                    conn.sendall(b"250 " + line.rstrip(b"\r\n") + b"\r\n")
        except OSError:  # the client reset or vanished: only this session ends
            return


def serve(args: argparse.Namespace) -> int:
    pod = pod_name()
    banner = f"220 {pod} ready\r\n".encode()
    try:
        sock = listen(args.host, args.port)
    except OSError as e:
        raise Failure(f"cannot listen on port {args.port}: {e}")

    def stop(*_):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = sock.getsockname()[:2]
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    print(f"banner: pod {pod} listening on {where}", file=sys.stderr, flush=True)
    print("ready", flush=True)
    with sock:
        while True:
            conn, _ = sock.accept()
            threading.Thread(target=session, args=(conn, banner), daemon=True).start()


def read_line(sock: socket.socket, buf: bytearray, deadline: float, what: str) -> str:
    """One CRLF- (or LF-) terminated line from sock, by the deadline; leftovers stay in buf."""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Failure(f"no {what} within the timeout (got {bytes(buf)[:200]!r})")
        if len(buf) > MAX_LINE:
            raise Failure(f"{what}: no end of line in {len(buf)} bytes")
        sock.settimeout(left)
        try:
            chunk = sock.recv(4096)
        except socket.timeout:
            continue
        except OSError as e:
            raise Failure(f"{what}: {e} (got {bytes(buf)[:200]!r})")
        if not chunk:
            raise Failure(f"connection closed before the {what} (got {bytes(buf)[:200]!r})")
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line.rstrip(b"\r").decode(errors="replace")


def call(args: argparse.Namespace) -> int:
    try:
        sock = socket.create_connection((args.host, args.port), timeout=args.timeout)
    except OSError as e:
        raise Failure(f"connect {args.host}:{args.port}: {e}")
    with sock:
        buf = bytearray()
        # Nothing sent yet: the banner has to come on its own.
        banner = read_line(sock, buf, time.monotonic() + args.timeout, "banner")
        if not banner.startswith("220 "):
            raise Failure(f"banner {banner!r}, expected '220 <pod> ready'")
        try:
            sock.settimeout(args.timeout)
            sock.sendall(args.line.encode() + b"\r\n")
        except OSError as e:
            raise Failure(f"send {args.line!r}: {e}")
        reply = read_line(sock, buf, time.monotonic() + args.timeout, "reply")
        if reply != "250 " + args.line:
            raise Failure(f"reply {reply!r}, expected {'250 ' + args.line!r}")
    print(json.dumps({"banner": banner, "reply": reply}), flush=True)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Server-first (banner) protocol server and client.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the banner server until SIGTERM")
    s.add_argument("--port", type=int, default=2525)
    s.add_argument("--host", default="::", help="default :: (dual-stack, else 0.0.0.0)")
    c = sub.add_parser("call", help="read the banner, then say hello")
    c.add_argument("--host", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--line", default="HELO x", help="the line sent after the banner")
    c.add_argument("--timeout", type=float, default=10.0, help="bound of each wait, seconds")
    return p


def main() -> int:
    args = parser().parse_args()
    try:
        return serve(args) if args.command == "serve" else call(args)
    except Failure as e:
        print(f"banner: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        print(f"banner: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
