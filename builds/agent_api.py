"""The HTTP API agents speak, under /api/v0/agent/ (and the internal source download).

Three credentials, none of which works anywhere else:
- the organization's agent token (`hma_...`) only registers an agent;
- the agent's session (`hms_...`, from register) claims jobs;
- the job credential (`hmj_...`, from claim) reports on that one job and
  downloads its inputs.
REST bearer tokens are refused here and these are refused by the REST API,
because each authentication class looks only in its own table.
"""

from __future__ import annotations

import io
import re
from typing import Any

from django.conf import settings
from django.http import FileResponse
from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import authentication, exceptions, serializers, status
from rest_framework.parsers import BaseParser
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from builds import services
from builds.artifacts import store_artifact
from builds.models import Agent, Build, Job, JobKind, JobState
from builds.services.jobs import agent_for_session, builds_in_links, builds_in_parent, job_for_credential
from builds.states import TERMINAL_JOB_STATES
from harmont.auth import (
    AGENT_SESSION_PREFIX,
    AGENT_TOKEN_PREFIX,
    JOB_CREDENTIAL_PREFIX,
    hash_secret,
)
from harmont.errors import ApiError, validation_error
from harmont.serializers import ErrorSerializer, json_object, validated
from organizations.models import AgentToken
from pipelines.secrets import secrets_for_job

LIVE_JOB_STATES = frozenset({JobState.ASSIGNED, JobState.RUNNING, JobState.CANCELING, JobState.TIMING_OUT})


class AgentPrincipal:
    """`request.user` for agent requests: authenticated, but no person."""

    is_authenticated = True
    is_anonymous = False
    is_staff = False

    def __init__(self, label: str) -> None:
        self.label = label

    def __str__(self) -> str:
        return self.label


def _bearer(request: Request, prefix: str) -> str | None:
    header = request.META.get("HTTP_AUTHORIZATION", "")
    scheme, _, raw = header.partition(" ")
    raw = raw.strip()
    if not header:
        return None
    if scheme.lower() != "bearer" or not raw.startswith(prefix) or len(raw) > 256:
        raise exceptions.AuthenticationFailed("This route takes an agent credential.")
    return raw


class AgentTokenAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[AgentPrincipal, AgentToken] | None:
        raw = _bearer(request, AGENT_TOKEN_PREFIX)
        if raw is None:
            return None
        token = AgentToken.objects.select_related("organization").filter(token_hash=hash_secret(raw)).first()
        if token is None or token.revoked_at is not None:
            raise exceptions.AuthenticationFailed("Unknown or revoked agent token.")
        return AgentPrincipal(f"agent token {token.pk}"), token

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="agent"'


class AgentSessionAuthentication(AgentTokenAuthentication):
    def authenticate(self, request: Request) -> tuple[AgentPrincipal, Agent] | None:
        raw = _bearer(request, AGENT_SESSION_PREFIX)
        if raw is None:
            return None
        # Revoking the organization's token stops its agents at their next request. The
        # checks are in the query (one answer for all three cases); every idle poll pays it.
        agent = agent_for_session(raw)
        if agent is None:
            raise exceptions.AuthenticationFailed("Unknown agent session, or its agent token was revoked.")
        return AgentPrincipal(agent.name), agent


class JobCredentialAuthentication(AgentTokenAuthentication):
    def authenticate(self, request: Request) -> tuple[AgentPrincipal, Job] | None:
        raw = _bearer(request, JOB_CREDENTIAL_PREFIX)
        if raw is None:
            return None
        job = job_for_credential(raw)  # None also when the job's agent token was revoked
        if job is None:
            raise exceptions.AuthenticationFailed("Unknown job credential, or its agent token was revoked.")
        return AgentPrincipal(f"job {job.pk}"), job


class Authenticated(BasePermission):
    def has_permission(self, request: Request, view: Any) -> bool:
        if request.auth is None:
            raise exceptions.NotAuthenticated("Send the agent credential as `Authorization: Bearer ...`.")
        return True


