"""QueueAdminService: the operators' RPCs."""

from __future__ import annotations

from collections.abc import AsyncIterator

from queueservice.v1 import admin_service_pb2, admin_service_pb2_grpc
from queueservice_server.api.errors import Context, invalid_argument, resource_exhausted, rpc, rpc_stream
from queueservice_server.api.monitor_convert import (
    OUTCOME_FILTERS,
    delivery_to_proto,
    performance_to_proto,
    stats_to_proto,
)
from queueservice_server.api.validation import JOB_ID_FORM, Validator, duration_problem, job_id_problem
from queueservice_server.core.producer import Producer
from queueservice_server.monitor.events import ORIGIN, CursorError, Filter, Position, decode_cursor, id_text
from queueservice_server.monitor.runner import Monitoring
from queueservice_server.monitor.streaming import TooManySubscribers
from queueservice_server.settings import window_minute_count

MAX_RETRY_IDS = 10_000
# Malformed ids named one by one in a RetryFailed error, at most (the rest are counted), so
# that the error fits in the 8 KiB of metadata clients accept.
MAX_LISTED_IDS = 10


class AdminServicer(admin_service_pb2_grpc.QueueAdminServiceServicer):
    def __init__(self, producer: Producer, validator: Validator, monitoring: Monitoring) -> None:
        self.producer = producer
        self.validator = validator
        self.monitoring = monitoring
        self.settings = validator.settings

    def _queues(self, name: str) -> tuple[str, ...]:
        """The queue a request names, or every configured queue for an empty name."""
        return (self.validator.queue(name),) if name else self.settings.queues

    @rpc
    async def GetStats(
        self, request: admin_service_pb2.GetStatsRequest, context: Context
    ) -> admin_service_pb2.GetStatsResponse:
        stats = await self.monitoring.reports.stats(self._queues(request.queue))
        return admin_service_pb2.GetStatsResponse(queues=[stats_to_proto(queue) for queue in stats])

    @rpc
    async def GetPerformance(
        self, request: admin_service_pb2.GetPerformanceRequest, context: Context
    ) -> admin_service_pb2.GetPerformanceResponse:
        queues = self._queues(request.queue)
        if request.HasField("window") and (problem := duration_problem(request.window)):
            raise invalid_argument([("window", f"not a valid Duration: {problem}")])
        window = (
            request.window.ToNanoseconds() / 1e9 if request.HasField("window") else self.settings.performance_window
        )
        history = self.settings.metrics_history
        # Figures are kept per minute, for QUEUE_METRICS_HISTORY.
        if not 60 <= window <= history:
            raise invalid_argument(
                [("window", f"must be between 60 s and QUEUE_METRICS_HISTORY ({history:g} s), got {window:g} s")]
            )
        # Each queue's every minute is one hash read and decoded: bounded per call.
        minutes = len(queues) * window_minute_count(max(window, self.settings.alert_window))
        cap = self.settings.performance_max_minutes
        if minutes > cap:
            raise resource_exhausted(
                "QUEUE_PERFORMANCE_MAX_MINUTES",
                f"a {window:g} s window over {len(queues)} queues reads {minutes} minute records; the limit is {cap} "
                f"(QUEUE_PERFORMANCE_MAX_MINUTES): name one queue or ask for a shorter window",
            )
        report = await self.monitoring.reports.performance(queues, window)
        return performance_to_proto(report)

    @rpc_stream
    async def StreamTimings(
        self, request: admin_service_pb2.StreamTimingsRequest, context: Context
    ) -> AsyncIterator[admin_service_pb2.StreamTimingsResponse]:
        queues = self._queues(request.queue)
        violations: list[tuple[str, str]] = []
        if request.task and request.task not in self.validator.tasks:
            violations.append(("task", self.validator.unknown_task(request.task)))
        if request.outcome and request.outcome not in OUTCOME_FILTERS:
            violations.append(("outcome", f"unknown outcome {request.outcome}"))
        retained = self.settings.timings_retained
        if not 0 <= request.last_n <= retained:
            violations.append(("last_n", f"must be between 0 and {retained} (QUEUE_TIMINGS_RETAINED)"))
        cursor = None
        if request.cursor:
            try:
                cursor = decode_cursor(request.cursor, self.settings.queues)
            except CursorError as exc:
                violations.append(("cursor", f"not a cursor from this service: {exc}"))
        if violations:
            raise invalid_argument(violations)
        if cursor:
            await self._check_not_ahead(cursor)
        wanted = Filter(queues, request.task, OUTCOME_FILTERS.get(request.outcome))
        try:
            async for delivery in self.monitoring.hub.subscribe(wanted, request.last_n, cursor, context.done):
                yield delivery_to_proto(delivery)
        except TooManySubscribers as exc:
            raise resource_exhausted(
                "QUEUE_STREAM_MAX_SUBSCRIBERS",
                f"{exc}, its limit (QUEUE_STREAM_MAX_SUBSCRIBERS); "
                "retry later, on another replica, or close idle streams",
            ) from None

    async def _check_not_ahead(self, cursor: dict[str, Position]) -> None:
        ahead = await self.monitoring.hub.ahead(cursor)
        if not ahead:
            return
        problems = [
            f"queue {queue!r} at {id_text(given.id)} is ahead of the newest timing in Redis ("
            + ("the stream is empty" if end == ORIGIN else id_text(end.id))
            + ")"
            for queue, given, end in ahead
        ]
        raise invalid_argument(
            [
                (
                    "cursor",
                    f"{'; '.join(problems)}: this cursor was not written for this Redis; "
                    "start again without a cursor, or with last_n",
                )
            ]
        )

    @rpc
    async def RetryFailed(
        self, request: admin_service_pb2.RetryFailedRequest, context: Context
    ) -> admin_service_pb2.RetryFailedResponse:
        queue = self.validator.queue(request.queue)
        violations: list[tuple[str, str]] = []
        if request.limit < 0:
            violations.append(("limit", f"must be 0 (no limit) or positive, got {request.limit}"))
        if len(request.job_ids) > MAX_RETRY_IDS:
            violations.append(("job_ids", f"at most {MAX_RETRY_IDS} ids per call, got {len(request.job_ids)}"))
        else:
            # Malformed ids are a mistake to fix; well-formed unknown ones are answered in not_found_job_ids.
            malformed = [(i, p) for i, job_id in enumerate(request.job_ids) if (p := job_id_problem(job_id, False))]
            violations += [(f"job_ids[{i}]", problem) for i, problem in malformed[:MAX_LISTED_IDS]]
            if malformed:
                more = len(malformed) - MAX_LISTED_IDS
                violations.append(
                    ("job_ids", (f"and {more} more ids that are not job ids; " if more > 0 else "") + JOB_ID_FORM)
                )
        if violations:
            raise invalid_argument(violations)
        result = await self.producer.retry_failed(queue, list(request.job_ids), request.task, request.limit)
        return admin_service_pb2.RetryFailedResponse(
            retried_count=len(result.job_ids),
            retried_job_ids=result.job_ids,
            not_found_job_ids=result.not_found,
            not_failed_job_ids=result.not_failed,
        )
