"""A gRPC echo server and client without generated code: messages are raw bytes.

Used by the end-to-end tests as a meshed gRPC workload. Service `muon.test.Echo`, every
reply prefixed with the serving pod's name ($POD_NAME, else the host name), so a test can
tell which backend answered:

  Unary         request R           -> b"<pod>|" + R, trailing metadata x-echo-pod: <pod>
  ServerStream  request b"N"        -> N messages b"<pod>|<i>", i = 0..N-1
  ClientStream  messages M1..Mk     -> b"<pod>|<k>|<total bytes of M1..Mk>"
  Bidi          each message M      -> b"<pod>|" + M, one reply per message
  Fail          anything            -> status FAILED_PRECONDITION, details "fail requested"
  Headers       anything            -> b"<pod>|" + JSON object of the request metadata

With --fail-rate F, that share of Unary calls ends in UNAVAILABLE (for the retry tests).

Unary and Headers first sleep for the request metadata x-echo-delay-ms (at most 60 s), so
a test can make a backend slow (route timeouts, DEADLINE_EXCEEDED).

Both ends accept and send messages of up to 64 MiB.

usage:
  grpc_echo.py serve --port 9090 [--host ::] [--fail-rate F]
      serves on [::]:PORT (0.0.0.0:PORT without IPv6), prints "ready" once serving,
      runs until SIGTERM or SIGINT
  grpc_echo.py call --target HOST:PORT [--timeout S] [--deadline S] [--metadata k=v]...
                    [--authority NAME] [--wait-for-ready] MODE
      MODE is one of
        unary --count K        K unary calls on one channel     {"ok": K, "pods": {pod: n}}
        big --size BYTES       one unary call of BYTES random bytes  {"ok": 1, "bytes": BYTES}
        server-stream --n N    {"ok": N, "pod": pod}
        client-stream --n N    {"ok": N, "pod": pod, "bytes": total}
        bidi --n N             lockstep: each reply awaited before the next message is sent
                               {"ok": N, "pod": pod}
        fail                   expects FAILED_PRECONDITION  {"code": ..., "details": ...}
        headers                the request metadata the server saw
                               {"pod": pod, "metadata": {...}}
        status [--method M]    one unary call of M (default Unary; any name, so an unknown
                               one gives UNIMPLEMENTED), whatever its outcome (exit 0 even
                               on an error status):
                               {"code": ..., "details": ..., "trailers": {...}, "pod": ...}
      Every mode prints one JSON line on stdout. Every call's deadline is --deadline if
      given, else --timeout (default 10 s).

exit status: 0 on success, 1 on any failure (with a message on stderr), 2 on bad usage.
"""
import os

# gRPC's default (c-ares) resolver does not read the lab's per-pod /etc/hosts (mounted by
# `ip netns exec`); getaddrinfo does, as every other app's lookups there.
os.environ.setdefault("GRPC_DNS_RESOLVER", "native")

import argparse
import base64
import json
import os
import queue
import random
import signal
import socket
import sys
import threading
import time
from concurrent import futures

import grpc

SERVICE = "muon.test.Echo"
MAX_MESSAGE = 64 * 1024 * 1024
OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
]


class Failure(Exception):
    """A check failed: the message goes to stderr and the exit status is 1."""


def pod_name() -> str:
    return os.environ.get("POD_NAME") or socket.gethostname()


def method(name: str) -> str:
    return f"/{SERVICE}/{name}"


# ---------------------------------------------------------------------------- server


