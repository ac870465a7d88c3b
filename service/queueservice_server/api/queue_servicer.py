"""QueueService: the producers' RPCs."""

from __future__ import annotations

from queueservice.v1 import queue_service_pb2, queue_service_pb2_grpc
from queueservice_server.api.convert import job_to_proto, timestamp_ms
from queueservice_server.api.errors import Context, invalid_argument, not_found, rpc
from queueservice_server.api.validation import Validator
from queueservice_server.producer import Enqueued, Producer


def _response(result: Enqueued) -> queue_service_pb2.EnqueueResponse:
    return queue_service_pb2.EnqueueResponse(
        job_id=result.job_id, enqueue_time=timestamp_ms(result.enqueued_at_ms), deduplicated=result.deduplicated
    )


class QueueServicer(queue_service_pb2_grpc.QueueServiceServicer):
    def __init__(self, producer: Producer, validator: Validator) -> None:
        self.producer = producer
        self.validator = validator

    @rpc
    async def Enqueue(
        self, request: queue_service_pb2.EnqueueRequest, context: Context
    ) -> queue_service_pb2.EnqueueResponse:
        (result,) = await self.producer.enqueue([self.validator.job(request)])
        return _response(result)

    @rpc
    async def EnqueueBatch(
        self, request: queue_service_pb2.EnqueueBatchRequest, context: Context
    ) -> queue_service_pb2.EnqueueBatchResponse:
        results = await self.producer.enqueue(self.validator.batch(request))
        return queue_service_pb2.EnqueueBatchResponse(results=[_response(r) for r in results])

    @rpc
    async def GetJob(
        self, request: queue_service_pb2.GetJobRequest, context: Context
    ) -> queue_service_pb2.GetJobResponse:
        if not request.job_id:
            raise invalid_argument([("job_id", "required: a job id as returned by Enqueue")])
        record = await self.producer.get_job(request.job_id)
        if record is None:
            raise not_found("job", request.job_id, f"no job with id {request.job_id!r} (never existed or evicted)")
        return queue_service_pb2.GetJobResponse(job=job_to_proto(record))
