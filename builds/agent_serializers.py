"""The agent API's request and response bodies: the schema, and the translation to service arguments.

Agents send a few log chunks with every shipment and every finish. Checking
them with the nested serializers cost more than the rest of such a request, so
`log_chunks` and `finish_report` first try a check by hand that passes only
input those serializers would take as it is, with the same values; anything
else goes through the serializers, so bad input still gets their 422 and
per-field messages (tests/test_agent_api.py holds the two paths equal).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.request import Request

from builds.models import Agent, JobState
from builds.selectors import MAX_CLAIM_WAIT_SECONDS
from builds.services import ChunkIn, Claim, FinishOutcome, StartedIn, job_spec
from builds.services.notifications import is_full_commit
from builds.states import TERMINAL_JOB_STATES
from harmont.errors import flatten_detail, validation_error
from harmont.serializers import json_object, validated
from harmont.timestamps import is_unix_ns, ns_from_datetime
from pipelines import agent_tags


class AgentTagsField(serializers.DictField):
    """An agent's `{key: value}` tags (pipelines.agent_tags); each problem is one message."""

    child = serializers.CharField()

    def to_internal_value(self, data: object) -> dict[str, str]:
        problems = agent_tags.tag_problems(data)
        if problems:
            raise serializers.ValidationError(problems)
        return dict(data)  # type: ignore[call-overload]


class RegisterRequest(serializers.Serializer):
    name = serializers.CharField(max_length=255)
    hostname = serializers.CharField(max_length=255, required=False, allow_blank=True, default="")
    version = serializers.CharField(max_length=50, required=False, allow_blank=True, default="")
    os = serializers.CharField(max_length=255, required=False, allow_blank=True, default="")
    tags = AgentTagsField(required=False, default=dict, help_text=(
        "What jobs select this agent by (`{\"queue\": \"arm64\", \"os\": \"linux\"}`); without a `queue` tag "
        "the agent is in queue `default`. Keys: 1-64 of A-Z a-z 0-9 _ . -; values: 1-255 printable characters "
        "without * ? [ ]; at most 32 tags."))


class AgentSerializer(serializers.ModelSerializer):
    class Meta:
        model = Agent
        fields = ["id", "name", "hostname", "version", "os", "tags", "created_at", "last_seen_at"]
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
    envelope = serializers.BooleanField(help_text=(
        "Send the whole rendered envelope with the IR: the build registers the repository's pipelines again."))


class ParentSnapshotSpec(serializers.Serializer):
    job_id = serializers.UUIDField(help_text="The job whose filesystem this is: an agent that made or loaded its "
                                             "snapshot already starts from its own copy.")
    path = serializers.CharField(help_text="GET the snapshot here (404 snapshot_not_found: the parent left none).")


class SnapshotUploadSpec(serializers.Serializer):
    path = serializers.CharField(help_text="PUT the snapshot here, as the engine's `save` makes it.")
    max_bytes = serializers.IntegerField(help_text="The largest snapshot the server stores.")


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
    parent_snapshot = ParentSnapshotSpec(allow_null=True, help_text=(
        "A builds_in child's parent filesystem, for agents that run jobs in containers; null for a root job."))
    snapshot_upload = SnapshotUploadSpec(allow_null=True, help_text=(
        "Set for a job with builds_in children: an agent that runs it in a container PUTs the committed "
        "container's image here after the command passes."))
    cancel_grace_seconds = serializers.IntegerField()
    mask = serializers.ListField(child=serializers.CharField(trim_whitespace=False),
                                 help_text="Secret values in `env`: replace them with [REDACTED] in the output shipped.")
    render = RenderSpec(allow_null=True, help_text="Set for a render job: render the pipeline instead of "
                                                   "running `command`.")
    start_with_finish = serializers.BooleanField(help_text=(
        "The server takes a finish report that carries the job's start (`started`): an agent may hold the "
        "start report back while the command runs, and send it on its own only if the command takes longer "
        "than a moment."))


class ClaimResponse(serializers.Serializer):
    job = JobSpecSerializer()
    job_token = serializers.CharField(help_text="The job credential: valid for this one job only.")


@extend_schema_field({"type": "integer", "format": "int64", "minimum": 0,
                      "description": "Unix time in nanoseconds (an ISO-8601 string is accepted too)."})
class NanosecondsField(serializers.Field):
    """Unix nanoseconds as an integer; an ISO-8601 time (what older agents send) is converted."""

    default_error_messages = {"invalid": "Send Unix time in nanoseconds (an integer) or an ISO-8601 time."}
    _datetime = serializers.DateTimeField()

    def to_internal_value(self, data: Any) -> int:
        if is_unix_ns(data):
            return data
        if isinstance(data, str):
            try:
                return ns_from_datetime(self._datetime.to_internal_value(data))
            except serializers.ValidationError:
                pass
        self.fail("invalid")

    def to_representation(self, value: int) -> int:
        return value


class ChunkSerializer(serializers.Serializer):
    seq = serializers.IntegerField(min_value=1, max_value=2**31 - 1)
    stream_kind = serializers.ChoiceField(choices=[0, 1, 2], help_text="0 stdout, 1 stderr, 2 meta")
    content = serializers.CharField(allow_blank=True, trim_whitespace=False)
    ts = NanosecondsField()


