"""Who may call what: identities from QUEUE_AUTH_FILE, roles, and the one
permission table.

The auth file has one identity per line: a name, its roles (comma-separated)
and one credential, either the SHA-256 of a bearer token or a client
certificate's common name or subject alternative name:

    # name      roles            credential
    ci-deploy   producer         sha256:9f86d081884c7d65...
    dashboard   viewer           sha256:60303ae22b998861...
    oncall      operator         sha256:fd61a03af4f77d87...
    billing     producer         cn:billing.internal
    grafana     viewer           san:grafana.internal

Tokens are random (`queue-service token` makes one), so one SHA-256 is enough
to keep the file useless to whoever reads it; a slow password hash would only
cost every call. The file is read at start and again on SIGHUP.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from queueservice.v1 import admin_service_pb2, queue_service_pb2
from queueservice_server.api.audit import AuditTrail
from queueservice_server.api.wrappers import MethodHandler

log = logging.getLogger(__name__)


class Role(StrEnum):
    PRODUCER = "producer"
    VIEWER = "viewer"
    OPERATOR = "operator"


ALL_ROLES = frozenset(Role)
# Roles that see job payloads and error texts; others get them blanked.
CONTENT_ROLES = frozenset({Role.PRODUCER, Role.OPERATOR})


class AuthFileError(ValueError):
    """QUEUE_AUTH_FILE cannot be used; the message names the line."""


@dataclass(frozen=True)
class Identity:
    name: str
    roles: frozenset[Role]

    @property
    def sees_content(self) -> bool:
        return bool(self.roles & CONTENT_ROLES)


@dataclass(frozen=True)
class Identities:
    """One reading of the auth file."""

    tokens: tuple[tuple[bytes, Identity], ...] = ()
    certificates: Mapping[tuple[str, str], Identity] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.tokens) + len(self.certificates)

    def by_token(self, token: str) -> Identity | None:
        digest = token_digest(token)
        found = None
        # Every entry is compared, in constant time, so timing tells nothing about which tokens exist.
        for stored, identity in self.tokens:
            if hmac.compare_digest(stored, digest):
                found = identity
        return found

    def by_certificate(self, common_names: Sequence[str], alt_names: Sequence[str]) -> Identity | None:
        for kind, names in (("cn", common_names), ("san", alt_names)):
            for name in names:
                identity = self.certificates.get((kind, name))
                if identity is not None:
                    return identity
        return None


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def new_token() -> tuple[str, str]:
    """A fresh bearer token and the credential to write in the auth file for it."""
    token = "qs_" + secrets.token_urlsafe(32)
    return token, "sha256:" + token_digest(token).hex()


def parse_identities(text: str, source: str = "QUEUE_AUTH_FILE") -> Identities:
    tokens: list[tuple[bytes, Identity]] = []
    certificates: dict[tuple[str, str], Identity] = {}
    names: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source} line {number}"
        parts = line.split()
        if len(parts) != 3:
            raise AuthFileError(f"{where}: expected 'name roles credential', got {len(parts)} fields")
        name, role_text, credential = parts
        if name in names:
            raise AuthFileError(f"{where}: the name {name!r} appears twice")
        names.add(name)
        roles = set()
        for role in role_text.split(","):
            if role not in ALL_ROLES:
                raise AuthFileError(f"{where}: unknown role {role!r} (roles: {', '.join(sorted(ALL_ROLES))})")
            roles.add(Role(role))
        identity = Identity(name, frozenset(roles))
        kind, _, value = credential.partition(":")
        if kind == "sha256":
            try:
                digest = bytes.fromhex(value)
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise AuthFileError(f"{where}: sha256: needs the 64 hex digits of the token's SHA-256")
            tokens.append((digest, identity))
        elif kind in {"cn", "san"} and value:
            certificates[(kind, value)] = identity
        else:
            raise AuthFileError(
                f"{where}: the credential must be sha256:<hex>, cn:<certificate common name> or san:<alt name>"
            )
    return Identities(tuple(tokens), certificates)


def load_identities(path: Path) -> Identities:
    try:
        text = path.read_text()
    except OSError as exc:
        raise AuthFileError(f"QUEUE_AUTH_FILE {str(path)!r}: {exc.strerror or exc}") from exc
    return parse_identities(text)


# --- the permission table -----------------------------------------------------------------------

Redactor = Callable[[Any], None]
Auditor = Callable[[Any, Any], dict[str, Any]]


@dataclass(frozen=True)
class Rule:
    """Who may call one RPC; what a caller without CONTENT_ROLES does not see; what the audit log says."""

    roles: frozenset[Role]
    redact: Redactor | None = None
    # Set for calls that change state: each one gets an audit line.
    audit: Auditor | None = None


def _hide_job_content(response: queue_service_pb2.GetJobResponse) -> None:
    response.job.ClearField("payload")
    response.job.ClearField("error")


def _queue(name: str) -> str:
    return name or "default"


def _audit_enqueue(
    request: queue_service_pb2.EnqueueRequest, response: queue_service_pb2.EnqueueResponse | None
) -> dict[str, Any]:
    entry: dict[str, Any] = {"queue": _queue(request.queue), "task": request.task}
    if response is not None:
        entry.update(job_id=response.job_id, jobs=0 if response.deduplicated else 1)
    return entry


def _audit_batch(
    request: queue_service_pb2.EnqueueBatchRequest, response: queue_service_pb2.EnqueueBatchResponse | None
) -> dict[str, Any]:
    entry: dict[str, Any] = {"queue": ",".join(sorted({_queue(job.queue) for job in request.jobs}))}
    if response is not None:
        entry["jobs"] = sum(not result.deduplicated for result in response.results)
    return entry


def _audit_retry(
    request: admin_service_pb2.RetryFailedRequest, response: admin_service_pb2.RetryFailedResponse | None
) -> dict[str, Any]:
    entry: dict[str, Any] = {"queue": _queue(request.queue), "task": request.task, "ids_given": len(request.job_ids)}
    if response is not None:
        entry["jobs"] = response.retried_count
    return entry


_PRODUCE = frozenset({Role.PRODUCER, Role.OPERATOR})
_READ = frozenset({Role.VIEWER, Role.OPERATOR})
_OPERATE = frozenset({Role.OPERATOR})


def _method(module: Any, service: str, name: str) -> str:
    return f"/{module.DESCRIPTOR.services_by_name[service].full_name}/{name}"


def _queue_method(name: str) -> str:
    return _method(queue_service_pb2, "QueueService", name)


def _admin_method(name: str) -> str:
    return _method(admin_service_pb2, "QueueAdminService", name)


#: Every RPC of the queue service's own services; registering a method missing here fails at start.
PERMISSIONS: dict[str, Rule] = {
    _queue_method("Enqueue"): Rule(_PRODUCE, audit=_audit_enqueue),
    _queue_method("EnqueueBatch"): Rule(_PRODUCE, audit=_audit_batch),
    _queue_method("GetJob"): Rule(ALL_ROLES, redact=_hide_job_content),
    _admin_method("GetStats"): Rule(_READ),
    _admin_method("GetPerformance"): Rule(_READ),
    _admin_method("StreamTimings"): Rule(_READ),
    _admin_method("RetryFailed"): Rule(_OPERATE, audit=_audit_retry),
}

#: Health and reflection when QUEUE_HEALTH_OPEN / QUEUE_REFLECTION_OPEN are off: any known identity.
ANY_IDENTITY = Rule(ALL_ROLES)


def permission_table() -> list[tuple[str, str, str]]:
    """(RPC, roles, notes) rows, as the README shows them."""
    rows = []
    for method, rule in PERMISSIONS.items():
        service, name = method.strip("/").split("/")
        roles = ", ".join(role.value for role in Role if role in rule.roles)
        notes = []
        if rule.redact is not None:
            notes.append("payload and error blank without producer or operator")
        if rule.audit is not None:
            notes.append("audited")
        rows.append((f"{service.rsplit('.', 1)[-1]}.{name}", roles, "; ".join(notes)))
    return rows


# --- enforcement ------------------------------------------------------------------------------

Context = grpc.aio.ServicerContext[Any, Any]
Behavior = Callable[..., Any]

_UNAUTHENTICATED = (
    "missing or unknown credentials: send the metadata 'authorization: Bearer <token>' "
    "with a token from QUEUE_AUTH_FILE, or a client certificate listed there"
)


class Denied(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, who: str = "-") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.who = who


class Authenticator:
    """Checks each call of a wrapped method against its Rule; holds the current Identities."""

    def __init__(self, identities: Identities, certificates: bool, audit: AuditTrail) -> None:
        self.identities = identities
        self.audit = audit
        # Read the peer's certificate only when the server asks clients for one.
        self.certificates = certificates

    def identify(self, context: Context) -> Identity:
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str):
                scheme, _, token = value.partition(" ")
                if scheme.lower() != "bearer" or not token.strip():
                    raise Denied(grpc.StatusCode.UNAUTHENTICATED, "the authorization metadata must be 'Bearer <token>'")
                identity = self.identities.by_token(token.strip())
                if identity is None:
                    raise Denied(grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED)
                return identity
        if self.certificates:
            peer = context.auth_context()
            identity = self.identities.by_certificate(
                [name.decode(errors="replace") for name in peer.get("x509_common_name", ())],
                [name.decode(errors="replace") for name in peer.get("x509_subject_alternative_name", ())],
            )
            if identity is not None:
                return identity
        raise Denied(grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED)

    def authorize(self, method: str, rule: Rule, context: Context) -> Identity:
        identity = self.identify(context)
        if not identity.roles & rule.roles:
            needed = " or ".join(role.value for role in Role if role in rule.roles)
            raise Denied(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{identity.name!r} ({', '.join(sorted(identity.roles))}) may not call {method.rsplit('/', 1)[-1]}: "
                f"it needs the {needed} role",
                identity.name,
            )
        return identity

    def wrapper(self, rules: Mapping[str, Rule] | None = None, default: Rule | None = None) -> Callable[..., Any]:
        """A MethodWrapper enforcing `rules` (by full method name), or `default` for methods not in them."""
        table = PERMISSIONS if rules is None else rules

        def wrap(method: str, handler: MethodHandler) -> MethodHandler:
            rule = table.get(method, default)
            if rule is None:
                raise KeyError(f"{method} has no entry in api.auth.PERMISSIONS")
            if handler.unary_unary is not None:
                return handler._replace(unary_unary=self._unary(method, rule, handler.unary_unary))
            if handler.unary_stream is not None:
                return handler._replace(unary_stream=self._unary_stream(method, rule, handler.unary_stream))
            if handler.stream_stream is not None:
                return handler._replace(stream_stream=self._stream_stream(method, rule, handler.stream_stream))
            raise KeyError(f"{method}: no wrapper for this kind of method")

        return wrap

    async def _admit(self, method: str, rule: Rule, request: Any, context: Context) -> Identity:
        try:
            return self.authorize(method, rule, context)
        except Denied as denied:
            if rule.audit is not None:
                self._audit(method, denied.who, denied.code, _describe(rule.audit, request, None))
            await context.abort(denied.code, denied.message)
            raise AssertionError("abort returned") from None

    def _audit(self, method: str, who: str, code: grpc.StatusCode, details: dict[str, Any]) -> None:
        self.audit.add(method.rsplit("/", 1)[-1], who, code.name, details)

    def _unary(self, method: str, rule: Rule, behavior: Behavior) -> Behavior:
        async def checked(request: Any, context: Context) -> Any:
            identity = await self._admit(method, rule, request, context)
            if rule.audit is None:
                response = await behavior(request, context)
            else:
                try:
                    response = await behavior(request, context)
                except BaseException:
                    code = context.code() or grpc.StatusCode.CANCELLED
                    self._audit(method, identity.name, code, _describe(rule.audit, request, None))
                    raise
                self._audit(method, identity.name, grpc.StatusCode.OK, _describe(rule.audit, request, response))
            if rule.redact is not None and not identity.sees_content:
                rule.redact(response)
            return response

        return checked

    def _unary_stream(self, method: str, rule: Rule, behavior: Behavior) -> Behavior:
        async def checked(request: Any, context: Context) -> Any:
            identity = await self._admit(method, rule, request, context)
            hide = rule.redact if rule.redact is not None and not identity.sees_content else None
            async for response in behavior(request, context):
                if hide is not None:
                    hide(response)
                yield response

        return checked

    def _stream_stream(self, method: str, rule: Rule, behavior: Behavior) -> Behavior:
        async def checked(requests: Any, context: Context) -> Any:
            await self._admit(method, rule, None, context)
            async for response in behavior(requests, context):
                yield response

        return checked


def _describe(audit: Auditor, request: Any, response: Any) -> dict[str, Any]:
    # A body that did not parse reaches the wrappers as a MalformedRequest, with nothing to describe.
    return audit(request, response) if isinstance(request, Message) else {"request": "unparsable"}
