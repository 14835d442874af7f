"""Misbehaving HTTP/1.1 and HTTP/2 clients on raw sockets: what does the server (or proxy) do?

Each mode prints one JSON line describing the server's reaction, and exits 0 whatever that
reaction was (a test judges it); it exits 1 only when it could not run (e.g. connection
refused), 2 on bad usage.

usage:
  http_abuse.py malformed --host H --port P
      sends "GET / HTTP/1.1", "Host: x" and a header line without a colon
  http_abuse.py oversized --host H --port P --bytes N
      sends a GET with one header "x-big: <N times 'a'>" (while reading, so an early
      answer such as 431 is seen even if the server stops reading)
  http_abuse.py slowloris --host H --port P [--interval S] [--max S] [--chunk B]
      sends "GET / HTTP/1.1", "Host: x", then B bytes (default 1) of further header lines
      every S seconds (default 1), never ending the header section, until the server
      closes the connection or --max seconds (default 30) pass
  http_abuse.py h2-silent --host H --port P [--max S]
      sends the HTTP/2 connection preface and an empty SETTINGS frame, then nothing, and
      reads until the server closes the connection or --max seconds (default 30) pass

Common options: --timeout S (default 10: connect, and the wait for an answer),
--close-wait S (default 1: after a response, how long to wait for the server to close the
connection before calling it kept open), --authority NAME (the Host header, default "x"),
--path PATH (default "/").

output:
  malformed, oversized:
    {"status": int|null, "reason": str|null, "closed": bool, "headers": {lowercased},
     "timed_out": bool, "reset": bool, "body_bytes": int, "elapsed": float, ...}
    status null: no parsable response; closed: the server closed (FIN or reset) the
    connection; timed_out: no response and no close within --timeout
  slowloris:
    {"closed_after": float|null, "status": int|null, "bytes_sent": int, "elapsed": float,
     "headers": {...}}
    closed_after: seconds from connect until the server closed (null if it never did
    within --max); status: the status of any response it sent (e.g. 408), else null
  h2-silent:
    {"closed_after": float|null, "goaway": bool, "frames": [frame type, ...]}
    goaway: the server sent a GOAWAY frame before closing
"""
import argparse
import json
import select
import socket
import sys
import threading
import time

MAX_HEAD = 1024 * 1024


class Failure(Exception):
    """Could not run at all: the message goes to stderr and the exit status is 1."""


def connect(args) -> socket.socket:
    try:
        sock = socket.create_connection((args.host, args.port), timeout=args.timeout)
    except OSError as e:
        raise Failure(f"connect {args.host}:{args.port}: {e}")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def parse_head(buf: bytes) -> dict:
    """Status line and headers of what arrived so far (the head need not be complete)."""
    out = {"status": None, "reason": None, "headers": {}, "head_complete": False}
    end = buf.find(b"\r\n\r\n")
    sep = 4
    if end < 0:
        end, sep = buf.find(b"\n\n"), 2
    out["head_complete"] = end >= 0
    head = buf if end < 0 else buf[:end]
    lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
    first = lines[0] if lines else ""
    parts = first.split(" ", 2)
    if len(parts) >= 2 and parts[0].startswith("HTTP/") and parts[1].isdigit():
        out["status"] = int(parts[1])
        out["reason"] = parts[2] if len(parts) > 2 else ""
    elif buf:
        out["first_line"] = first[:200]
    # Without a complete head, the last line may be cut short: keep only finished lines.
    finished = lines[1:] if end >= 0 else lines[1:-1]
    for line in finished:
        name, colon, value = line.partition(":")
        if colon and name.strip():
            key = name.strip().lower()
            value = value.strip()
            out["headers"][key] = value if key not in out["headers"] else (
                out["headers"][key] + ", " + value
            )
    out["body_offset"] = end + sep if end >= 0 else None
    return out


def recv_some(sock: socket.socket, wait: float):
    """(data, event): data b"" with event "eof" or "reset"; None, "idle" if nothing came."""
    try:
        ready, _, _ = select.select([sock], [], [], max(0.0, wait))
        if not ready:
            return None, "idle"
        data = sock.recv(65536)
    except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
        return b"", "reset"
    except OSError:
        return b"", "reset"
    return data, ("data" if data else "eof")


def read_response(sock: socket.socket, args, start: float) -> dict:
    """Reads the server's answer: the head (by --timeout), then whatever follows until the
    server closes or stays quiet for --close-wait."""
    buf = bytearray()
    deadline = start + args.timeout
    closed = reset = timed_out = False
    head = parse_head(b"")
    # The head, by the deadline.
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        data, event = recv_some(sock, left)
        if event in ("eof", "reset"):
            closed, reset = True, event == "reset"
            break
        if data:
            buf += data
            head = parse_head(bytes(buf))
            if head["head_complete"] or len(buf) > MAX_HEAD:
                break
    head = parse_head(bytes(buf))
    # After a response: the body, then does the server close the connection?
    if not closed and not timed_out:
        hard_end = time.monotonic() + max(args.timeout, args.close_wait)
        while time.monotonic() < hard_end:
            data, event = recv_some(sock, min(args.close_wait, hard_end - time.monotonic()))
            if event == "idle":
                break
            if event in ("eof", "reset"):
                closed, reset = True, event == "reset"
                break
            buf += data
    out = {
        "status": head["status"],
        "reason": head["reason"],
        "closed": closed,
        "headers": head["headers"],
        "timed_out": timed_out,
        "reset": reset,
        "body_bytes": (len(buf) - head["body_offset"]) if head["body_offset"] is not None else 0,
        "elapsed": round(time.monotonic() - start, 3),
    }
    if "first_line" in head:
        out["first_line"] = head["first_line"]
    return out