class GzipParser(BaseParser):
    media_type = "application/gzip"

    def parse(self, stream: Any, media_type: str | None = None, parser_context: dict | None = None) -> bytes:
        return stream.read() if stream is not None else b""


for _cls, _name in ((AgentTokenAuthentication, "agentToken"), (AgentSessionAuthentication, "agentSession"),
                    (JobCredentialAuthentication, "jobCredential")):
    type(f"{_cls.__name__}Scheme", (OpenApiAuthenticationExtension,), {
        "target_class": _cls, "name": _name,
        "get_security_definition": lambda self, auto_schema: {"type": "http", "scheme": "bearer"},
    })


class AgentView(APIView):
    permission_classes = [Authenticated]
    throttle_classes: list = []


class JobView(AgentView):
    authentication_classes = [JobCredentialAuthentication]

    def job(self, request: Request, job_id: str) -> Job:
        job: Job = request.auth
        if str(job.pk) != job_id:
            raise ApiError("job_not_found", "This credential belongs to another job.")
        return job


# ------------------------------------------------------------------ serializers (schema + translation)


class RegisterRequest(serializers.Serializer):
    name = serializers.CharField(max_length=255)
    hostname = serializers.CharField(max_length=255, required=False, allow_blank=True, default="")
    version = serializers.CharField(max_length=50, required=False, allow_blank=True, default="")
    os = serializers.CharField(max_length=255, required=False, allow_blank=True, default="")


class AgentSerializer(serializers.ModelSerializer):
    class Meta:
        model = Agent
        fields = ["id", "name", "hostname", "version", "os", "created_at", "last_seen_at"]
        read_only_fields = fields


class SourceSpec(serializers.Serializer):
    kind = serializers.ChoiceField(choices=["archive", "url", "git"], help_text=(
        "archive: GET `path` with the job credential and unpack it; url: download the tarball at `url` and check "
        "`sha256` when given; git: clone the repository at `url` and check out `commit` (`HEAD`: tip of `branch`)."))
    path = serializers.CharField(allow_null=True)
    url = serializers.CharField(allow_null=True)
    sha256 = serializers.CharField(allow_null=True)
    commit = serializers.CharField(allow_null=True)
    branch = serializers.CharField(allow_null=True)


class RenderSpec(serializers.Serializer):
    source_slug = serializers.CharField(help_text="The pipeline to render from the checkout's .hm/*.py.")
    result_path = serializers.CharField(help_text="POST the rendered IR (or the failure) here.")


class JobSpecSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    build_id = serializers.UUIDField()
    build_number = serializers.IntegerField()
    pipeline_slug = serializers.CharField()
    step_key = serializers.CharField()
    name = serializers.CharField(allow_null=True)
    command = serializers.CharField()
    env = serializers.DictField(child=serializers.CharField())
    timeout_seconds = serializers.IntegerField()
    image = serializers.CharField(allow_null=True)
    source = SourceSpec(allow_null=True, help_text="Where a root job's code comes from; null: start empty.")
    parent_workspace_path = serializers.CharField(allow_null=True, help_text="The builds_in parent's files.")
    upload_workspace = serializers.BooleanField(help_text="PUT the workspace after the command passes.")
    cancel_grace_seconds = serializers.IntegerField()
    mask = serializers.ListField(child=serializers.CharField(trim_whitespace=False),
                                 help_text="Secret values in `env`: replace them with [REDACTED] in the output shipped.")
    render = RenderSpec(allow_null=True, help_text="Set for a render job: render the pipeline instead of "
                                                   "running `command`.")


class ClaimResponse(serializers.Serializer):
    job = JobSpecSerializer()
    job_token = serializers.CharField(help_text="The job credential: valid for this one job only.")


class ChunkSerializer(serializers.Serializer):
    seq = serializers.IntegerField(min_value=1, max_value=2**31 - 1)
    stream_kind = serializers.ChoiceField(choices=[0, 1, 2], help_text="0 stdout, 1 stderr, 2 meta")
    content = serializers.CharField(allow_blank=True, trim_whitespace=False)
    ts = serializers.DateTimeField()