class LogsRequest(serializers.Serializer):
    chunks = ChunkSerializer(many=True)


class Directive(serializers.Serializer):
    state = serializers.CharField()
    cancel = serializers.BooleanField(help_text="Stop the command: SIGTERM, grace, SIGKILL; then finish. "
                                                "Also set once the job has ended: don't (keep) run(ning) it.")
    timeout = serializers.BooleanField(help_text="The job is over its time: stop it and finish as timed out.")


FULL_COMMIT = re.compile(r"\A[0-9a-f]{40}(?:[0-9a-f]{24})?\Z")


# A start held back this long at most (the server caps it at the job's timeout).
MAX_START_ELAPSED_SECONDS = 7 * 24 * 3600


class StartRequest(serializers.Serializer):
    agent_name = serializers.CharField(required=False, allow_blank=True, max_length=255)
    elapsed_seconds = serializers.FloatField(required=False, default=0, min_value=0,
                                             max_value=MAX_START_ELAPSED_SECONDS, help_text=(
        "How long ago the command started, for a start report the agent held back (the job spec's "
        "`start_with_finish`): the server dates the start back by as much, from its own clock."))
    commit = serializers.RegexField(FULL_COMMIT, required=False, allow_null=True, help_text=(
        "The full id of the commit the job's checkout landed on. A build whose commit was no full id (`HEAD`, a "
        "branch) takes it as its `commit`: later jobs check out the same one, and its commit statuses go there."))


class StartedReport(StartRequest):
    elapsed_seconds = serializers.FloatField(min_value=0, max_value=MAX_START_ELAPSED_SECONDS, help_text=(
        "How long before this report the command started (the server dates the start from its own clock)."))


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
    wait = serializers.FloatField(required=False, default=0, min_value=0, max_value=MAX_CLAIM_WAIT_SECONDS, help_text=(
        "Seconds (0-30) the server may hold the request while no job is waiting, answering as soon as one this "
        "agent may take is scheduled (a long poll; also `?wait=`). A server that holds it says so with the "
        "`Harmont-Claim-Wait` header on its answer; without that header, poll again after a pause."))


class FinishRequest(serializers.Serializer):
    chunks = ChunkSerializer(many=True, required=False, help_text="The last log chunks, stored before the finish.")
    exit_code = serializers.IntegerField(allow_null=True, required=False, min_value=-1, max_value=65535)
    signal = serializers.IntegerField(allow_null=True, required=False, min_value=1, max_value=255)
    outcome = serializers.ChoiceField(choices=["canceled", "timed_out"], allow_null=True, required=False)
    error_code = serializers.ChoiceField(choices=["workspace_unavailable", "render_failed", "job_start_failed",
                                                  "image_unavailable"],
                                         allow_null=True,
                                         required=False)
    error_message = serializers.CharField(allow_null=True, required=False, allow_blank=True, max_length=2000)
    claim_next = serializers.BooleanField(required=False, default=False, help_text=(
        "Also claim this agent's next job: the answer's `next` is then what `claim` would have answered "
        "(null: none waiting). Only the report that ends the job claims a new one; a retried report answers "
        "the job its first attempt claimed under the same `claim_key`, and without a key leaves `next` out."))
    claim_key = ClaimKeyField()
    started = StartedReport(required=False, allow_null=True, help_text=(
        "The job's start, when the agent held its start report back (the job spec's `start_with_finish`) and "
        "the command ended before it went out: the finish then also starts the job, as `start` would have."))


class FinishResponse(Directive):
    next = ClaimResponse(required=False, allow_null=True, help_text="Only when the report asked for `claim_next`.")


# The checks by hand (see the module's docstring) read their limits from the serializers' own fields.
_CHUNK_FIELDS = ChunkSerializer().fields
_FINISH_FIELDS = FinishRequest().fields
_STARTED_FIELDS = StartedReport().fields
REPORT_FIELDS = ("exit_code", "signal", "outcome", "error_code", "error_message")


def _int_within(value: Any, field: serializers.IntegerField) -> bool:
    return type(value) is int and field.min_value <= value <= field.max_value  # bool is no int here


def _choice(value: Any, field: serializers.ChoiceField) -> bool:
    return isinstance(value, str) and value in field.choices


def plain_chunks(items: Any) -> list[ChunkIn] | None:
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
                and type(content) is str and "\x00" not in content and is_unix_ns(ts)):
            return None  # (an ISO-8601 `ts` takes the serializer's way)
        chunks.append(ChunkIn(seq, kind, content, ts))
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
    started = body.get("started")
    if started is not None and not _plain_started(started):
        return None
    return {"chunks": chunks, "claim_next": claim_next, "claim_key": claim_key, **report,
            "started": None if started is None else started_report(started)}