def make_handler(pod: str, fail_rate: float = 0.0) -> grpc.GenericRpcHandler:
    prefix = pod.encode() + b"|"

    def delay(context: grpc.ServicerContext) -> None:
        for key, value in context.invocation_metadata():
            if key == "x-echo-delay-ms":
                try:
                    seconds = min(float(value) / 1000, 60.0)
                except ValueError:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad x-echo-delay-ms")
                end = time.monotonic() + seconds
                while context.is_active() and time.monotonic() < end:
                    time.sleep(min(0.05, max(0.0, end - time.monotonic())))

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        delay(context)
        if fail_rate and random.random() < fail_rate:
            context.abort(grpc.StatusCode.UNAVAILABLE, "failing as told (--fail-rate)")
        context.set_trailing_metadata((("x-echo-pod", pod),))
        return prefix + request

    def headers(request: bytes, context: grpc.ServicerContext) -> bytes:
        delay(context)
        context.set_trailing_metadata((("x-echo-pod", pod),))
        return prefix + json.dumps(metadata_dict(context.invocation_metadata())).encode()

    def server_stream(request: bytes, context: grpc.ServicerContext):
        try:
            n = int(request.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request must be an ASCII integer")
        for i in range(n):
            if not context.is_active():
                return
            yield prefix + str(i).encode()

    def client_stream(requests, context: grpc.ServicerContext) -> bytes:
        count = total = 0
        for message in requests:
            count += 1
            total += len(message)
        return prefix + f"{count}|{total}".encode()

    def bidi(requests, context: grpc.ServicerContext):
        for message in requests:
            yield prefix + message

    def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "fail requested")

    # No (de)serializers: requests and responses are the raw message bytes.
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
            "Headers": grpc.unary_unary_rpc_method_handler(headers),
        },
    )


def bind(server: grpc.Server, host: str, port: int) -> str:
    """Binds host:port (host "::" falls back to 0.0.0.0); returns the address bound."""
    candidates = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    if host == "::":
        candidates.append(f"0.0.0.0:{port}")
    errors = []
    for address in candidates:
        try:
            if server.add_insecure_port(address):
                return address
            errors.append(f"{address}: not bound")
        except RuntimeError as e:  # grpcio >= 1.50 raises instead of returning 0
            errors.append(f"{address}: {e}")
    raise Failure("cannot bind: " + "; ".join(errors))