class LogsRequest(serializers.Serializer):
    chunks = ChunkSerializer(many=True)


class Directive(serializers.Serializer):
    state = serializers.CharField()
    cancel = serializers.BooleanField(help_text="Stop the command: SIGTERM, grace, SIGKILL; then finish. "
                                                "Also set once the job has ended: don't (keep) run(ning) it.")
    timeout = serializers.BooleanField(help_text="The job is over its time: stop it and finish as timed out.")


class HeartbeatRequest(serializers.Serializer):
    timing_out = serializers.BooleanField(required=False, default=False)


CLAIM_KEY = re.compile(r"\A[A-Za-z0-9_-]{1,64}\Z")  # anchored: the field's validator searches


class ClaimKeyField(serializers.RegexField):
    def __init__(self) -> None:
        super().__init__(CLAIM_KEY, required=False, allow_null=True, help_text=(
            "The agent's random key for this claim, the same in every retry of the request: a retry whose first "
            "answer was lost gets the same job again (with a new job_token) instead of a second one."))


class ClaimRequest(serializers.Serializer):
    claim_key = ClaimKeyField()


class FinishRequest(serializers.Serializer):
    chunks = ChunkSerializer(many=True, required=False, help_text="The last log chunks, stored before the finish.")
    exit_code = serializers.IntegerField(allow_null=True, required=False, min_value=-1, max_value=65535)
    signal = serializers.IntegerField(allow_null=True, required=False, min_value=1, max_value=255)
    outcome = serializers.ChoiceField(choices=["canceled", "timed_out"], allow_null=True, required=False)
    error_code = serializers.ChoiceField(choices=["workspace_unavailable", "render_failed"], allow_null=True,
                                         required=False)
    error_message = serializers.CharField(allow_null=True, required=False, allow_blank=True, max_length=2000)
    claim_next = serializers.BooleanField(required=False, default=False, help_text=(
        "Also claim this agent's next job: the answer's `next` is then what `claim` would have answered "
        "(null: none waiting). Only the report that ends the job claims a new one; a retried report answers "
        "the job its first attempt claimed under the same `claim_key`, and without a key leaves `next` out."))
    claim_key = ClaimKeyField()


class FinishResponse(Directive):
    next = ClaimResponse(required=False, allow_null=True, help_text="Only when the report asked for `claim_next`.")


# Agents send a few log chunks with every shipment and every finish, and checking them
# with the nested serializers above cost more than the rest of such a request. The
# checks below pass only input those serializers would take as it is, with the same
# values; anything else (None) goes through the serializers, so bad input still gets
# their 422 and per-field messages.
_CHUNK_FIELDS = ChunkSerializer().fields
_FINISH_FIELDS = FinishRequest().fields
REPORT_FIELDS = ("exit_code", "signal", "outcome", "error_code", "error_message")


def _int_within(value: Any, field: serializers.IntegerField) -> bool:
    return type(value) is int and field.min_value <= value <= field.max_value  # bool is no int here


def _choice(value: Any, field: serializers.ChoiceField) -> bool:
    return isinstance(value, str) and value in field.choices


def plain_chunks(items: Any) -> list[services.ChunkIn] | None:
    """A list of well-formed chunks, checked by hand; None when anything is off (see above)."""
    if not isinstance(items, list):
        return None
    chunks = []
    for item in items:
        if not isinstance(item, dict):
            return None
        seq, kind, content, ts = item.get("seq"), item.get("stream_kind"), item.get("content"), item.get("ts")
        if not (_int_within(seq, _CHUNK_FIELDS["seq"]) and type(kind) is int
                and kind in _CHUNK_FIELDS["stream_kind"].choices
                and type(content) is str and "\x00" not in content and type(ts) is str):
            return None
        try:
            when = _CHUNK_FIELDS["ts"].to_internal_value(ts)  # the serializer's own parsing and time zone
        except serializers.ValidationError:
            return None
        chunks.append(services.ChunkIn(seq, kind, content, when))
    return chunks