def request_head(args, extra: bytes = b"") -> bytes:
    return f"GET {args.path} HTTP/1.1\r\nHost: {args.authority}\r\n".encode() + extra


def run_malformed(args) -> dict:
    sock = connect(args)
    with sock:
        start = time.monotonic()
        try:
            sock.sendall(request_head(args, b"Bad Header Without Colon\r\n\r\n"))
        except OSError as e:
            return {"status": None, "closed": True, "headers": {}, "send_error": str(e)}
        return read_response(sock, args, start)


def run_oversized(args) -> dict:
    data = request_head(args, b"x-big: " + b"a" * args.bytes + b"\r\n\r\n")
    sock = connect(args)
    sent = [0]
    send_error = [None]

    def sender():
        view = memoryview(data)
        try:
            while sent[0] < len(view):
                sent[0] += sock.send(view[sent[0] : sent[0] + 65536])
        except OSError as e:  # the server closed, reset, or stopped reading (timeout)
            send_error[0] = f"{type(e).__name__}: {e}"

    with sock:
        start = time.monotonic()
        thread = threading.Thread(target=sender, daemon=True)
        thread.start()
        out = read_response(sock, args, start)
        thread.join(0.5)
    out["bytes_sent"] = sent[0]
    out["bytes_total"] = len(data)
    out["send_error"] = send_error[0]
    return out


def slow_bytes():
    """Endless header lines, never the blank line that would end the head."""
    k = 0
    while True:
        yield from f"x-slow-{k}: y\r\n".encode()
        k += 1


def run_slowloris(args) -> dict:
    sock = connect(args)
    with sock:
        start = time.monotonic()
        end = start + args.max
        bytes_sent = 0
        buf = bytearray()
        closed_after = None
        try:
            sock.sendall(request_head(args))
            bytes_sent = len(request_head(args))
        except OSError:
            closed_after = time.monotonic() - start
        trickle = slow_bytes()
        next_send = start + args.interval
        while closed_after is None:
            now = time.monotonic()
            if now >= end:
                break
            answered = parse_head(bytes(buf))["status"] is not None
            if now >= next_send and not answered:  # once answered, only wait for the close
                chunk = bytes(next(trickle) for _ in range(args.chunk))
                try:
                    sock.sendall(chunk)
                    bytes_sent += len(chunk)
                except OSError:
                    closed_after = time.monotonic() - start
                    break
                next_send += args.interval
            wake = end if answered else min(next_send, end)
            data, event = recv_some(sock, wake - time.monotonic())
            if event in ("eof", "reset"):
                closed_after = time.monotonic() - start
            elif data:
                buf += data
        head = parse_head(bytes(buf))
        return {
            "closed_after": None if closed_after is None else round(closed_after, 3),
            "status": head["status"],
            "bytes_sent": bytes_sent,
            "elapsed": round(time.monotonic() - start, 3),
            "headers": head["headers"],
        }


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_GOAWAY = 7


def h2_frame_types(buf: bytes) -> list:
    """The types of the whole frames in buf, in order."""
    types, i = [], 0
    while i + 9 <= len(buf):
        length = int.from_bytes(buf[i : i + 3], "big")
        if i + 9 + length > len(buf):
            break
        types.append(buf[i + 3])
        i += 9 + length
    return types


def run_h2_silent(args) -> dict:
    sock = connect(args)
    with sock:
        start = time.monotonic()
        end = start + args.max
        # The preface and an empty SETTINGS frame (type 4), then silence.
        sock.sendall(H2_PREFACE + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
        buf = bytearray()
        closed_after = None
        while time.monotonic() < end:
            data, event = recv_some(sock, end - time.monotonic())
            if data:
                buf += data
            if event in ("eof", "reset"):
                closed_after = time.monotonic() - start
                break
        frames = h2_frame_types(bytes(buf))
        return {
            "closed_after": None if closed_after is None else round(closed_after, 3),
            "goaway": H2_GOAWAY in frames,
            "frames": frames,
        }


MODES = {
    "malformed": run_malformed,
    "oversized": run_oversized,
    "slowloris": run_slowloris,
    "h2-silent": run_h2_silent,
}


def positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Misbehaving raw-socket HTTP/1.1 clients.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--host", required=True)
    common.add_argument("--port", type=int, required=True)
    common.add_argument("--timeout", type=positive, default=10.0,
                        help="connect and answer bound, seconds")
    common.add_argument("--close-wait", type=positive, default=1.0,
                        help="after a response, how long to wait for the close")
    common.add_argument("--authority", default="x", help="the Host header")
    common.add_argument("--path", default="/")
    sub = p.add_subparsers(dest="mode", required=True)
    sub.add_parser("malformed", parents=[common], help="a header line without a colon")
    o = sub.add_parser("oversized", parents=[common], help="one huge header")
    o.add_argument("--bytes", type=int, default=100_000, help="length of the x-big value")
    s = sub.add_parser("slowloris", parents=[common], help="a head that never ends")
    s.add_argument("--interval", type=positive, default=1.0, help="seconds between sends")
    s.add_argument("--max", type=positive, default=30.0, help="give up after, seconds")
    s.add_argument("--chunk", type=int, default=1, help="bytes per send")
    h = sub.add_parser("h2-silent", parents=[common], help="an HTTP/2 preface, then nothing")
    h.add_argument("--max", type=positive, default=30.0, help="give up after, seconds")
    return p


def main() -> int:
    args = parser().parse_args()
    try:
        result = MODES[args.mode](args)
    except Failure as e:
        print(f"http_abuse: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        print(f"http_abuse: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
