"""The HTTP API agents speak, under /api/v0/agent/ (and the internal source download).

Each view parses its body (builds.agent_serializers), makes one service call
and answers; the credentials are checked by builds.agent_auth.
"""

from __future__ import annotations

import io
from typing import Any

from django.http import FileResponse
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.parsers import BaseParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from builds import claim_resumes, claim_waits, selectors, services
from builds.agent_auth import (
    AgentSessionAuthentication,
    AgentTokenAuthentication,
    Authenticated,
    JobCredentialAuthentication,
)
from builds.agent_serializers import (
    AgentSerializer,
    ClaimRequest,
    ClaimResponse,
    Directive,
    FinishRequest,
    FinishResponse,
    HeartbeatRequest,
    LogsRequest,
    RegisterRequest,
    RenderResultRequest,
    StartRequest,
    StoredArtifactSerializer,
    claim_answer,
    claim_ask,
    directive,
    finish_answer,
    finish_report,
    log_chunks,
)
from builds.models import Job
from builds.responses import archive_response, snapshot_response
from harmont.errors import ApiError, validation_error
from harmont.serializers import ErrorSerializer, validated


class GzipParser(BaseParser):
    media_type = "application/gzip"

    def parse(self, stream: Any, media_type: str | None = None, parser_context: dict | None = None) -> bytes:
        return stream.read() if stream is not None else b""


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
                   responses={200: ClaimResponse, 204: None, 401: ErrorSerializer, 422: ErrorSerializer},
                   parameters=[OpenApiParameter(
                       claim_resumes.RESUME_HEADER, str, OpenApiParameter.HEADER, required=False, description=(
                           "The key the 204 of this agent's previous claim carried in this header, sent only "
                           "straight after that 204: the server may then hold this claim without looking again."))])
    def post(self, request: Request) -> Response:
        """Take the oldest scheduled job of the organization (204: none waiting; poll again).

        With `wait`, the server may hold the request until a job this agent may
        take is scheduled, or `wait` seconds pass (then 204). A held claim's 204
        may carry a `Harmont-Claim-Resume` key for the next claim.
        """
        ask = claim_ask(request)
        agent = request.auth
        claim = services.claim_job(agent=agent, claim_key=ask.claim_key)
        if claim is None:
            response = Response(status=status.HTTP_204_NO_CONTENT)
            if ask.wait and request.META.get(claim_waits.LONG_POLL_META):
                # For builds.claim_waits, which holds the request and removes the header.
                response[claim_waits.HOLD_HEADER] = claim_waits.hold_value(
                    organization_id=agent.organization_id, agent_id=agent.pk, wait=ask.wait, tags=agent.tags)
            return response
        return Response(claim_answer(claim))


class StartView(JobView):
    @extend_schema(operation_id="agentStartJob", tags=["agent"], request=StartRequest,
                   responses={200: Directive, 401: ErrorSerializer, 422: ErrorSerializer})
    def post(self, request: Request, job_id: str) -> Response:
        """The command is about to run. If the answer says cancel, don't run it."""
        data = validated(StartRequest, request)
        state = services.start_job(job=self.job(request, job_id), commit=data.get("commit"),
                                   elapsed_seconds=data["elapsed_seconds"])
        return Response(directive(state))


class HeartbeatView(JobView):
    @extend_schema(operation_id="agentHeartbeat", tags=["agent"], request=HeartbeatRequest,
                   responses={200: Directive, 401: ErrorSerializer, 422: ErrorSerializer})
    def post(self, request: Request, job_id: str) -> Response:
        """Still alive. The answer tells the agent whether to stop the command."""
        timing_out = validated(HeartbeatRequest, request)["timing_out"]
        state = services.heartbeat(job=self.job(request, job_id), timing_out=timing_out)
        return Response(directive(state))


class LogsView(JobView):
    # A batch is what the job printed since the last flush; the job's log limit caps what is kept.
    body_limit = "MAX_REQUEST_BYTES"

    @extend_schema(operation_id="agentAppendLogs", tags=["agent"], request=LogsRequest,
                   responses={200: Directive, 401: ErrorSerializer, 422: ErrorSerializer})
    def post(self, request: Request, job_id: str) -> Response:
        """Append output chunks. A chunk whose seq is already stored is ignored (safe to retry)."""
        job = self.job(request, job_id)
        services.append_log(job=job, chunks=log_chunks(request))
        # The job's state as its credential was checked, a moment ago: as fresh as a read here.
        return Response(directive(job.state))


class FinishView(JobView):
    body_limit = "MAX_REQUEST_BYTES"  # the last output rides along

    @extend_schema(operation_id="agentFinishJob", tags=["agent"], request=FinishRequest,
                   responses={200: FinishResponse, 401: ErrorSerializer, 422: ErrorSerializer})
    def post(self, request: Request, job_id: str) -> Response:
        """The command ended (or could not start). Safe to retry.

        With `claim_next`, the answer also hands the agent its next job, which
        spares a busy agent one request per job.
        """
        outcome = services.finish_and_claim_next(job=self.job(request, job_id), **finish_report(request))
        return Response(finish_answer(outcome))


