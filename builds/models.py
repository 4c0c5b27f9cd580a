"""Builds, their jobs, the edges between jobs, and log chunks."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.utils import timezone

from organizations.models import Organization
from pipelines.models import Pipeline


class BuildState(models.TextChoices):
    # Waiting for an admin or owner to approve it (a fork pull request); no agent takes its jobs.
    HELD = "held"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    PASSED = "passed"
    FAILED = "failed"
    CANCELED = "canceled"
    SKIPPED = "skipped"


class BuildSource(models.TextChoices):
    WEBHOOK = "webhook"
    UI = "ui"
    API = "api"
    TRIGGER_JOB = "trigger_job"
    SCHEDULE = "schedule"


class SecretAccess(models.TextChoices):
    """Which secrets a build's jobs get, decided once when it is created."""

    ALL = "all"
    # Only secrets not marked protected.
    UNPROTECTED = "unprotected"
    NONE = "none"


class JobKind(models.TextChoices):
    COMMAND = "command"
    # Renders the pipeline from the repository's `.hm/*.py` on an agent; the rest
    # of the build is planned from the IR it sends back.
    RENDER = "render"


class JobState(models.TextChoices):
    # A root job of a build waiting for approval: scheduled once approved, never claimed before.
    HELD = "held"
    PENDING = "pending"
    SCHEDULED = "scheduled"
    ASSIGNED = "assigned"
    RUNNING = "running"
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELING = "canceling"
    CANCELED = "canceled"
    TIMING_OUT = "timing_out"
    TIMED_OUT = "timed_out"


class BuildQuerySet(models.QuerySet["Build"]):
    def for_org(self, org: Organization) -> "BuildQuerySet":
        return self.filter(pipeline__organization=org)

    def for_display(self) -> "BuildQuerySet":
        """Without the large JSON columns no build listing shows (decoding them is most of a read)."""
        return self.defer("pipeline_ir", "env")


class Build(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    pipeline = models.ForeignKey(Pipeline, on_delete=models.CASCADE, related_name="builds")
    number = models.PositiveIntegerField()
    state = models.CharField(max_length=12, choices=BuildState.choices, default=BuildState.SCHEDULED)
    branch = models.CharField(max_length=255)
    commit = models.CharField(max_length=255)
    message = models.TextField(blank=True, null=True)
    source = models.CharField(max_length=12, choices=BuildSource.choices, default=BuildSource.API)
    env = models.JSONField(default=dict, blank=True)
    # The IR the jobs were planned from, as received (audit trail and re-runs).
    pipeline_ir = models.JSONField(null=True, blank=True)
    timeout_seconds = models.PositiveIntegerField(null=True, blank=True)
    source_archive = models.FileField(upload_to="sources/", blank=True, null=True)
    source_url = models.CharField(max_length=2000, blank=True, null=True)
    source_sha256 = models.CharField(max_length=64, blank=True, null=True)
    error_code = models.CharField(max_length=40, blank=True, null=True)
    error_message = models.TextField(blank=True, null=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                                   on_delete=models.SET_NULL, related_name="+")
    # Built from a pull request whose head is in another repository: its jobs never get secrets.
    fork = models.BooleanField(default=False)
    # Stored, not recomputed at each claim: a later role change or definition edit
    # must not change what a build that already exists receives.
    secret_access = models.CharField(max_length=12, choices=SecretAccess.choices, default=SecretAccess.UNPROTECTED)
    approved_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                                    on_delete=models.SET_NULL, related_name="+")
    approved_at = models.DateTimeField(null=True, blank=True)
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    # A push to the default branch of a repository's registered pipelines: the envelope its render
    # job renders at the pushed commit registers them again (new ones built, vanished ones archived).
    discovers_pipelines = models.BooleanField(default=False)
    # The number of the build of the same pipeline this one is a rebuild of. A number, not a
    # foreign key: it is what the API and the page show, and it outlives a pruned original.
    rebuild_of = models.PositiveIntegerField(null=True, blank=True)
    # Set while the build waits for a slot under its pipeline's `max_concurrent_builds` (its root
    # jobs stay `pending`, so no agent sees them): why it waits, as the build page and JSON say it.
    waiting_reason = models.CharField(max_length=255, null=True, blank=True)
    # Some job of the build reuses an earlier job (a step cache hit): its job ends settle the whole
    # build (states.settle_build), which passes a cached job once its prerequisites are met.
    reuses_jobs = models.BooleanField(default=False)
    created_at = models.DateTimeField(default=timezone.now)
    scheduled_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    objects = BuildQuerySet.as_manager()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["pipeline", "number"], name="build_number_unique")]
        # The unique (pipeline, number) index serves the plain newest-first list;
        # these serve the filtered lists without scanning a pipeline's history.
        indexes = [
            models.Index(fields=["pipeline", "branch", "-number"], name="build_by_branch"),
            models.Index(fields=["pipeline", "state", "-number"], name="build_by_state"),
            models.Index(fields=["pipeline", "commit"], name="build_by_commit"),
            # Admission takes a pipeline's oldest waiting builds; the reaper finds pipelines that have any.
            models.Index(fields=["pipeline", "number"], condition=models.Q(waiting_reason__isnull=False),
                         name="build_waiting"),
        ]

    def __str__(self) -> str:
        return f"{self.pipeline_id}#{self.number}"


