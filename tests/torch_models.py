"""torchvision's model code for the conversion tests.

The torchvision wheel on PyPI is built against CUDA torch; beside the CPU torch of
requirements-bench.txt its C extension (detection ops) cannot load, and the package's
`__init__` fails registering those ops. The classification models are plain Python, so the
package is entered without its `__init__`: `torchvision.models` is imported as is.
"""

from __future__ import annotations

import importlib.util
import sys
import types


def torchvision_models():
    if "torchvision" not in sys.modules:
        try:
            import torchvision  # noqa: F401 - the whole package when its extension loads
        except (RuntimeError, OSError, ImportError):
            for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
                del sys.modules[name]
            spec = importlib.util.find_spec("torchvision")
            package = types.ModuleType("torchvision")
            package.__path__ = list(spec.submodule_search_locations)
            package.__spec__ = spec
            package.__file__ = spec.origin
            sys.modules["torchvision"] = package
    import torchvision.models as models

    return models
