#!/usr/bin/env python
"""Django's command-line utility for the Harmont server."""
import os
import sys


def main() -> None:
    if sys.argv[1:2] == ["runagent"]:
        # The agent talks to the server only over HTTP: it needs none of the
        # server's settings or secrets, so it starts without Django.
        from builds.agent import main as run_agent

        sys.exit(run_agent(sys.argv[2:]))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "harmont.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
