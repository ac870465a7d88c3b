"""One settings object, read from `QUEUE_*` environment variables.

Every variable is listed, with its default, in the README's settings table.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

QUEUE_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# Room a job's fields other than its payload take in a message (task, queue, idempotency key of
# at most 256, times), and in GetJob's answer (its last error, timestamps), with plenty to spare.
MESSAGE_ENVELOPE_BYTES = 64 * 1024


def window_minute_count(window_s: float) -> int:
    """The most epoch minutes a window of `window_s` seconds ending at any time touches."""
    return math.ceil(window_s / 60) + 1


class SettingsError(ValueError):
    """A `QUEUE_*` variable holds a value that cannot be used."""


def _csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"expected true/false, got {value!r}")


@dataclass(frozen=True)
class Settings:
    env: str = "dev"
    redis_url: str = ""
    grpc_address: str = "127.0.0.1:50051"
    data_dir: Path = Path(".queue-data")
    task_modules: tuple[str, ...] = ()
    # None means: on in dev, off in prod (diag.fail and diag.sleep are not for production traffic).
    diag_tasks: bool | None = None
    queues: tuple[str, ...] = ("default",)
    # None means: 3 in dev, 10 in prod.
    worker_concurrency: int | None = None
    # `serve` runs workers in-process only on the embedded Redis unless asked.
    serve_workers: bool | None = None
    poll_interval: float = 0.1
    stall_interval: float = 30.0
    max_payload_bytes: int = 1024 * 1024
    max_batch_size: int = 1000
    # Sized to the batch limit, not to "anything": a full EnqueueBatch (QUEUE_MAX_BATCH_SIZE = 1000
    # jobs) of ~4 KiB payloads plus ~200 B of fields each is ~4.2 MiB, so 8 MiB leaves it twice that
    # room and holds one QUEUE_MAX_PAYLOAD_BYTES job many times over; bigger messages are refused by
    # gRPC before they are read into memory (validate() keeps it above one max-size job).
    grpc_max_message_bytes: int = 8 * 1024 * 1024
    # RPCs in progress per server process, StreamTimings streams included (grpc answers
    # RESOURCE_EXHAUSTED beyond it). 300 = the subscriber cap plus 200 unary calls, 4x the Redis
    # pool (QUEUE_REDIS_POOL_SIZE), so a burst queues briefly for a connection instead of being
    # refused, while an overloaded or Redis-starved server sheds calls instead of piling them up.
    grpc_max_concurrent_rpcs: int = 300
    # Open StreamTimings streams per server process (each holds a buffer of up to QUEUE_STREAM_BUFFER
    # events); kept below QUEUE_GRPC_MAX_CONCURRENT_RPCS so streams never take every RPC slot.
    stream_max_subscribers: int = 100
    # Waiting + delayed jobs per queue beyond which Enqueue is refused (0 = no cap), across all servers.
    max_waiting: int = 0
    default_timeout: float = 300.0
    default_max_attempts: int = 3
    # Seconds before a job's first retry; each later one waits `retry_backoff` times longer.
    retry_delay: float = 2.0
    keep_completed: int = 50
    keep_failed: int = 25
    idempotency_window: float = 24 * 3600.0
    max_stalls: int = 2
    # Extra time a task gets past its timeout before its worker process is killed.
    timeout_grace: float = 5.0
    # Jobs a worker process takes per round trip at most; fewer when jobs run long.
    prefetch: int = 32
    rate_limit_max: int = 100
    rate_limit_window: float = 60.0
    timings_retained: int = 10000
    metrics_history: float = 24 * 3600.0
    # Monitoring: the collector's period, the /metrics endpoint ("" = off), GetPerformance's
    # default window, StreamTimings' per-subscriber buffer (events).
    metrics_interval: float = 30.0
    metrics_address: str = ""
    performance_window: float = 3600.0
    stream_buffer: int = 1000
    # Minute hashes (queues x minutes) one GetPerformance may read and decode. Its cost grows with
    # both, on the event loop: ~0.14 s per queue at the 24 h window, measured. 15,000 = 10 queues
    # over 24 h, or every queue of a larger fleet over a shorter window.
    performance_max_minutes: int = 15_000
    # Alerts look at the last `alert_window` seconds (whole minutes); thresholds from the original system.
    alert_window: float = 300.0
    alert_avg_wait: float = 30.0
    alert_avg_processing: float = 120.0
    alert_min_throughput: float = 1.0
    # Low throughput counts only once the oldest waiting job has waited this long.
    alert_throughput_grace: float = 60.0
    alert_failure_rate: float = 0.10
    alert_backlog: int = 50
    shutdown_grace: float = 30.0
    grpc_grace: float = 10.0
    redis_pool_size: int = 50
    redis_command_timeout: float = 5.0
    redis_connect_timeout: float = 10.0
    redis_keepalive: int = 30
    redis_tls_insecure: bool = False
    # None means: on in prod, off in dev. On needs QUEUE_AUTH_FILE (see api/auth.py for its format).
    auth: bool | None = None
    auth_file: str = ""
    # Health and reflection answer without credentials unless these are off.
    health_open: bool = True
    reflection_open: bool = True
    # Server TLS from PEM files (reloaded when they change); a client CA turns on mTLS.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    key_prefix: str = "qs"
    log_level: str = "INFO"

    @property
    def concurrency(self) -> int:
        if self.worker_concurrency is not None:
            return self.worker_concurrency
        return 10 if self.env == "prod" else 3

    @property
    def auth_enabled(self) -> bool:
        return self.env == "prod" if self.auth is None else self.auth

    @property
    def diag_enabled(self) -> bool:
        return self.env != "prod" if self.diag_tasks is None else self.diag_tasks

    @property
    def embedded_redis(self) -> bool:
        return not self.redis_url

    @property
    def run_workers_in_serve(self) -> bool:
        return self.embedded_redis if self.serve_workers is None else self.serve_workers

    def to_env(self) -> dict[str, str]:
        """The QUEUE_* variables that reproduce these settings in another process."""
        env: dict[str, str] = {}
        for f in fields(self):
            value: Any = getattr(self, f.name)
            if value is None:
                text = ""
            elif isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, tuple):
                text = ",".join(value)
            else:
                text = str(value)
            env[f"QUEUE_{f.name.upper()}"] = text
        return env

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        for old, new in _RENAMED.items():
            if old in env:
                raise SettingsError(f"{old} was renamed {new}")
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"QUEUE_{f.name.upper()}")
            if raw is None:
                continue
            try:
                values[f.name] = _PARSERS[f.name](raw)
            except ValueError as exc:
                raise SettingsError(f"QUEUE_{f.name.upper()}={raw!r}: {exc}") from exc
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.env not in {"dev", "prod"}:
            raise SettingsError(f"QUEUE_ENV must be 'dev' or 'prod', got {self.env!r}")
        if not self.queues:
            raise SettingsError("QUEUE_QUEUES must name at least one queue")
        for name in self.queues:
            if not QUEUE_NAME_RE.match(name):
                raise SettingsError(f"QUEUE_QUEUES: {name!r} is not a valid queue name ({QUEUE_NAME_RE.pattern})")
        if self.concurrency < 1:
            raise SettingsError("QUEUE_WORKER_CONCURRENCY must be at least 1")
        if not 1 <= self.prefetch <= 256:
            raise SettingsError("QUEUE_PREFETCH must be between 1 and 256")
        if self.rate_limit_max < 0 or (self.rate_limit_max and self.rate_limit_window <= 0):
            raise SettingsError("QUEUE_RATE_LIMIT_MAX must be >= 0 (0 = off) with QUEUE_RATE_LIMIT_WINDOW > 0")
        if self.stall_interval <= 0 or self.max_stalls < 0:
            raise SettingsError("QUEUE_STALL_INTERVAL must be > 0 and QUEUE_MAX_STALLS >= 0")
        self._validate_limits()
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise SettingsError("QUEUE_REDIS_URL must start with redis://, rediss:// or unix://")
        self._validate_monitoring()
        self._validate_security()

    def _validate_security(self) -> None:
        if self.auth_enabled and not self.auth_file:
            raise SettingsError(
                "authentication is on (QUEUE_AUTH, on by default in prod) but QUEUE_AUTH_FILE is not set: "
                "name the identities file, or set QUEUE_AUTH=false for local development"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise SettingsError("QUEUE_TLS_CERT and QUEUE_TLS_KEY go together: set both, or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise SettingsError("QUEUE_TLS_CLIENT_CA (mTLS) needs server TLS: set QUEUE_TLS_CERT and QUEUE_TLS_KEY")

    def _validate_limits(self) -> None:
        if self.grpc_max_message_bytes < self.max_payload_bytes + MESSAGE_ENVELOPE_BYTES:
            raise SettingsError(
                f"QUEUE_GRPC_MAX_MESSAGE_BYTES ({self.grpc_max_message_bytes}) must hold one job with the largest "
                f"payload: at least QUEUE_MAX_PAYLOAD_BYTES ({self.max_payload_bytes}) + {MESSAGE_ENVELOPE_BYTES}"
            )
        if not 1 <= self.stream_max_subscribers < self.grpc_max_concurrent_rpcs:
            raise SettingsError(
                "QUEUE_STREAM_MAX_SUBSCRIBERS must be at least 1 and below QUEUE_GRPC_MAX_CONCURRENT_RPCS "
                f"(streams count against it), got {self.stream_max_subscribers} and {self.grpc_max_concurrent_rpcs}"
            )
        if self.max_waiting < 0:
            raise SettingsError(f"QUEUE_MAX_WAITING must be >= 0 (0 = no cap), got {self.max_waiting}")

    def _validate_monitoring(self) -> None:
        if self.metrics_interval <= 0 or self.metrics_history < 60:
            raise SettingsError("QUEUE_METRICS_INTERVAL must be > 0 and QUEUE_METRICS_HISTORY at least 60")
        if self.metrics_address and not re.match(r"^[^\s]*:\d{1,5}$", self.metrics_address):
            raise SettingsError("QUEUE_METRICS_ADDRESS must be host:port (port 0 = any free port) or empty (off)")
        if not 0 < self.performance_window <= self.metrics_history:
            raise SettingsError("QUEUE_PERFORMANCE_WINDOW must be > 0 and at most QUEUE_METRICS_HISTORY")
        if not 0 < self.alert_window <= self.metrics_history:
            raise SettingsError("QUEUE_ALERT_WINDOW must be > 0 and at most QUEUE_METRICS_HISTORY")
        if self.performance_max_minutes < window_minute_count(self.performance_window):
            raise SettingsError(
                "QUEUE_PERFORMANCE_MAX_MINUTES must cover one queue over QUEUE_PERFORMANCE_WINDOW "
                f"({window_minute_count(self.performance_window)} minutes)"
            )
        if self.stream_buffer < 1:
            raise SettingsError("QUEUE_STREAM_BUFFER must be at least 1")
        if min(self.alert_avg_wait, self.alert_avg_processing, self.alert_min_throughput) <= 0:
            raise SettingsError("QUEUE_ALERT_AVG_WAIT, _AVG_PROCESSING and _MIN_THROUGHPUT must be > 0")
        if self.alert_throughput_grace < 0 or self.alert_backlog < 1 or not 0 < self.alert_failure_rate <= 1:
            raise SettingsError(
                "QUEUE_ALERT_THROUGHPUT_GRACE must be >= 0, QUEUE_ALERT_BACKLOG >= 1, "
                "QUEUE_ALERT_FAILURE_RATE between 0 (exclusive) and 1"
            )


def unknown_variables(environ: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """`QUEUE_*` variables that are no setting (a typo is silently ignored otherwise), each with the
    closest setting's variable or None. Known names come from the dataclass, so new fields count."""
    env = os.environ if environ is None else environ
    known = {f.name.upper() for f in fields(Settings)}
    unknown: dict[str, str | None] = {}
    for name in sorted(env):
        if not name.startswith("QUEUE_") or name in _RENAMED or name[len("QUEUE_") :] in known:
            continue
        close = difflib.get_close_matches(name[len("QUEUE_") :], known, n=1)
        unknown[name] = f"QUEUE_{close[0]}" if close else None
    return unknown