def serve(args: argparse.Namespace) -> int:
    pod = pod_name()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=64),
        handlers=[make_handler(pod, args.fail_rate)],
        # No SO_REUSEPORT: a port already taken must fail here, not share the traffic.
        options=OPTIONS + [("grpc.so_reuseport", 0)],
    )
    address = bind(server, args.host, args.port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server.start()
    print(f"grpc_echo: pod {pod} serving {SERVICE} on {address}", file=sys.stderr, flush=True)
    print("ready", flush=True)
    while not stop.wait(0.5):
        pass
    server.stop(grace=1).wait(5)
    return 0


# ---------------------------------------------------------------------------- client


def parse_metadata(items) -> list:
    metadata = []
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise Failure(f"--metadata wants k=v, got {item!r}")
        metadata.append((key.lower(), value))
    return metadata


def split_reply(reply: bytes) -> tuple:
    """b"<pod>|<rest>" -> ("<pod>", b"<rest>")."""
    pod, sep, rest = reply.partition(b"|")
    if not sep:
        raise Failure(f"reply without a pod prefix: {reply[:80]!r}")
    return pod.decode(errors="replace"), rest


def metadata_dict(metadata) -> dict:
    out = {}
    for key, value in metadata or ():
        if isinstance(value, bytes):  # "-bin" keys
            value = base64.b64encode(value).decode()
        out[key] = value if key not in out else out[key] + "," + value
    return out


def rpc_failure(what: str, e: grpc.RpcError) -> Failure:
    return Failure(f"{what}: {e.code().name}: {e.details()}")


class Client:
    def __init__(self, args: argparse.Namespace):
        options = list(OPTIONS)
        if args.authority:
            options.append(("grpc.default_authority", args.authority))
        self.channel = grpc.insecure_channel(args.target, options=options)
        self.kw = {
            "timeout": args.deadline if args.deadline is not None else args.timeout,
            "metadata": parse_metadata(args.metadata) or None,
            "wait_for_ready": args.wait_for_ready,
        }

    def call(self, name: str, kind: str):
        return getattr(self.channel, kind)(method(name))  # no (de)serializers: raw bytes

    def close(self):
        self.channel.close()


def run_unary(client: Client, args) -> dict:
    call = client.call("Unary", "unary_unary")
    pods = {}
    for i in range(args.count):
        payload = f"ping-{i}".encode()
        try:
            reply = call(payload, **client.kw)
        except grpc.RpcError as e:
            raise rpc_failure(f"unary call {i} of {args.count}", e)
        pod, rest = split_reply(reply)
        if rest != payload:
            raise Failure(f"unary call {i}: echo {rest[:80]!r}, expected {payload!r}")
        pods[pod] = pods.get(pod, 0) + 1
    return {"ok": args.count, "pods": dict(sorted(pods.items()))}


def run_big(client: Client, args) -> dict:
    payload = os.urandom(args.size)
    try:
        reply = client.call("Unary", "unary_unary")(payload, **client.kw)
    except grpc.RpcError as e:
        raise rpc_failure(f"unary call of {args.size} bytes", e)
    pod, rest = split_reply(reply)
    if rest != payload:
        raise Failure(f"echo of {len(rest)} bytes differs from the {args.size} bytes sent")
    return {"ok": 1, "bytes": args.size, "pod": pod}


def one_pod(pods: set, what: str) -> str:
    if len(pods) != 1:
        raise Failure(f"{what}: replies from {sorted(pods)}, expected one pod")
    return pods.pop()


def run_server_stream(client: Client, args) -> dict:
    pods, i = set(), 0
    try:
        for message in client.call("ServerStream", "unary_stream")(
            str(args.n).encode(), **client.kw
        ):
            pod, rest = split_reply(message)
            if rest != str(i).encode():
                raise Failure(f"server-stream message {i}: {rest[:80]!r}")
            pods.add(pod)
            i += 1
    except grpc.RpcError as e:
        raise rpc_failure(f"server-stream after {i} of {args.n} messages", e)
    if i != args.n:
        raise Failure(f"server-stream: {i} messages, expected {args.n}")
    return {"ok": args.n, "pod": one_pod(pods, "server-stream") if args.n else None}


def run_client_stream(client: Client, args) -> dict:
    messages = [f"m{i}".encode() for i in range(args.n)]
    total = sum(map(len, messages))
    try:
        reply = client.call("ClientStream", "stream_unary")(iter(messages), **client.kw)
    except grpc.RpcError as e:
        raise rpc_failure("client-stream", e)
    pod, rest = split_reply(reply)
    if rest != f"{args.n}|{total}".encode():
        raise Failure(f"client-stream: server counted {rest!r}, expected {args.n}|{total}")
    return {"ok": args.n, "pod": pod, "bytes": total}


def run_bidi(client: Client, args) -> dict:
    """Lockstep: message i+1 is sent only once reply i arrived, so a proxy that holds the
    request stream until it ends (or buffers replies) makes this fail by deadline."""
    outbox: "queue.Queue" = queue.Queue()
    done = object()
    deadline = time.monotonic() + client.kw["timeout"]

    def requests():
        while True:
            try:
                item = outbox.get(timeout=max(0.0, deadline - time.monotonic()) + 1)
            except queue.Empty:  # past the deadline: the call has failed already
                return
            if item is done:
                return
            yield item

    pods = set()
    responses = client.call("Bidi", "stream_stream")(requests(), **client.kw)
    i = 0
    try:
        for i in range(args.n):
            payload = f"m{i}".encode()
            outbox.put(payload)
            reply = next(responses)
            pod, rest = split_reply(reply)
            if rest != payload:
                raise Failure(f"bidi message {i}: echo {rest[:80]!r}, expected {payload!r}")
            pods.add(pod)
        outbox.put(done)
        extra = list(responses)
        if extra:
            raise Failure(f"bidi: {len(extra)} replies more than messages sent")
    except StopIteration:
        raise Failure(f"bidi: stream ended after {i} of {args.n} replies")
    except grpc.RpcError as e:
        raise rpc_failure(f"bidi after {i} of {args.n} replies", e)
    finally:
        outbox.put(done)
        responses.cancel()
    return {"ok": args.n, "pod": one_pod(pods, "bidi") if args.n else None}


def run_fail(client: Client, args) -> dict:
    try:
        reply = client.call("Fail", "unary_unary")(b"", **client.kw)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
            raise rpc_failure("fail: expected FAILED_PRECONDITION, got", e)
        return {"code": e.code().name, "details": e.details()}
    raise Failure(f"fail: the call succeeded with {reply[:80]!r}")


def run_headers(client: Client, args) -> dict:
    try:
        reply = client.call("Headers", "unary_unary")(b"", **client.kw)
    except grpc.RpcError as e:
        raise rpc_failure("headers", e)
    pod, rest = split_reply(reply)
    return {"pod": pod, "metadata": json.loads(rest)}


def run_status(client: Client, args) -> dict:
    try:
        reply, call = client.call(args.method, "unary_unary").with_call(b"status", **client.kw)
        out = {"code": call.code().name, "details": call.details() or ""}
        out["trailers"] = metadata_dict(call.trailing_metadata())
        pod, sep, _ = reply.partition(b"|")
        out["pod"] = pod.decode(errors="replace") if sep else None
    except grpc.RpcError as e:
        out = {"code": e.code().name, "details": e.details() or ""}
        out["trailers"] = metadata_dict(e.trailing_metadata())
    return out


MODES = {
    "unary": run_unary,
    "big": run_big,
    "server-stream": run_server_stream,
    "client-stream": run_client_stream,
    "bidi": run_bidi,
    "fail": run_fail,
    "headers": run_headers,
    "status": run_status,
}


def call(args: argparse.Namespace) -> int:
    client = Client(args)
    try:
        result = MODES[args.mode](client, args)
    finally:
        client.close()
    print(json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------- main


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="gRPC echo server and client on raw bytes (muon.test.Echo)."
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the echo server until SIGTERM")
    s.add_argument("--port", type=int, default=9090)
    s.add_argument("--host", default="::", help="default :: (falls back to 0.0.0.0)")
    s.add_argument(
        "--fail-rate", type=float, default=0.0, help="share of Unary calls answered UNAVAILABLE"
    )

    c = sub.add_parser("call", help="call an echo server")
    c.add_argument("--target", required=True, help="HOST:PORT")
    c.add_argument("--timeout", type=float, default=10.0, help="per-call bound, seconds")
    c.add_argument("--deadline", type=float, help="per-call gRPC deadline (default --timeout)")
    c.add_argument("--metadata", action="append", metavar="K=V", help="request metadata")
    c.add_argument("--authority", help="the :authority to send (default the target)")
    c.add_argument(
        "--wait-for-ready", action="store_true", help="queue calls until the channel connects"
    )
    modes = c.add_subparsers(dest="mode", required=True)
    modes.add_parser("unary").add_argument("--count", type=non_negative, default=1)
    modes.add_parser("big").add_argument("--size", type=non_negative, default=32 << 20)
    for name in ("server-stream", "client-stream", "bidi"):
        modes.add_parser(name).add_argument("--n", type=non_negative, default=10)
    modes.add_parser("fail")
    modes.add_parser("headers")
    modes.add_parser("status").add_argument("--method", default="Unary")
    return p


def main() -> int:
    args = parser().parse_args()
    try:
        return serve(args) if args.command == "serve" else call(args)
    except Failure as e:
        print(f"grpc_echo: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # anything unexpected: still a clear one-line failure
        print(f"grpc_echo: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
