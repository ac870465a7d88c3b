"""QueueService: the producers' RPCs."""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from queueservice.v1 import queue_service_pb2, queue_service_pb2_grpc
from queueservice_server.api.convert import job_to_proto, timestamp_ms
from queueservice_server.api.errors import Context, invalid_argument, not_found, resource_exhausted, rpc
from queueservice_server.api.validation import JOB_ID_FORM, Validator, job_id_problem
from queueservice_server.core.producer import Enqueued, JobSpec, Producer, QueueFull


def _responses(results: list[Enqueued]) -> list[queue_service_pb2.EnqueueResponse]:
    # A batch's jobs share a handful of enqueue times (one per queue): build each Timestamp once.
    stamps: dict[int, timestamp_pb2.Timestamp] = {}
    responses = []
    for result in results:
        stamp = stamps.get(result.enqueued_at_ms)
        if stamp is None:
            stamp = stamps[result.enqueued_at_ms] = timestamp_ms(result.enqueued_at_ms)
        responses.append(
            queue_service_pb2.EnqueueResponse(
                job_id=result.job_id, enqueue_time=stamp, deduplicated=result.deduplicated
            )
        )
    return responses


class QueueServicer(queue_service_pb2_grpc.QueueServiceServicer):
    def __init__(self, producer: Producer, validator: Validator) -> None:
        self.producer = producer
        self.validator = validator

    async def _enqueue(self, specs: list[JobSpec]) -> list[Enqueued]:
        try:
            return await self.producer.enqueue(specs)
        except QueueFull as exc:
            raise resource_exhausted(exc.subject, str(exc)) from None

    @rpc
    async def Enqueue(
        self, request: queue_service_pb2.EnqueueRequest, context: Context
    ) -> queue_service_pb2.EnqueueResponse:
        (response,) = _responses(await self._enqueue([self.validator.job(request)]))
        return response

    @rpc
    async def EnqueueBatch(
        self, request: queue_service_pb2.EnqueueBatchRequest, context: Context
    ) -> queue_service_pb2.EnqueueBatchResponse:
        results = await self._enqueue(self.validator.batch(request))
        return queue_service_pb2.EnqueueBatchResponse(results=_responses(results))

    @rpc
    async def GetJob(
        self, request: queue_service_pb2.GetJobRequest, context: Context
    ) -> queue_service_pb2.GetJobResponse:
        if not request.job_id:
            raise invalid_argument([("job_id", f"required: {JOB_ID_FORM}")])
        if problem := job_id_problem(request.job_id):
            raise invalid_argument([("job_id", problem)])
        record = await self.producer.get_job(request.job_id)
        if record is None:
            raise not_found("job", request.job_id, f"no job with id {request.job_id!r} (never existed or evicted)")
        return queue_service_pb2.GetJobResponse(job=job_to_proto(record))
