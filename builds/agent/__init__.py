"""The agent program: claims jobs from a Harmont server over HTTP and runs them.

It imports nothing from the server (no Django, no database), so it runs on any
machine that has this project's code and can reach the server's URL.

One job at a time:
  claim → fetch source / parent workspace → start (held back for a moment: a quick job
  reports it with its finish, see starts.py) → run the command through the
  agent's executor (`bash -c cmd` in its own process group on the host, or a fresh
  podman/docker container of the step's image; see executors/), shipping output as
  numbered chunks every 500 ms and heartbeating → upload the workspace (and, from a
  container, the filesystem snapshot) if a `builds_in` child needs it → finish.
A busy agent's finish also claims its next job (`claim_next`), one request less per job.

Every request is retried with backoff on network errors and 5xx answers. Log
chunks carry a per-job sequence number and the server stores each (job, seq)
once, so a retried batch never duplicates or loses output.
"""


from builds.agent.runner import main

__all__ = ["main"]
