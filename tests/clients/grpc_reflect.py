"""A generic gRPC client: lists the services a server offers through gRPC reflection.

Used by the end-to-end tests as "someone else's client": it knows nothing of Muon's protos,
only the standard reflection service.

usage: grpc_reflect.py HOST:PORT [SERVICE]
  without SERVICE: prints every service name, one a line
  with SERVICE:    prints every method of that service as Service/Method
"""
import sys

import grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def main() -> int:
    if len(sys.argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    with grpc.insecure_channel(sys.argv[1]) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        db = ProtoReflectionDescriptorDatabase(channel)
        if len(sys.argv) == 2:
            for name in db.get_services():
                print(name)
            return 0
        from google.protobuf.descriptor_pool import DescriptorPool

        pool = DescriptorPool(db)
        service = pool.FindServiceByName(sys.argv[2])
        for method in service.methods:
            print(f"{service.full_name}/{method.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