class WorkspaceUploadView(JobView):
    body_limit = "MAX_REQUEST_BYTES"
    parser_classes = [GzipParser]

    @extend_schema(operation_id="agentUploadWorkspace", tags=["agent"],
                   request={"application/gzip": {"type": "string", "format": "binary"}},
                   responses={204: None, 401: ErrorSerializer, 409: ErrorSerializer, 422: ErrorSerializer})
    def put(self, request: Request, job_id: str) -> Response:
        """The files the job left behind (a gzipped tarball), for its builds_in children."""
        job = self.job(request, job_id)
        archive = request.data
        if not isinstance(archive, bytes) or not archive:
            raise validation_error({"body": ["Send the workspace as a non-empty application/gzip body."]})
        services.store_workspace(job=job, archive=archive)
        return Response(status=status.HTTP_204_NO_CONTENT)


class ParentWorkspaceView(JobView):
    @extend_schema(operation_id="agentParentWorkspace", tags=["agent"],
                   responses={(200, "application/gzip"): bytes, 404: ErrorSerializer})
    def get(self, request: Request, job_id: str) -> FileResponse:
        """The builds_in parent's files, for the workspace this job starts from."""
        parent, workspace = selectors.parent_workspace(self.job(request, job_id))
        return archive_response(workspace, f"{parent.pk}.tar.gz")


class SnapshotUploadView(JobView):
    body_limit = "SNAPSHOT_MAX_BYTES"  # checked again by the service as the body is read
    chunked_body = False  # streamed to storage as it arrives, chunked or with a Content-Length

    @extend_schema(operation_id="agentUploadSnapshot", tags=["agent"],
                   request={"application/x-tar": {"type": "string", "format": "binary"}},
                   responses={204: None, 401: ErrorSerializer, 409: ErrorSerializer, 413: ErrorSerializer,
                              422: ErrorSerializer})
    def put(self, request: Request, job_id: str) -> Response:
        """The job's whole filesystem (a container engine's `save` archive of its committed container), for its
        builds_in children on other agents. Send it chunked as it is made, or with a Content-Length."""
        job = self.job(request, job_id)
        length = request.META.get("CONTENT_LENGTH") or ""
        if length.isdigit():
            content, size = request.stream or io.BytesIO(), int(length)
        elif "chunked" in request.META.get("HTTP_TRANSFER_ENCODING", "").lower():
            # Without a length Django reads no body: the server (gunicorn, uvicorn) has undone the chunking.
            content, size = request.META["wsgi.input"], None
        else:
            content, size = io.BytesIO(), None
        services.store_snapshot(job=job, content=content, size=size)
        return Response(status=status.HTTP_204_NO_CONTENT)


class ParentSnapshotView(JobView):
    @extend_schema(operation_id="agentParentSnapshot", tags=["agent"],
                   responses={(200, "application/x-tar"): bytes, 401: ErrorSerializer, 404: ErrorSerializer})
    def get(self, request: Request, job_id: str) -> FileResponse:
        """The builds_in parent's filesystem snapshot, for the container this job starts in."""
        parent, snapshot = selectors.parent_snapshot(self.job(request, job_id))
        return snapshot_response(snapshot, f"{parent.pk}.tar")


class SourceArchiveView(AgentView):
    authentication_classes = [JobCredentialAuthentication]

    @extend_schema(operation_id="internalBuildSource", tags=["agent"],
                   responses={(200, "application/gzip"): bytes, 404: ErrorSerializer})
    def get(self, request: Request, build_uuid: str) -> FileResponse:
        """The build's uploaded source (`source_b64`), for agents running that build's jobs."""
        job: Job = request.auth
        return archive_response(selectors.build_source(job, build_uuid), f"{job.build_id}.tar.gz")


class RenderResultView(JobView):
    body_limit = "MAX_BUILD_REQUEST_BYTES"  # a pipeline as large as one a build create may carry

    @extend_schema(operation_id="agentRenderResult", tags=["agent"], request=RenderResultRequest,
                   responses={200: inline_serializer("RenderAccepted", {"jobs": serializers.IntegerField()}),
                              401: ErrorSerializer, 409: ErrorSerializer, 422: ErrorSerializer})
    def post(self, request: Request, job_id: str) -> Response:
        """A render job's result: the IR the rest of the build is planned from, or why rendering failed.

        Safe to retry. A rejected IR is 422 `build_plan_rejected` (the build failed);
        a reported failure fails the build with `render_failed`.
        """
        job = self.job(request, job_id)
        return Response({"jobs": services.record_render_result(job=job, **validated(RenderResultRequest, request))})


# ------------------------------------------------------------------ artifacts


class ArtifactUploadView(JobView):
    body_limit = "MAX_REQUEST_BYTES"  # then HARMONT_ARTIFACT_MAX_BYTES, checked by the service
    chunked_body = False  # streamed to storage as it arrives, so its length comes first (411 without)

    @extend_schema(
        operation_id="agentUploadArtifact", tags=["agent"],
        parameters=[
            OpenApiParameter("path", str, required=True,
                             description="The file's path relative to $HARMONT_ARTIFACTS, `/`-separated."),
            OpenApiParameter("sha256", str, description="The file's SHA-256 (hex); checked against the bytes."),
        ],
        request={"application/octet-stream": {"type": "string", "format": "binary"}},
        responses={201: StoredArtifactSerializer, 200: StoredArtifactSerializer, 401: ErrorSerializer,
                   409: ErrorSerializer, 411: ErrorSerializer, 413: ErrorSerializer, 422: ErrorSerializer},
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
        stored = services.store_artifact(job=job, path=request.query_params.get("path", ""), size=int(length or 0),
                                         content=request.stream or io.BytesIO(),
                                         sha256=request.query_params.get("sha256"))
        return Response(StoredArtifactSerializer(stored.artifact).data,
                        status=status.HTTP_201_CREATED if stored.created else status.HTTP_200_OK)
