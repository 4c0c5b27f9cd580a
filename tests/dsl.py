"""The `harmont` pipeline DSL from PyPI, importable beside our own `harmont` package.

Our Django project package is also called `harmont` and the project root is
first on sys.path, so `import harmont` finds the project. The DSL only uses
relative imports internally, except `harmont.py.uv`, which imports
`harmont._toolchain` absolutely; while it loads, `harmont` briefly names the DSL
so that import resolves (the DSL submodules it pulls in have names our project
never uses), then it names the project again.
"""

from __future__ import annotations

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