class Job(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    build = models.ForeignKey(Build, on_delete=models.CASCADE, related_name="jobs")
    # Denormalised from build.pipeline so agents find their organization's
    # scheduled jobs with one index range scan, without joins.
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="+")
    # Position in dependency order: every prerequisite has a smaller position.
    position = models.PositiveIntegerField()
    step_key = models.CharField(max_length=255)
    kind = models.CharField(max_length=10, choices=JobKind.choices, default=JobKind.COMMAND)
    name = models.CharField(max_length=500, blank=True, null=True)
    command = models.TextField()
    image = models.CharField(max_length=500, blank=True, null=True)
    env = models.JSONField(default=dict, blank=True)
    timeout_seconds = models.PositiveIntegerField()
    cache = models.JSONField(null=True, blank=True)
    runner = models.CharField(max_length=255, blank=True, null=True)
    runner_args = models.JSONField(null=True, blank=True)
    state = models.CharField(max_length=12, choices=JobState.choices, default=JobState.PENDING)
    exit_code = models.IntegerField(null=True, blank=True)
    error_code = models.CharField(max_length=40, blank=True, null=True)
    error_message = models.TextField(blank=True, null=True)
    soft_failed = models.BooleanField(default=False)
    # Set when the command was ended by a signal (exit_code is then 128 + signal).
    signal = models.PositiveSmallIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    scheduled_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Execution: who runs it, with which job-scoped credential, last sign of life.
    agent = models.ForeignKey("builds.Agent", null=True, blank=True, on_delete=models.SET_NULL,
                              related_name="jobs")
    credential_hash = models.CharField(max_length=64, unique=True, null=True, blank=True)
    # The agent's key for the claim that assigned this job: a claim (or finish report) retried
    # after its answer was lost names the same key and gets this job again, not a second one.
    claim_key = models.CharField(max_length=64, null=True, blank=True, db_index=True)
    assigned_at = models.DateTimeField(null=True, blank=True)
    last_heartbeat_at = models.DateTimeField(null=True, blank=True)
    # Bytes of log content stored so far (enforces the per-job log limit).
    log_bytes = models.BigIntegerField(default=0)
    log_truncated = models.BooleanField(default=False)
    # The files a `builds_in` child starts from, uploaded by the agent that ran this job.
    workspace_archive = models.FileField(upload_to="workspaces/", blank=True, null=True)
    # Its whole filesystem, when it ran in a container: the image its `builds_in` children start
    # from (an engine's `save` archive, uncompressed), uploaded by that agent.
    snapshot_image = models.FileField(upload_to="snapshots/", blank=True, null=True)
    # A flat `wait` without an edge per pair of jobs (N×M rows for N steps before it and M
    # after): the job belongs to `segment` when some later job waits for that segment, and
    # waits, besides its JobDependency edges, for every job of its build in `after_segment`.
    segment = models.PositiveIntegerField(null=True, blank=True)
    after_segment = models.PositiveIntegerField(null=True, blank=True)
    # Retries (builds.services.retries). A retry is a new job of the same step (same key and
    # position, the next `attempt`, `retry_of` the job it retries); the old one keeps its log
    # and is `retried`, which takes it out of the roll-up and of what its step's dependents wait for.
    attempt = models.PositiveIntegerField(default=1)
    retry_of = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    retried = models.BooleanField(default=False)
    # The step's `retry` and `soft_fail`, normalised by the planner (pipelines.ir); null: none.
    retry_policy = models.JSONField(null=True, blank=True)
    soft_fail_policy = models.JSONField(null=True, blank=True)
    # Automatic retries used so far by this step's attempts, by rule: {"<rule index>": n,
    # "agent_lost": n} (the default retry of a job whose agent was lost). Copied forward, plus one.
    automatic_retries = models.JSONField(default=dict, blank=True)
    # The effective agent selector, `{tag: value or glob}` with its queue (pipelines.agent_tags):
    # only an agent whose tags match every rule claims the job. NULL (jobs from before
    # selectors existed) means `{"queue": "default"}`.
    agents = models.JSONField(null=True, blank=True)
    # At most `concurrency` jobs of the organization in this group are live at once; the
    # claim enforces it through ConcurrencySlot rows.
    concurrency_group = models.CharField(max_length=255, null=True, blank=True)
    concurrency = models.PositiveIntegerField(null=True, blank=True)
    # Step caches (builds.services.caches): the step's cache key (pipelines.cache_keys; null: not
    # cached), and on a hit the earlier job it reuses. A job with `reused_job` is never claimed:
    # it passes once its prerequisites are met, and its `builds_in` children start from what the
    # reused job left.
    cache_key = models.CharField(max_length=64, null=True, blank=True)
    reused_job = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")

    class Meta:
        constraints = [
            # Older attempts of a step keep its key and position; only the latest is unique.
            models.UniqueConstraint(fields=["build", "position"], condition=models.Q(retried=False),
                                    name="job_position_unique"),
            models.UniqueConstraint(fields=["build", "step_key"], condition=models.Q(retried=False),
                                    name="job_key_unique"),
        ]
        indexes = [
            # Agents claim the oldest scheduled job of an organization.
            models.Index(fields=["organization", "state", "scheduled_at"], name="job_claim_queue"),
            # The reaper looks for active jobs whose agent went quiet.
            models.Index(fields=["state", "last_heartbeat_at"], name="job_by_heartbeat"),
            # How many of a concurrency group run (SQLite's claim, the build page's waiting reason).
            models.Index(fields=["organization", "concurrency_group", "state"], name="job_by_concurrency_group",
                         condition=models.Q(concurrency_group__isnull=False)),
        ]

    def __str__(self) -> str:
        return f"{self.step_key} ({self.state})"