def _plain_started(started: Any) -> bool:
    if not isinstance(started, dict) or not started.keys() <= {"agent_name", "commit", "elapsed_seconds"}:
        return False
    name, commit, elapsed = started.get("agent_name", ""), started.get("commit"), started.get("elapsed_seconds")
    return (type(name) is str and name == name.strip() and len(name) <= _STARTED_FIELDS["agent_name"].max_length
            and "\x00" not in name
            and (commit is None or (type(commit) is str and is_full_commit(commit)))
            and type(elapsed) in (int, float) and 0 <= elapsed <= MAX_START_ELAPSED_SECONDS)


def started_report(started: dict[str, Any]) -> StartedIn:
    return StartedIn(commit=started.get("commit"), elapsed_seconds=float(started["elapsed_seconds"]))


class RenderResultRequest(serializers.Serializer):
    pipeline_ir = serializers.JSONField(required=False, help_text="The rendered v0 IR (object or JSON string).")
    error = serializers.CharField(required=False, max_length=10_000, trim_whitespace=False,
                                  help_text="Why the render failed, instead of an IR.")
    envelope = serializers.JSONField(required=False, help_text=(
        "With `pipeline_ir`, when the job spec's `render.envelope` asked for it: every pipeline of the "
        "repository's .hm/*.py as rendered (what harmont.dump_registry_json() prints)."))

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if ("pipeline_ir" in attrs) == ("error" in attrs):
            raise serializers.ValidationError({"pipeline_ir": ["Send exactly one of pipeline_ir and error."]})
        if "envelope" in attrs and "error" in attrs:
            raise serializers.ValidationError({"envelope": ["Only a rendered pipeline comes with its envelope."]})
        return attrs


class StoredArtifactSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    path = serializers.CharField()
    size = serializers.IntegerField()
    sha256 = serializers.CharField()
    mime_type = serializers.CharField()
    created_at = serializers.DateTimeField()


def directive(state: str) -> dict[str, Any]:
    """What an agent hears back about its job: keep going, stop (cancel), or stop as timed out."""
    # A job the server already ended (the reaper gave up on its agent, its pipeline timed
    # out while it was assigned) must not run (on): the agent hears that as a cancel, and
    # its finish report is then a no-op.
    stop = state == JobState.CANCELING or state in TERMINAL_JOB_STATES
    return {"state": state, "cancel": stop, "timeout": state == JobState.TIMING_OUT}


def claim_answer(claim: Claim) -> dict[str, Any]:
    return {"job": job_spec(claim.job), "job_token": claim.credential}  # already as JobSpecSerializer renders it


@dataclass(frozen=True)
class ClaimAsk:
    claim_key: str | None
    wait: float  # seconds; 0: answer at once


def claim_ask(request: Request) -> ClaimAsk:
    """A claim request's optional `claim_key` and `wait` (an empty body is a claim without either).

    `wait` may come in the query instead, as clients that send no body put it.
    """
    data = dict(json_object(request)) if request.body else {}
    if "wait" not in data and "wait" in request.query_params:
        data["wait"] = request.query_params["wait"]
    if not data:
        return ClaimAsk(claim_key=None, wait=0)  # the common empty claim: no serializer to run
    plain = plain_claim(data)
    if plain is not None:
        return plain
    body = ClaimRequest(data=data)
    if not body.is_valid():
        raise validation_error(flatten_detail(body.errors))
    return ClaimAsk(claim_key=body.validated_data.get("claim_key"), wait=body.validated_data["wait"])


def plain_claim(data: dict[str, Any]) -> ClaimAsk | None:
    """A well-formed claim body (what agents send: a key and a number of seconds), checked by hand as
    ClaimRequest would; None when anything is off, for the serializer to word the error."""
    if not data.keys() <= {"claim_key", "wait"}:
        return None
    key, wait = data.get("claim_key"), data.get("wait", 0)
    if key is not None and not (type(key) is str and CLAIM_KEY.match(key)):
        return None
    if type(wait) not in (int, float) or not 0 <= wait <= MAX_CLAIM_WAIT_SECONDS:
        return None  # (a string of digits, as ?wait= is, takes the serializer's way)
    return ClaimAsk(claim_key=key, wait=float(wait))


def log_chunks(request: Request) -> list[ChunkIn]:
    """A log shipment's chunks."""
    chunks = plain_chunks(json_object(request).get("chunks"))
    if chunks is None:
        chunks = [ChunkIn(**chunk) for chunk in validated(LogsRequest, request)["chunks"]]
    return chunks


def finish_report(request: Request) -> dict[str, Any]:
    """A finish request as `services.finish_and_claim_next`'s keyword arguments (besides the job)."""
    report = plain_finish(json_object(request))
    if report is None:
        data = validated(FinishRequest, request)
        report = {name: data.get(name) for name in REPORT_FIELDS}
        report["chunks"] = [ChunkIn(**chunk) for chunk in data.get("chunks") or []]
        report["claim_next"], report["claim_key"] = data["claim_next"], data.get("claim_key")
        report["started"] = None if data.get("started") is None else started_report(data["started"])
    return report


def finish_answer(outcome: FinishOutcome) -> dict[str, Any]:
    """The directive for the finished job, and `next` when the report asked for a next job."""
    answer = directive(outcome.state)
    if outcome.answers_next:
        answer["next"] = claim_answer(outcome.next) if outcome.next is not None else None
    return answer
