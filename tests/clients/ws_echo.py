"""A WebSocket echo server and client, to test HTTP/1.1 Upgrade through the mesh.

The server answers each text message M with "<pod>:M" ($POD_NAME, else the host name) and
each binary message with b"<pod>:" + M, on any path.

usage:
  ws_echo.py serve --port 8765 [--host ::]
      listens on every address, IPv6 and IPv4 ([::] dual-stack, else 0.0.0.0), prints
      "ready" once listening, runs until SIGTERM or SIGINT
  ws_echo.py call --url ws://HOST:PORT/PATH [--count N] [--header K=V]... [--timeout S]
      opens ONE WebSocket connection, sends N text messages "m0".."m<N-1>" one at a time,
      checks each reply ends with ":m<i>" and that one pod sent them all, then prints
      {"ok": N, "pod": "<pod>"}

Every network wait (connect and handshake, each reply, the close) is bounded by --timeout
(default 10 s). Needs the `websockets` package (the asyncio API of websockets >= 13, else
the legacy one).

exit status: 0 on success, 1 on any failure (with a message on stderr), 2 on bad usage.
"""
import argparse
import asyncio
import json
import os
import signal
import socket
import sys

try:  # websockets >= 13
    from websockets.asyncio.client import connect as ws_connect
    from websockets.asyncio.server import serve as ws_serve

    NEW_API = True
except ImportError:  # older releases: the legacy API
    from websockets import connect as ws_connect  # type: ignore
    from websockets import serve as ws_serve  # type: ignore

    NEW_API = False


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
                print(f"ws_echo: [::]:{port}: {e}; trying 0.0.0.0", file=sys.stderr)
        return socket.create_server(("0.0.0.0", port), backlog=128)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=128)


async def serve(args: argparse.Namespace) -> int:
    pod = pod_name()

    async def echo(ws, _path=None):  # the legacy API of old releases passes the path too
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    await ws.send(pod.encode() + b":" + message)
                else:
                    await ws.send(f"{pod}:{message}")
        except Exception as e:  # a client gone mid-message: that connection only
            print(f"ws_echo: connection: {type(e).__name__}: {e}", file=sys.stderr)

    try:
        sock = listen(args.host, args.port)
    except OSError as e:
        raise Failure(f"cannot listen on port {args.port}: {e}")
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(
            sig, lambda: stop.done() or stop.set_result(None)
        )
    async with ws_serve(echo, sock=sock, max_size=16 << 20):
        host, port = sock.getsockname()[:2]
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        print(f"ws_echo: pod {pod} listening on {where}", file=sys.stderr, flush=True)
        print("ready", flush=True)
        await stop
    return 0


async def call(args: argparse.Namespace) -> int:
    headers = []
    for item in args.header or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise Failure(f"--header wants k=v, got {item!r}")
        headers.append((key, value))
    kwargs = {"open_timeout": args.timeout, "close_timeout": args.timeout}
    if headers:
        kwargs["additional_headers" if NEW_API else "extra_headers"] = headers
    pod = None
    try:
        async with ws_connect(args.url, **kwargs) as ws:
            for i in range(args.count):
                message = f"m{i}"
                await asyncio.wait_for(ws.send(message), args.timeout)
                try:
                    reply = await asyncio.wait_for(ws.recv(), args.timeout)
                except asyncio.TimeoutError:
                    raise Failure(f"no reply to message {i} of {args.count} in {args.timeout} s")
                if not isinstance(reply, str) or not reply.endswith(":" + message):
                    raise Failure(f"message {i}: reply {reply!r}, expected '<pod>:{message}'")
                this_pod = reply[: -len(message) - 1]
                if pod is not None and this_pod != pod:
                    raise Failure(f"message {i}: reply from {this_pod!r}, earlier ones from {pod!r}")
                pod = this_pod
    except Failure:
        raise
    except asyncio.TimeoutError:
        raise Failure(f"{args.url}: timed out after {args.timeout} s")
    except Exception as e:  # refused, handshake rejected (e.g. a 4xx/5xx status), closed
        raise Failure(f"{args.url}: {type(e).__name__}: {e}")
    print(json.dumps({"ok": args.count, "pod": pod}), flush=True)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="WebSocket echo server and client.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the echo server until SIGTERM")
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--host", default="::", help="default :: (dual-stack, else 0.0.0.0)")
    c = sub.add_parser("call", help="exchange messages with an echo server")
    c.add_argument("--url", required=True, help="ws://HOST:PORT/PATH")
    c.add_argument("--count", type=int, default=10)
    c.add_argument("--header", action="append", metavar="K=V", help="extra handshake header")
    c.add_argument("--timeout", type=float, default=10.0, help="bound of each wait, seconds")
    return p


def main() -> int:
    args = parser().parse_args()
    try:
        return asyncio.run(serve(args) if args.command == "serve" else call(args))
    except Failure as e:
        print(f"ws_echo: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        print(f"ws_echo: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