def _optional_int(value: str) -> int | None:
    return int(value) if value.strip() else None


def _optional_bool(value: str) -> bool | None:
    return _bool(value) if value.strip() else None


# Variables that were renamed: setting the old name stops the process with the new one.
_RENAMED = {"QUEUE_RETRY_BACKOFF_BASE": "QUEUE_RETRY_DELAY"}

_PARSERS: dict[str, Any] = {
    "env": str.strip,
    "redis_url": str.strip,
    "grpc_address": str.strip,
    "data_dir": Path,
    "task_modules": _csv,
    "diag_tasks": _optional_bool,
    "queues": _csv,
    "worker_concurrency": _optional_int,
    "serve_workers": _optional_bool,
    "poll_interval": float,
    "stall_interval": float,
    "max_payload_bytes": int,
    "max_batch_size": int,
    "grpc_max_message_bytes": int,
    "grpc_max_concurrent_rpcs": int,
    "stream_max_subscribers": int,
    "max_waiting": int,
    "default_timeout": float,
    "default_max_attempts": int,
    "retry_delay": float,
    "keep_completed": int,
    "keep_failed": int,
    "idempotency_window": float,
    "max_stalls": int,
    "timeout_grace": float,
    "prefetch": int,
    "rate_limit_max": int,
    "rate_limit_window": float,
    "timings_retained": int,
    "metrics_history": float,
    "metrics_interval": float,
    "metrics_address": str.strip,
    "performance_window": float,
    "stream_buffer": int,
    "performance_max_minutes": int,
    "alert_window": float,
    "alert_avg_wait": float,
    "alert_avg_processing": float,
    "alert_min_throughput": float,
    "alert_throughput_grace": float,
    "alert_failure_rate": float,
    "alert_backlog": int,
    "shutdown_grace": float,
    "grpc_grace": float,
    "redis_pool_size": int,
    "redis_command_timeout": float,
    "redis_connect_timeout": float,
    "redis_keepalive": int,
    "redis_tls_insecure": _bool,
    "auth": _optional_bool,
    "auth_file": str.strip,
    "health_open": _bool,
    "reflection_open": _bool,
    "tls_cert": str.strip,
    "tls_key": str.strip,
    "tls_client_ca": str.strip,
    "key_prefix": str.strip,
    "log_level": str.strip,
}