def plain_finish(body: dict[str, Any]) -> dict[str, Any] | None:
    """A well-formed finish report, checked by hand; None when anything is off (see above)."""
    chunks = plain_chunks(body["chunks"]) if "chunks" in body else []
    if chunks is None:
        return None
    report = {name: body.get(name) for name in REPORT_FIELDS}
    exit_code, signal, outcome, error_code, message = report.values()
    if ((exit_code is not None and not _int_within(exit_code, _FINISH_FIELDS["exit_code"]))
            or (signal is not None and not _int_within(signal, _FINISH_FIELDS["signal"]))
            or (outcome is not None and not _choice(outcome, _FINISH_FIELDS["outcome"]))
            or (error_code is not None and not _choice(error_code, _FINISH_FIELDS["error_code"]))):
        return None
    if message is not None and not (type(message) is str and message == message.strip() and "\x00" not in message
                                    and len(message) <= _FINISH_FIELDS["error_message"].max_length):
        return None  # (the serializer trims whitespace; such a message takes the long way)
    claim_next, claim_key = body.get("claim_next", False), body.get("claim_key")
    if type(claim_next) is not bool or not (claim_key is None or (type(claim_key) is str
                                                                  and CLAIM_KEY.fullmatch(claim_key))):
        return None
    return {"chunks": chunks, "claim_next": claim_next, "claim_key": claim_key, **report}


def directive(state: str) -> dict[str, Any]:
    # A job the server already ended (the reaper gave up on its agent, its pipeline timed
    # out while it was assigned) must not run (on): the agent hears that as a cancel, and
    # its finish report is then a no-op.
    stop = state == JobState.CANCELING or state in TERMINAL_JOB_STATES
    return {"state": state, "cancel": stop, "timeout": state == JobState.TIMING_OUT}


def job_spec(job: Job) -> dict[str, Any]:
    build: Build = job.build
    links = builds_in_links(job)
    root = links.parent_id is None
    # Secrets override the job's own env (the pipeline's, the step's and the build request's),
    # so a build request can't put its own value under an admin's secret name; the server's
    # variables come last (secret names can't take them: pipelines.secrets.is_reserved_name).
    secrets = secrets_for_job(organization_id=build.pipeline.organization_id, pipeline_id=build.pipeline_id)
    env = {
        **job.env, **secrets,
        "CI": "true", "HARMONT": "true", "HARMONT_BUILD_ID": str(build.pk), "HARMONT_BUILD_NUMBER": str(build.number),
        "HARMONT_PIPELINE_SLUG": build.pipeline.slug, "HARMONT_BRANCH": build.branch, "HARMONT_COMMIT": build.commit,
        "HARMONT_STEP_KEY": job.step_key,
    }
    return {
        "id": job.pk, "build_id": build.pk, "build_number": build.number, "pipeline_slug": build.pipeline.slug,
        "step_key": job.step_key, "name": job.name, "command": job.command, "env": env,
        "timeout_seconds": job.timeout_seconds, "image": job.image,
        "source": source_spec(build) if root else None,
        "parent_workspace_path": None if root else f"/api/v0/agent/jobs/{job.pk}/parent-workspace",
        "upload_workspace": links.has_children,
        "cancel_grace_seconds": settings.AGENT_CANCEL_GRACE_SECONDS,
        "mask": list(dict.fromkeys(secrets.values())),
        "render": {"source_slug": build.pipeline.source_slug, "result_path": f"/api/v0/agent/jobs/{job.pk}/pipeline"}
        if job.kind == JobKind.RENDER else None,
    }


def source_spec(build: Build) -> dict[str, Any] | None:
    """Where the build's code comes from: the upload, a tarball URL, else the pipeline's repository."""
    spec = dict.fromkeys(("path", "url", "sha256", "commit", "branch"))
    if build.source_archive:
        return {**spec, "kind": "archive", "path": f"/api/v0/internal/builds/{build.pk}/source.tar.gz"}
    if build.source_url:
        return {**spec, "kind": "url", "url": build.source_url, "sha256": build.source_sha256}
    repository = build.pipeline.repository.strip()
    if repository:
        return {**spec, "kind": "git", "url": repository, "commit": build.commit, "branch": build.branch}
    return None


