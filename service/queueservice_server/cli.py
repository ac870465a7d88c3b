"""`queue-service serve` and `queue-service worker`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import Sequence

from queueservice_server import logs
from queueservice_server.api.auth import AuthFileError, new_token, parse_identities
from queueservice_server.api.server import serve
from queueservice_server.embedded import RedisServer
from queueservice_server.settings import Settings, SettingsError
from queueservice_server.worker.consumer import run_worker

log = logging.getLogger(__name__)


def _start_workers(redis_url: str) -> subprocess.Popen[bytes]:
    """Workers run as their own process, started before any gRPC object exists."""
    env = {**os.environ, "QUEUE_REDIS_URL": redis_url}
    return subprocess.Popen([sys.executable, "-m", "queueservice_server", "worker"], env=env)


def _stop_workers(process: subprocess.Popen[bytes], settings: Settings) -> None:
    process.terminate()
    try:
        process.wait(settings.shutdown_grace + 10)
    except subprocess.TimeoutExpired:
        log.error("workers did not stop within the grace; killing them")
        process.kill()
        process.wait()


def cmd_serve(settings: Settings) -> None:
    embedded: RedisServer | None = None
    redis_url = settings.redis_url
    if settings.embedded_redis:
        embedded = RedisServer(settings.data_dir / "redis")
        embedded.start()
        redis_url = embedded.url
    workers = _start_workers(redis_url) if settings.run_workers_in_serve else None
    where = (
        f"embedded Redis at {redis_url}, data in {settings.data_dir.resolve()}" if embedded else f"Redis {redis_url}"
    )
    in_process = f", {settings.concurrency} in-process workers" if workers else ", no in-process workers"
    try:
        asyncio.run(
            serve(settings, redis_url, on_ready=f"queue-service: gRPC on {settings.grpc_address} ({where}{in_process})")
        )
    finally:
        if workers is not None:
            _stop_workers(workers, settings)
        if embedded is not None:
            embedded.stop()


def cmd_worker(settings: Settings) -> None:
    if settings.embedded_redis:
        raise SettingsError("`worker` needs QUEUE_REDIS_URL: the embedded Redis lives inside `serve`")
    run_worker(settings, settings.redis_url)


def cmd_token(name: str, roles: str) -> None:
    """A new bearer token: its auth-file line on stdout (`>> auth-file`), the token itself on stderr, once."""
    token, credential = new_token()
    line = f"{name} {roles} {credential}"
    try:
        parse_identities(line)
    except AuthFileError as exc:
        # The reason without "QUEUE_AUTH_FILE line 1: ", which would point at a file not involved.
        raise SettingsError(str(exc).split(": ", 1)[-1]) from exc
    print(line)
    print(f"token for {name} (shown once, stored nowhere): {token}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="queue-service", description="gRPC queue service on Huey and Redis")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the gRPC server (and, on the embedded Redis, workers)")
    commands.add_parser("worker", help="run worker processes on QUEUE_REDIS_URL")
    token = commands.add_parser("token", help="make a bearer token and its QUEUE_AUTH_FILE line")
    token.add_argument("name", help="who holds it, as audit lines will name them")
    token.add_argument("roles", help="comma-separated: producer, viewer, operator")
    args = parser.parse_args(argv)
    if args.command == "token":
        try:
            cmd_token(args.name, args.roles)
        except SettingsError as exc:
            parser.exit(2, f"queue-service: {exc}\n")
        return
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        parser.exit(2, f"queue-service: {exc}\n")
    logs.configure(settings.log_level)
    try:
        {"serve": cmd_serve, "worker": cmd_worker}[args.command](settings)
    except SettingsError as exc:
        parser.exit(2, f"queue-service: {exc}\n")
    except KeyboardInterrupt:
        pass