class EdgeKind(models.TextChoices):
    BUILDS_IN = "builds_in"
    DEPENDS_ON = "depends_on"


class JobDependency(models.Model):
    """`job` may start only after `prerequisite` passed (or was skipped)."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="prerequisite_edges")
    prerequisite = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="dependent_edges")
    kind = models.CharField(max_length=10, choices=EdgeKind.choices)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["job", "prerequisite"], name="job_dependency_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.prerequisite_id} -> {self.job_id} ({self.kind})"


class StreamKind(models.IntegerChoices):
    STDOUT = 0
    STDERR = 1
    META = 2


class LogChunk(models.Model):
    """A piece of a job's output. `(job, seq)` is unique, so a re-sent chunk is stored once."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="log_chunks")
    seq = models.PositiveIntegerField()
    stream_kind = models.PositiveSmallIntegerField(choices=StreamKind.choices)
    content = models.TextField()
    # When the agent read the output, in Unix nanoseconds (the unit the live stream sends).
    ts = models.BigIntegerField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["job", "seq"], name="log_chunk_unique")]

    def __str__(self) -> str:
        return f"{self.job_id}#{self.seq}"


class Agent(models.Model):
    """One running agent process, as it registered itself."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="agents")
    token = models.ForeignKey("organizations.AgentToken", on_delete=models.CASCADE, related_name="agents")
    name = models.CharField(max_length=255)
    hostname = models.CharField(max_length=255, blank=True, default="")
    version = models.CharField(max_length=50, blank=True, default="")
    os = models.CharField(max_length=255, blank=True, default="")
    session_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(default=timezone.now)
    last_seen_at = models.DateTimeField(default=timezone.now)
    stopped_at = models.DateTimeField(null=True, blank=True)
    # `{key: value}` the agent registered with (`runagent --tags`); jobs select agents by them.
    tags = models.JSONField(default=dict, blank=True)

    class Meta:
        indexes = [models.Index(fields=["organization", "last_seen_at"], name="agent_by_org")]

    def __str__(self) -> str:
        return self.name


class ConcurrencySlot(models.Model):
    """One of the `concurrency` places of an organization's concurrency group, and the job that took it last.

    A slot is free when it has no holder or its holder has ended: holders only
    ever go from live to ended, so ending a job frees its slot without a write,
    and a claim reading an old snapshot can only think a slot taken that is free,
    never the reverse (builds.sql.assign_next_job). A job handed back to
    `scheduled` keeps its slot until it is claimed again (it may take it back).
    Created, `index` 0..n-1, with the jobs that name the group.
    """

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="+")
    group = models.CharField(max_length=255)
    index = models.PositiveIntegerField()
    holder = models.ForeignKey(Job, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["organization", "group", "index"], name="concurrency_slot_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.group}[{self.index}]"


def artifact_upload_path(artifact: "Artifact", filename: str) -> str:
    # Keyed by ids, never by the job's own path: a path is user data and may hold anything.
    return f"artifacts/{artifact.build_id}/{artifact.id}"


class Artifact(models.Model):
    """A file a job left under `$HARMONT_ARTIFACTS`, uploaded by its agent when the command ended."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    build = models.ForeignKey(Build, on_delete=models.CASCADE, related_name="artifacts")
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="artifacts")
    # Relative to the artifacts directory, `/`-separated.
    path = models.CharField(max_length=1000)
    size = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    mime_type = models.CharField(max_length=255)
    file = models.FileField(upload_to=artifact_upload_path, max_length=500)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["job", "path"], name="artifact_path_unique")]
        indexes = [
            # The build's artifact list, keyset-paginated by (created_at, id).
            models.Index(fields=["build", "created_at", "id"], name="artifact_by_build"),
        ]

    def __str__(self) -> str:
        return self.path