# ------------------------------------------------------------------ views


class RegisterView(AgentView):
    authentication_classes = [AgentTokenAuthentication]

    @extend_schema(operation_id="agentRegister", tags=["agent"], request=RegisterRequest,
                   responses={201: inline_serializer("AgentRegistration", {
                       "agent": AgentSerializer(), "session_token": serializers.CharField()}),
                       401: ErrorSerializer, 422: ErrorSerializer})
    def post(self, request: Request) -> Response:
        """Register this agent process; the answer's session token claims jobs."""
        registration = services.register_agent(token=request.auth, **validated(RegisterRequest, request))
        return Response({"agent": AgentSerializer(registration.agent).data, "session_token": registration.session},
                        status=status.HTTP_201_CREATED)


class DisconnectView(AgentView):
    authentication_classes = [AgentSessionAuthentication]

    @extend_schema(operation_id="agentDisconnect", tags=["agent"], request=None, responses={204: None})
    def post(self, request: Request) -> Response:
        """The agent is exiting; it no longer counts as connected."""
        services.disconnect_agent(agent=request.auth)
        return Response(status=status.HTTP_204_NO_CONTENT)


class ClaimView(AgentView):
    authentication_classes = [AgentSessionAuthentication]

    @extend_schema(operation_id="agentClaim", tags=["agent"], request=ClaimRequest,
                   responses={200: ClaimResponse, 204: None, 401: ErrorSerializer, 422: ErrorSerializer})
    def post(self, request: Request) -> Response:
        """Take the oldest scheduled job of the organization (204: none waiting; poll again)."""
        agent: Agent = request.auth
        claim_key = validated(ClaimRequest, request).get("claim_key") if request.body else None
        now = timezone.now()
        if now - agent.last_seen_at >= services.jobs.AGENT_SEEN_RESOLUTION:
            services.agent_seen(agent=agent, now=now)
        claim = services.claim_job(agent=agent, now=now, claim_key=claim_key)
        if claim is None:
            return Response(status=status.HTTP_204_NO_CONTENT)
        return Response(claim_answer(claim))


def claim_answer(claim: services.Claim) -> dict[str, Any]:
    return {"job": JobSpecSerializer(job_spec(claim.job)).data, "job_token": claim.credential}


class StartView(JobView):
    @extend_schema(operation_id="agentStartJob", tags=["agent"], request=None,
                   responses={200: Directive, 401: ErrorSerializer})
    def post(self, request: Request, job_id: str) -> Response:
        """The command is about to run. If the answer says cancel, don't run it."""
        state = services.start_job(job=self.job(request, job_id))
        return Response(directive(state))


class HeartbeatView(JobView):
    @extend_schema(operation_id="agentHeartbeat", tags=["agent"], request=HeartbeatRequest,
                   responses={200: Directive, 401: ErrorSerializer})
    def post(self, request: Request, job_id: str) -> Response:
        """Still alive. The answer tells the agent whether to stop the command."""
        timing_out = validated(HeartbeatRequest, request)["timing_out"]
        state = services.heartbeat(job=self.job(request, job_id), timing_out=timing_out)
        return Response(directive(state))


class LogsView(JobView):
    @extend_schema(operation_id="agentAppendLogs", tags=["agent"], request=LogsRequest,
                   responses={200: Directive, 401: ErrorSerializer, 422: ErrorSerializer})
    def post(self, request: Request, job_id: str) -> Response:
        """Append output chunks. A chunk whose seq is already stored is ignored (safe to retry)."""
        job = self.job(request, job_id)
        chunks = plain_chunks(json_object(request).get("chunks"))
        if chunks is None:
            chunks = [services.ChunkIn(**chunk) for chunk in validated(LogsRequest, request)["chunks"]]
        services.append_log(job=job, chunks=chunks)
        # The job's state as its credential was checked, a moment ago: as fresh as a read here.
        return Response(directive(job.state))


