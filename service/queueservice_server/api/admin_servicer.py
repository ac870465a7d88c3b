"""QueueAdminService: the operators' RPCs."""

from __future__ import annotations

from queueservice.v1 import admin_service_pb2, admin_service_pb2_grpc
from queueservice_server.api.errors import Context, invalid_argument, rpc
from queueservice_server.api.validation import Validator
from queueservice_server.producer import Producer

MAX_RETRY_IDS = 10_000


class AdminServicer(admin_service_pb2_grpc.QueueAdminServiceServicer):
    def __init__(self, producer: Producer, validator: Validator) -> None:
        self.producer = producer
        self.validator = validator

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
        if violations:
            raise invalid_argument(violations)
        result = await self.producer.retry_failed(queue, list(request.job_ids), request.task, request.limit)
        return admin_service_pb2.RetryFailedResponse(
            retried_count=len(result.job_ids),
            retried_job_ids=result.job_ids,
            not_found_job_ids=result.not_found,
            not_failed_job_ids=result.not_failed,
        )