class CacheEntry(models.Model):
    """A passed job a later build's step with the same cache key may reuse instead of running.

    Scoped like GitHub Actions' caches: a build reads the entries of its own
    branch and of its pipeline's default branch, written by builds with the
    same secret access (a snapshot may hold what a secret let the step fetch).
    Fork builds neither read nor write them. `size_bytes` (the job's snapshot
    and workspace) counts against HARMONT_CACHE_MAX_BYTES per organization;
    the least recently used entries go first.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="+")
    pipeline = models.ForeignKey(Pipeline, on_delete=models.CASCADE, related_name="cache_entries")
    step_key = models.CharField(max_length=255)
    key = models.CharField(max_length=64)
    branch = models.CharField(max_length=255)
    secret_access = models.CharField(max_length=12, choices=SecretAccess.choices)
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="cache_entries")
    size_bytes = models.BigIntegerField(default=0)
    hits = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name_plural = "cache entries"
        constraints = [
            # One entry per key and scope: a second job that passed with the key replaces it.
            models.UniqueConstraint(fields=["pipeline", "key", "branch", "secret_access"], name="cache_entry_unique"),
        ]
        indexes = [
            # The admins' list, keyset-paged newest first, and eviction, least recently used first.
            models.Index(fields=["organization", "-created_at", "-id"], name="cache_entry_by_org"),
            models.Index(fields=["pipeline", "-created_at", "-id"], name="cache_entry_by_pipeline"),
            models.Index(fields=["organization", "last_used_at", "id"], name="cache_entry_lru"),
        ]

    def __str__(self) -> str:
        return f"{self.step_key} {self.key[:12]} ({self.branch})"


class DeliveryStatus(models.TextChoices):
    # Verified and recorded; a task will act on it (and is re-enqueued if it got lost).
    QUEUED = "queued"
    PROCESSED = "processed"
    # Every attempt failed (HARMONT_WEBHOOK_MAX_ATTEMPTS): `last_error` says why.
    FAILED = "failed"


class WebhookDelivery(models.Model):
    """A verified webhook delivery for one repository: recorded once, so that a redelivery creates nothing new.

    The request that brought it only records it; a task acts on it (builds what it
    triggers) and keeps what that did in `result`.
    """

    repository = models.ForeignKey("pipelines.Repository", on_delete=models.CASCADE, related_name="deliveries")
    delivery_id = models.CharField(max_length=100)
    event = models.CharField(max_length=50)
    received_at = models.DateTimeField(default=timezone.now)
    # The verified payload, kept until the delivery is processed (and for the admin after).
    payload = models.JSONField(null=True, blank=True)
    status = models.CharField(max_length=10, choices=DeliveryStatus.choices, default=DeliveryStatus.PROCESSED)
    attempts = models.PositiveSmallIntegerField(default=0)
    # When the task was last handed to the queue, and the earliest time the sweep hands it over again.
    enqueued_at = models.DateTimeField(null=True, blank=True)
    retry_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")
    processed_at = models.DateTimeField(null=True, blank=True)
    builds_created = models.PositiveIntegerField(default=0)
    # What processing did: the builds (pipeline, number), the refused and the skipped pipelines.
    result = models.JSONField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "webhook deliveries"
        constraints = [
            models.UniqueConstraint(fields=["repository", "delivery_id"], name="webhook_delivery_unique"),
        ]
        indexes = [
            # The reaper's sweep for deliveries whose task got lost or failed.
            models.Index(fields=["status", "retry_at"], name="webhook_delivery_queue"),
        ]

    def __str__(self) -> str:
        return f"{self.event} {self.delivery_id}"


class WebhookEvent(models.TextChoices):
    """What an organization's webhook endpoints may subscribe to."""

    BUILD_CREATED = "build.created"
    BUILD_STARTED = "build.started"
    BUILD_FINISHED = "build.finished"
    JOB_FINISHED = "job.finished"


