"""A generic gRPC client: lists the services a server offers through gRPC reflection.

Used by the end-to-end tests as "someone else's client": it knows nothing of Muon's protos,
only the standard reflection service.

usage: grpc_reflect.py [--ca FILE] HOST:PORT [SERVICE | --call SERVICE/METHOD]
  without SERVICE: prints every service name, one a line
  with SERVICE:    prints every method of that service as Service/Method
  --call S/M:      calls the method with an empty request (its types found through
                   reflection; a streaming method gets one and its first answer is read)
                   and prints "OK" or "ERROR <STATUS_CODE>: <details>"
  --ca FILE:       TLS, trusting the roots in FILE (PEM); without it, plaintext
"""
import sys

import grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def main() -> int:
    args = sys.argv[1:]
    ca = None
    if args[:1] == ["--ca"] and len(args) >= 2:
        ca, args = args[1], args[2:]
    call = None
    if len(args) == 3 and args[1] == "--call":
        call, args = args[2], args[:1]
    if len(args) not in (1, 2):
        print(__doc__, file=sys.stderr)
        return 2
    if ca:
        with open(ca, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        channel = grpc.secure_channel(args[0], creds)
    else:
        channel = grpc.insecure_channel(args[0])
    with channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        db = ProtoReflectionDescriptorDatabase(channel)
        if call:
            return call_empty(channel, db, call)
        if len(args) == 1:
            for name in db.get_services():
                print(name)
            return 0
        from google.protobuf.descriptor_pool import DescriptorPool

        pool = DescriptorPool(db)
        service = pool.FindServiceByName(args[1])
        for method in service.methods:
            print(f"{service.full_name}/{method.name}")
    return 0


def call_empty(channel, db, call: str) -> int:
    from google.protobuf.descriptor_pool import DescriptorPool
    from google.protobuf import message_factory

    service_name, method_name = call.rsplit("/", 1)
    pool = DescriptorPool(db)
    method = pool.FindServiceByName(service_name).FindMethodByName(method_name)
    request = message_factory.GetMessageClass(method.input_type)
    response = message_factory.GetMessageClass(method.output_type)
    kind = (
        channel.stream_stream
        if method.client_streaming or method.server_streaming
        else channel.unary_unary
    )
    stub = kind(
        f"/{service_name}/{method_name}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response.FromString,
    )
    try:
        if kind == channel.unary_unary:
            stub(request(), timeout=10)
        else:
            # A stream: one empty request, and the first answer.
            next(stub(iter([request()]), timeout=10))
        print("OK")
    except grpc.RpcError as e:
        print(f"ERROR {e.code().name}: {e.details()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