class FinishView(JobView):
    @extend_schema(operation_id="agentFinishJob", tags=["agent"], request=FinishRequest,
                   responses={200: FinishResponse, 401: ErrorSerializer, 422: ErrorSerializer})
    def post(self, request: Request, job_id: str) -> Response:
        """The command ended (or could not start). Safe to retry.

        With `claim_next`, the answer also hands the agent its next job, which
        spares a busy agent one request per job.
        """
        job = self.job(request, job_id)
        report = plain_finish(json_object(request))
        if report is None:
            data = validated(FinishRequest, request)
            report = {name: data.get(name) for name in REPORT_FIELDS}
            report["chunks"] = [services.ChunkIn(**chunk) for chunk in data.get("chunks") or []]
            report["claim_next"], report["claim_key"] = data["claim_next"], data.get("claim_key")
        # As the credential was checked: a job already over means this is a retry (its first
        # attempt's answer got lost), which must not claim a second job for the same agent.
        live = job.state not in TERMINAL_JOB_STATES
        state = services.report_finish(job=job, exit_code=report["exit_code"], signal=report["signal"],
                                       outcome=report["outcome"], error_code=report["error_code"],
                                       error_message=report["error_message"], chunks=report["chunks"])
        answer = directive(state)
        if report["claim_next"] and (live or report["claim_key"]):
            # As a claim with the agent's session would: the credential's check already refused
            # a revoked agent token; a stopped agent gets nothing more. A retry (the job was
            # already over) only gets again what its first attempt claimed under the same key.
            claim = None
            if job.agent_id and job.agent_serving:
                claim = services.jobs.claim_for_agent(agent_id=job.agent_id, organization_id=job.organization_id,
                                                      claim_key=report["claim_key"], fresh=live)
            answer["next"] = claim_answer(claim) if claim is not None else None
        return Response(answer)


class WorkspaceUploadView(JobView):
    parser_classes = [GzipParser]

    @extend_schema(operation_id="agentUploadWorkspace", tags=["agent"],
                   request={"application/gzip": {"type": "string", "format": "binary"}},
                   responses={204: None, 401: ErrorSerializer, 409: ErrorSerializer})
    def put(self, request: Request, job_id: str) -> Response:
        """The files the job left behind (a gzipped tarball), for its builds_in children."""
        job = self.job(request, job_id)
        if job.state not in LIVE_JOB_STATES:
            raise ApiError("job_not_active", "The job is no longer running; its workspace can't change.")
        archive = request.data
        if not isinstance(archive, bytes) or not archive:
            raise validation_error({"body": ["Send the workspace as a non-empty application/gzip body."]})
        services.store_workspace(job=job, archive=archive)
        return Response(status=status.HTTP_204_NO_CONTENT)


def _archive_response(field: Any, filename: str) -> FileResponse:
    return FileResponse(field.open("rb"), content_type="application/gzip", as_attachment=True, filename=filename)


class ParentWorkspaceView(JobView):
    @extend_schema(operation_id="agentParentWorkspace", tags=["agent"],
                   responses={(200, "application/gzip"): bytes, 404: ErrorSerializer})
    def get(self, request: Request, job_id: str) -> FileResponse:
        """The builds_in parent's files, for the workspace this job starts from."""
        job = self.job(request, job_id)
        parent = builds_in_parent(job)
        if job.state not in LIVE_JOB_STATES or parent is None or not parent.workspace_archive:
            raise ApiError("workspace_not_found", "No workspace from this job's builds_in parent.")
        return _archive_response(parent.workspace_archive, f"{parent.pk}.tar.gz")


