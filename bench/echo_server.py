"""`python -m bench.echo_server HOST:PORT`: the bare baseline for gRPC rows.

A grpc.aio server with one generic unary handler that answers with the
request bytes, built with the service's own server options and nothing else
(no servicer, no validation, no Redis). Prints `echo: gRPC on ...` once it
serves; stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import grpc
import grpc.aio

from queueservice_server.api.server import server_options
from queueservice_server.settings import Settings

SERVICE = "bench.Echo"
METHOD = f"/{SERVICE}/Echo"


async def _echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


async def serve(address: str, settings: Settings) -> None:
    server = grpc.aio.server(options=server_options(settings))
    handler = grpc.method_handlers_generic_handler(SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(_echo)})
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(address)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"echo: gRPC on {address}", flush=True)
    await stop.wait()
    await server.stop(0)


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], Settings.from_env()))
