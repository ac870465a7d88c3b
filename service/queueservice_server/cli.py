"""`queue-service serve` and `queue-service worker`.

Start-up problems end the process with one line on stderr naming the setting to fix,
never a traceback: exit code 2 when a setting's value cannot be used (SettingsError,
including an unimportable QUEUE_TASK_MODULES), 1 when the machine refuses it (the gRPC
or /metrics address in use, QUEUE_DATA_DIR held by another `serve`, the embedded Redis
not starting). An unreachable QUEUE_REDIS_URL is said once and is no error: the server
answers NOT_SERVING and the workers wait until Redis answers.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from contextlib import ExitStack

import redis

from queueservice_server import logs
from queueservice_server.api.auth import AuthFileError, new_token, parse_identities
from queueservice_server.api.server import BindError, serve
from queueservice_server.core.redis import redacted_url, sync_client
from queueservice_server.embedded import DataDirError, DataDirLock, EmbeddedRedisError, RedisServer, bind_problem
from queueservice_server.settings import Settings, SettingsError, unknown_variables
from queueservice_server.tasks import load_tasks
from queueservice_server.worker.consumer import run_worker

log = logging.getLogger(__name__)

# What the machine refuses at start (exit 1); SettingsError is a value to fix (exit 2).
_REFUSED = (BindError, DataDirError, EmbeddedRedisError)


def _start_workers(redis_url: str) -> subprocess.Popen[bytes]:
    """Workers run as their own process, started before any gRPC object exists."""
    # Without the variables that are no setting: `serve` has warned about them already.
    unknown = unknown_variables()
    env = {**{k: v for k, v in os.environ.items() if k not in unknown}, "QUEUE_REDIS_URL": redis_url}
    return subprocess.Popen([sys.executable, "-m", "queueservice_server", "worker"], env=env)


def _stop_workers(process: subprocess.Popen[bytes], settings: Settings) -> None:
    process.terminate()
    try:
        process.wait(settings.shutdown_grace + 10)
    except subprocess.TimeoutExpired:
        log.error("workers did not stop within the grace; killing them")
        process.kill()
        process.wait()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _check_addresses(settings: Settings) -> None:
    """Before anything starts: a port in use fails here, with its setting's name."""
    for name, address in (
        ("QUEUE_GRPC_ADDRESS", settings.grpc_address),
        ("QUEUE_METRICS_ADDRESS", settings.metrics_address),
    ):
        problem = bind_problem(address) if address else ""
        if problem:
            raise BindError(f"{name}={address}: cannot bind: {problem}")


def _say_if_unreachable(settings: Settings, redis_url: str, meanwhile: str) -> None:
    """One warning when QUEUE_REDIS_URL does not answer at start; running on is right (Redis may
    start after us), but the operator should hear it once, with the URL, before any retry noise."""
    client = sync_client(settings, redis_url)
    try:
        client.ping()
    except redis.RedisError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        log.warning("QUEUE_REDIS_URL=%s does not answer (%s); %s", redacted_url(redis_url), first, meanwhile)
    finally:
        client.close()


def cmd_serve(settings: Settings) -> None:
    # Until the server installs its own handler, SIGTERM stops like Ctrl-C: what has started (workers,
    # the embedded Redis, each in a session of its own) is stopped, not orphaned. Not in `worker`: its
    # forked children ignore SIGTERM, so an interrupted start would wait for them forever.
    signal.signal(signal.SIGTERM, _interrupt)
    # An unimportable task module fails here, before Redis or workers start (the server imports them again).
    load_tasks(settings.task_modules, diag=settings.diag_enabled)
    _check_addresses(settings)
    with ExitStack() as stack:
        redis_url = settings.redis_url
        if settings.embedded_redis:
            # Two embedded Redis servers on one AOF corrupt it: hold the data dir for as long as we serve.
            stack.enter_context(DataDirLock(settings.data_dir))
            embedded = RedisServer(settings.data_dir / "redis")
            stack.callback(embedded.stop)
            embedded.start()
            redis_url = embedded.url
            where = f"embedded Redis at {redis_url}, data in {settings.data_dir.resolve()}"
        else:
            _say_if_unreachable(settings, redis_url, "serving NOT_SERVING until it does")
            where = f"Redis {redacted_url(redis_url)}"
        if settings.run_workers_in_serve:
            workers = _start_workers(redis_url)
            stack.callback(_stop_workers, workers, settings)
            in_process = f", {settings.concurrency} in-process workers"
        else:
            in_process = ", no in-process workers"
        asyncio.run(
            serve(settings, redis_url, on_ready=f"queue-service: gRPC on {settings.grpc_address} ({where}{in_process})")
        )


def cmd_worker(settings: Settings) -> None:
    if settings.embedded_redis:
        raise SettingsError("`worker` needs QUEUE_REDIS_URL: the embedded Redis lives inside `serve`")
    load_tasks(settings.task_modules, diag=settings.diag_enabled)
    _say_if_unreachable(settings, settings.redis_url, "workers wait until it does")
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
    try:
        logs.configure(settings.log_level)
    except ValueError as exc:  # logging's own check of the level name
        parser.exit(2, f"queue-service: QUEUE_LOG_LEVEL={settings.log_level!r}: {exc}\n")
    for name, closest in unknown_variables().items():
        hint = f"; did you mean {closest}?" if closest else ""
        log.warning("%s is not a setting and is ignored%s", name, hint, extra={"variable": name, "closest": closest})
    try:
        {"serve": cmd_serve, "worker": cmd_worker}[args.command](settings)
    except SettingsError as exc:
        parser.exit(2, f"queue-service: {exc}\n")
    except _REFUSED as exc:
        parser.exit(1, f"queue-service: {exc}\n")
    except KeyboardInterrupt:
        pass
