"""Client for the queue service: `QueueClient` (blocking) and `AsyncQueueClient` (asyncio).

    from queueservice import QueueClient, JobState, tls_credentials

    tls = tls_credentials(ca="ca.pem")  # add cert= and key= for mTLS
    with QueueClient("queue.internal:50051", credentials=tls, token=os.environ["QUEUE_TOKEN"]) as client:
        job_id = client.enqueue("billing.send_invoice", {"invoice": 42}, queue="emails", delay=60)
        job = client.get_job(job_id)
        done = job.state == JobState.JOB_STATE_COMPLETED

Depends on grpcio and protobuf only; install googleapis-common-protos as well
to get decoded error details (`QueueError.details`, `InvalidArgument.field_violations`).
"""

from queueservice.aio import AsyncQueueClient
from queueservice.client import QueueClient
from queueservice.errors import (
    AuthError,
    DeadlineExceeded,
    InternalError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QueueError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from queueservice.options import DEFAULT_TIMEOUT, JobOptions, job_request, tls_credentials
from queueservice.v1.admin_service_pb2 import JobOutcome
from queueservice.v1.job_pb2 import Job, JobState
from queueservice.v1.queue_service_pb2 import EnqueueRequest, EnqueueResponse

__all__ = [
    "DEFAULT_TIMEOUT",
    "AsyncQueueClient",
    "AuthError",
    "DeadlineExceeded",
    "EnqueueRequest",
    "EnqueueResponse",
    "InternalError",
    "InvalidArgument",
    "Job",
    "JobOptions",
    "JobOutcome",
    "JobState",
    "NotFound",
    "PermissionDenied",
    "QueueClient",
    "QueueError",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "job_request",
    "tls_credentials",
]
