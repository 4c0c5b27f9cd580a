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

from typing import Any

from django.conf import settings
from django.http import FileResponse
from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import authentication, exceptions, serializers, status
from rest_framework.parsers import BaseParser
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from builds import services
from builds.models import Agent, Build, Job, JobState
from builds.services.jobs import builds_in_links, builds_in_parent, job_for_credential
from builds.states import TERMINAL_JOB_STATES
from harmont.auth import (
    AGENT_SESSION_PREFIX,
    AGENT_TOKEN_PREFIX,
    JOB_CREDENTIAL_PREFIX,
    hash_secret,
)
from harmont.errors import ApiError, validation_error
from harmont.serializers import ErrorSerializer, validated
from organizations.models import AgentToken

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
        agent = Agent.objects.select_related("token").filter(session_hash=hash_secret(raw)).first()
        # Revoking the organization's token stops its agents at their next request.
        if agent is None or agent.token.revoked_at is not None or agent.stopped_at is not None:
            raise exceptions.AuthenticationFailed("Unknown agent session, or its agent token was revoked.")
        return AgentPrincipal(agent.name), agent


class JobCredentialAuthentication(AgentTokenAuthentication):
    def authenticate(self, request: Request) -> tuple[AgentPrincipal, Job] | None:
        raw = _bearer(request, JOB_CREDENTIAL_PREFIX)
        if raw is None:
            return None
        job = job_for_credential(raw)
        if job is None or (job.agent is not None and job.agent.token.revoked_at is not None):
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
    source_path = serializers.CharField(allow_null=True, help_text="GET with the job credential; unpack into "
                                                                   "the workspace first.")
    parent_workspace_path = serializers.CharField(allow_null=True, help_text="The builds_in parent's files.")
    upload_workspace = serializers.BooleanField(help_text="PUT the workspace after the command passes.")
    cancel_grace_seconds = serializers.IntegerField()


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


class FinishRequest(serializers.Serializer):
    chunks = ChunkSerializer(many=True, required=False, help_text="The last log chunks, stored before the finish.")
    exit_code = serializers.IntegerField(allow_null=True, required=False, min_value=-1, max_value=65535)
    signal = serializers.IntegerField(allow_null=True, required=False, min_value=1, max_value=255)
    outcome = serializers.ChoiceField(choices=["canceled", "timed_out"], allow_null=True, required=False)
    error_code = serializers.ChoiceField(choices=["workspace_unavailable"], allow_null=True, required=False)
    error_message = serializers.CharField(allow_null=True, required=False, allow_blank=True, max_length=2000)


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
    env = {
        **job.env,
        "CI": "true", "HARMONT": "true", "HARMONT_BUILD_ID": str(build.pk), "HARMONT_BUILD_NUMBER": str(build.number),
        "HARMONT_PIPELINE_SLUG": build.pipeline.slug, "HARMONT_BRANCH": build.branch, "HARMONT_COMMIT": build.commit,
        "HARMONT_STEP_KEY": job.step_key,
    }
    return {
        "id": job.pk, "build_id": build.pk, "build_number": build.number, "pipeline_slug": build.pipeline.slug,
        "step_key": job.step_key, "name": job.name, "command": job.command, "env": env,
        "timeout_seconds": job.timeout_seconds, "image": job.image,
        "source_path": f"/api/v0/internal/builds/{build.pk}/source.tar.gz" if root and build.source_archive else None,
        "parent_workspace_path": None if root else f"/api/v0/agent/jobs/{job.pk}/parent-workspace",
        "upload_workspace": links.has_children,
        "cancel_grace_seconds": settings.AGENT_CANCEL_GRACE_SECONDS,
    }


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

    @extend_schema(operation_id="agentClaim", tags=["agent"], request=None,
                   responses={200: ClaimResponse, 204: None, 401: ErrorSerializer})
    def post(self, request: Request) -> Response:
        """Take the oldest scheduled job of the organization (204: none waiting; poll again)."""
        agent: Agent = request.auth
        now = timezone.now()
        if now - agent.last_seen_at >= services.jobs.AGENT_SEEN_RESOLUTION:
            services.agent_seen(agent=agent, now=now)
        claim = services.claim_job(agent=agent, now=now)
        if claim is None:
            return Response(status=status.HTTP_204_NO_CONTENT)
        return Response({"job": JobSpecSerializer(job_spec(claim.job)).data, "job_token": claim.credential})


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
        chunks = [services.ChunkIn(**chunk) for chunk in validated(LogsRequest, request)["chunks"]]
        services.append_log(job=job, chunks=chunks)
        state = Job.objects.values_list("state", flat=True).get(pk=job.pk)
        return Response(directive(state))


class FinishView(JobView):
    @extend_schema(operation_id="agentFinishJob", tags=["agent"], request=FinishRequest,
                   responses={200: Directive, 401: ErrorSerializer, 422: ErrorSerializer})
    def post(self, request: Request, job_id: str) -> Response:
        """The command ended (or could not start). Safe to retry."""
        job = self.job(request, job_id)
        data = validated(FinishRequest, request)
        if data.get("chunks"):
            services.append_log(job=job, chunks=[services.ChunkIn(**chunk) for chunk in data["chunks"]], alive=False)
        state = services.report_finish(job=job, exit_code=data.get("exit_code"), signal=data.get("signal"),
                                       outcome=data.get("outcome"), error_code=data.get("error_code"),
                                       error_message=data.get("error_message"))
        return Response(directive(state))


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