class WebhookEndpoint(models.Model):
    """A URL of an organization's that is told about its builds (Standard Webhooks: signed with `secret`)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="webhook_endpoints")
    url = models.CharField(max_length=2000)
    events = models.JSONField(default=list)
    description = models.CharField(max_length=255, blank=True, default="")
    # `whsec_` + base64: what the receiver verifies signatures with. Encrypted (harmont.crypto):
    # the server signs with it, so it can't be a hash; shown once, when the endpoint is made.
    secret_encrypted = models.TextField()
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [
            # Every build and job event reads its organization's endpoints; the list pages them oldest first.
            models.Index(fields=["organization", "created_at", "id"], name="webhook_endpoint_by_org"),
        ]

    def __str__(self) -> str:
        return self.url


class NotificationChannel(models.TextChoices):
    COMMIT_STATUS = "commit_status"
    WEBHOOK = "webhook"


class NotificationStatus(models.TextChoices):
    QUEUED = "queued"
    DELIVERED = "delivered"
    # A commit status a newer one of the same build replaced before it was posted.
    SUPERSEDED = "superseded"
    # Out of attempts (or of something to post to): `last_error` says why.
    FAILED = "failed"


class Notification(models.Model):
    """One message to the outside world about a build: a commit status on GitHub, or an outbound webhook event.

    Written in the transaction that changes the build or job, so none is lost
    with a process that dies after the commit; posted by tasks
    (builds.services.notifications), in order within its `lane` (one build's
    messages to one receiver), at least once, retried with backoff.
    """

    message_id = models.CharField(max_length=40, unique=True)  # the webhook-id: stable across retries
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="+")
    build = models.ForeignKey(Build, on_delete=models.CASCADE, related_name="notifications")
    job = models.ForeignKey(Job, null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    channel = models.CharField(max_length=16, choices=NotificationChannel.choices)
    endpoint = models.ForeignKey(WebhookEndpoint, null=True, blank=True, on_delete=models.CASCADE,
                                 related_name="notifications")
    repository = models.ForeignKey("pipelines.Repository", null=True, blank=True, on_delete=models.CASCADE,
                                   related_name="+")
    # `<channel>:<receiver>:<build>`: messages of one lane go out one at a time, oldest first.
    lane = models.CharField(max_length=120)
    event = models.CharField(max_length=20)
    payload = models.JSONField()
    status = models.CharField(max_length=10, choices=NotificationStatus.choices, default=NotificationStatus.QUEUED)
    attempts = models.PositiveSmallIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    # The earliest next attempt (backoff); null while it waits for something else (a commit
    # status waits for the commit a HEAD build checks out).
    due_at = models.DateTimeField(null=True, blank=True)
    # A task sending it holds it until then: the claim is a compare-and-set on this, not a row
    # lock, since an attempt waits on the network (up to its timeout) and SQLite has one writer.
    claimed_until = models.DateTimeField(null=True, blank=True)
    # When the reaper's sweep hands its lane to the queue again, in case the task meant to
    # send it was lost (a worker died, an enqueue died with its process).
    sweep_at = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")

    class Meta:
        indexes = [
            models.Index(fields=["lane", "id"], condition=models.Q(status="queued"), name="notification_lane"),
            models.Index(fields=["sweep_at"], condition=models.Q(status="queued"), name="notification_sweep"),
            # An endpoint's deliveries, newest first (keyset on id).
            models.Index(fields=["endpoint", "-id"], name="notification_by_endpoint"),
            models.Index(fields=["build", "channel"], name="notification_by_build"),
            # The webhooks page counts each endpoint's queued and failed messages.
            models.Index(fields=["endpoint", "status"], condition=models.Q(status__in=["queued", "failed"]),
                         name="notification_endpoint_open"),
        ]

    def __str__(self) -> str:
        return f"{self.channel} {self.event} {self.message_id}"


class NotificationAttempt(models.Model):
    """One try at posting a notification: what the receiver answered, or why nothing came back."""

    notification = models.ForeignKey(Notification, on_delete=models.CASCADE, related_name="attempts_made")
    at = models.DateTimeField(default=timezone.now)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    response_excerpt = models.TextField(blank=True, default="")
    error = models.CharField(max_length=500, blank=True, default="")
    duration_ms = models.PositiveIntegerField(default=0)

    class Meta:
        indexes = [models.Index(fields=["notification", "at"], name="notification_attempt_order")]

    def __str__(self) -> str:
        return f"{self.status_code or self.error} at {self.at}"


class TestReportStatus(models.TextChoices):
    PARSED = "parsed"
    # Over the size limit (builds.services.test_results): not read.
    TOO_LARGE = "too_large"
    # Not well-formed XML, or no JUnit report (`error` says which).
    MALFORMED = "malformed"
    # Declares a DTD or entities (an entity-expansion bomb, an external entity): refused unread.
    UNSAFE = "unsafe"


class TestReport(models.Model):
    """One JUnit XML artifact of a job, as parsed (builds.services.test_results).

    One row per artifact: a parse that runs again replaces the row's counts and
    failures, never adds a second. The counts are the file's; a job's are the
    sums over its reports.
    """

    __test__ = False  # not a test class, whatever pytest thinks of the name

    artifact = models.OneToOneField(Artifact, on_delete=models.CASCADE, related_name="test_report")
    build = models.ForeignKey(Build, on_delete=models.CASCADE, related_name="test_reports")
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="test_reports")
    status = models.CharField(max_length=10, choices=TestReportStatus.choices)
    # Why a file that is not `parsed` was not (shown on the build page and in the API).
    error = models.CharField(max_length=500, blank=True, default="")
    tests = models.PositiveIntegerField(default=0)
    failures = models.PositiveIntegerField(default=0)
    errors = models.PositiveIntegerField(default=0)
    skipped = models.PositiveIntegerField(default=0)
    # Fewer than failures + errors once the job's cap on stored failures was reached.
    failures_stored = models.PositiveIntegerField(default=0)
    parsed_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [models.Index(fields=["build", "job"], name="test_report_by_build")]

    def __str__(self) -> str:
        return f"{self.artifact_id} ({self.status})"


class TestFailureKind(models.TextChoices):
    FAILURE = "failure"  # an assertion did not hold
    ERROR = "error"  # the test could not run to its assertions (an exception, a fixture's error)


class TestFailure(models.Model):
    """A test case that failed or errored in a report; passing cases are not stored (see the service)."""

    __test__ = False

    id = models.BigAutoField(primary_key=True)
    report = models.ForeignKey(TestReport, on_delete=models.CASCADE, related_name="failed_cases")
    build = models.ForeignKey(Build, on_delete=models.CASCADE, related_name="test_failures")
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="test_failures")
    suite = models.CharField(max_length=500, blank=True, default="")
    classname = models.CharField(max_length=500, blank=True, default="")
    name = models.CharField(max_length=500)
    # sha256 of (classname or suite, name), cut to 32 hex digits: the same test across jobs and builds.
    identity = models.CharField(max_length=32)
    kind = models.CharField(max_length=8, choices=TestFailureKind.choices)
    message = models.TextField(blank=True, default="")
    details = models.TextField(blank=True, default="")
    duration = models.FloatField(null=True, blank=True)  # seconds
    # A later job of the same step on the same commit passed it (a retry, a rebuild).
    flaky = models.BooleanField(default=False)

    class Meta:
        indexes = [
            # The build's failures, keyset-paged by id (the API, the build page); the pipeline
            # page aggregates those of its last builds.
            models.Index(fields=["build", "id"], name="test_failure_by_build"),
        ]

    def __str__(self) -> str:
        return f"{self.classname or self.suite}::{self.name}"
