"""The `harmont` pipeline DSL from PyPI, importable beside our own `harmont` package.

Our Django project package is also called `harmont` and the project root is
first on sys.path, so `import harmont` finds the project. The DSL only uses
relative imports internally, except `harmont.py.uv`, which imports
`harmont._toolchain` absolutely; while it loads, `harmont` briefly names the DSL
so that import resolves (the DSL submodules it pulls in have names our project
never uses), then it names the project again.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def _load() -> ModuleType:
    if "harmont_dsl" in sys.modules:
        return sys.modules["harmont_dsl"]
    dist = importlib.metadata.distribution("harmont")
    init = Path(str(dist.locate_file("harmont/__init__.py")))
    spec = importlib.util.spec_from_file_location("harmont_dsl", init, submodule_search_locations=[str(init.parent)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["harmont_dsl"] = module
    project = sys.modules.get("harmont")
    sys.modules["harmont"] = module
    try:
        spec.loader.exec_module(module)
    finally:
        if project is not None:
            sys.modules["harmont"] = project
        else:
            del sys.modules["harmont"]
    return module


hm = _load()


def render_with_keys(ir: dict, *, base_path: Path, org: str = "acme", slug: str = "ci", now: int = 1_700_000_000,
                     env: dict | None = None) -> dict:
    """`ir` with the cache keys the package adds when it renders (`dump_registry_json` does this in the checkout).

    `on_change` paths are hashed under `base_path`.
    """
    keygen = importlib.import_module("harmont_dsl.keygen")
    keygen.resolve_pipeline_keys(ir.get("graph", {}), pipeline_org=org, pipeline_slug=slug, now=now,
                                 base_path=base_path, env=env or {})
    return ir