class SourceArchiveView(AgentView):
    authentication_classes = [JobCredentialAuthentication]

    @extend_schema(operation_id="internalBuildSource", tags=["agent"],
                   responses={(200, "application/gzip"): bytes, 404: ErrorSerializer})
    def get(self, request: Request, build_uuid: str) -> FileResponse:
        """The build's uploaded source (`source_b64`), for agents running that build's jobs."""
        job: Job = request.auth
        if str(job.build_id) != build_uuid or job.state not in LIVE_JOB_STATES:
            raise ApiError("build_not_found", "This credential does not open that build's source.")
        if not job.build.source_archive:
            raise ApiError("source_not_found", "This build has no uploaded source.")
        return _archive_response(job.build.source_archive, f"{job.build_id}.tar.gz")



class RenderResultRequest(serializers.Serializer):
    pipeline_ir = serializers.JSONField(required=False, help_text="The rendered v0 IR (object or JSON string).")
    error = serializers.CharField(required=False, max_length=10_000, trim_whitespace=False,
                                  help_text="Why the render failed, instead of an IR.")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if ("pipeline_ir" in attrs) == ("error" in attrs):
            raise serializers.ValidationError({"pipeline_ir": ["Send exactly one of pipeline_ir and error."]})
        return attrs


class RenderResultView(JobView):
    @extend_schema(operation_id="agentRenderResult", tags=["agent"], request=RenderResultRequest,
                   responses={200: inline_serializer("RenderAccepted", {"jobs": serializers.IntegerField()}),
                              401: ErrorSerializer, 409: ErrorSerializer, 422: ErrorSerializer})
    def post(self, request: Request, job_id: str) -> Response:
        """A render job's result: the IR the rest of the build is planned from, or why rendering failed.

        Safe to retry. A rejected IR is 422 `build_plan_rejected` (the build failed);
        a reported failure fails the build with `render_failed`.
        """
        job = self.job(request, job_id)
        data = validated(RenderResultRequest, request)
        if "error" in data:
            services.fail_render(job=job, message=data["error"])
            return Response({"jobs": 0})
        return Response({"jobs": services.accept_rendered_pipeline(job=job, document=data["pipeline_ir"])})


# ------------------------------------------------------------------ artifacts


class StoredArtifactSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    path = serializers.CharField()
    size = serializers.IntegerField()
    sha256 = serializers.CharField()
    mime_type = serializers.CharField()
    created_at = serializers.DateTimeField()


class ArtifactUploadView(JobView):
    @extend_schema(
        operation_id="agentUploadArtifact", tags=["agent"],
        parameters=[
            OpenApiParameter("path", str, required=True,
                             description="The file's path relative to $HARMONT_ARTIFACTS, `/`-separated."),
            OpenApiParameter("sha256", str, description="The file's SHA-256 (hex); checked against the bytes."),
        ],
        request={"application/octet-stream": {"type": "string", "format": "binary"}},
        responses={201: StoredArtifactSerializer, 200: StoredArtifactSerializer, 401: ErrorSerializer,
                   409: ErrorSerializer, 413: ErrorSerializer, 422: ErrorSerializer},
    )
    def put(self, request: Request, job_id: str) -> Response:
        """Store one file of the job's artifacts (the raw bytes, with a Content-Length).

        201: stored; 200: the same bytes were already stored at this path (a retry).
        """
        job = self.job(request, job_id)
        length = request.META.get("CONTENT_LENGTH") or ""
        if request.META.get("HTTP_TRANSFER_ENCODING") or (length and not length.isdigit()):
            # Without a length the WSGI body reads as empty: the file would be stored truncated.
            raise ApiError("invalid_request", "Send the artifact's bytes with a Content-Length header "
                                              "(not chunked).", status=411)
        # Read from the request stream as it arrives (request.body would hold the whole file in memory).
        stored = store_artifact(job=job, path=request.query_params.get("path", ""), size=int(length or 0),
                                content=request.stream or io.BytesIO(), sha256=request.query_params.get("sha256"))
        return Response(StoredArtifactSerializer(stored.artifact).data,
                        status=status.HTTP_201_CREATED if stored.created else status.HTTP_200_OK)
