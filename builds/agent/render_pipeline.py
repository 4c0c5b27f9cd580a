"""Render one pipeline from a checkout's `.hm/*.py` with the `harmont` package.

The agent runs this file as its own process, in the job's workspace:

    python -I render_pipeline.py SOURCE_SLUG OUTPUT_PATH [ENVELOPE_PATH]

`-I` keeps the agent's own directories off `sys.path`, so `import harmont` is
the pipeline package from PyPI (this project's package has the same name).
Whatever the pipeline files print goes to the job's log; the IR is written to
OUTPUT_PATH, and with ENVELOPE_PATH the whole envelope (every pipeline of the
files, what `harmont.dump_registry_json()` prints) there. Exit status 0 means
OUTPUT_PATH holds the named pipeline's IR.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4):
        print("usage: render_pipeline.py SOURCE_SLUG OUTPUT_PATH [ENVELOPE_PATH]", file=sys.stderr)
        return 2
    slug, output = argv[1], Path(argv[2])
    envelope_output = Path(argv[3]) if len(argv) == 4 else None
    files = sorted(Path(".hm").glob("*.py"))
    if not files:
        print("harmont render: the repository has no .hm/*.py files", file=sys.stderr)
        return 3
    import harmont  # the PyPI package; imported here so a missing install is reported as a render failure

    # Pipeline files may import helpers that live next to them or at the repository root.
    sys.path[:0] = [str(Path(".hm").resolve()), str(Path.cwd())]
    for path in files:
        print(f"harmont render: loading {path}")
        runpy.run_path(str(path), run_name=f"hm_{path.stem}")
    envelope = json.loads(harmont.dump_registry_json())
    found = [entry for entry in envelope.get("pipelines", []) if entry.get("slug") == slug]
    if not found:
        names = ", ".join(sorted(entry.get("slug", "?") for entry in envelope.get("pipelines", []))) or "none"
        print(f"harmont render: no pipeline {slug!r} in .hm/*.py (found: {names})", file=sys.stderr)
        return 4
    output.write_text(json.dumps(found[0]["definition"]))
    if envelope_output is not None:
        envelope_output.write_text(json.dumps(envelope))
    print(f"harmont render: rendered pipeline {slug!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
