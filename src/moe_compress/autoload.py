"""The start-up hook: plain transformers and lm-eval load compressed folders, with no import in user code.

The package installs `moe_compress.pth` (an import line, run by `site` at every Python start) and its PEP 829 twin
`moe_compress.start` (an entry point, `moe_compress.autoload:install`, which Pythons from 3.15 on run instead of the
import line). Both call `install()`, which must cost next to nothing at start-up: it imports neither torch nor
transformers. It puts a finder on sys.meta_path that waits for transformers to import the two modules we extend and,
right after each has run, imports the module of ours that registers with it:

    transformers.models.auto.configuration_auto  ->  moe_compress.folder.config   (the `moe_compress` model type)
    transformers.quantizers                       ->  moe_compress.folder.quantizer  (the `moe_compress` quantizer)

Both are imported before any folder is read: lm-eval, for one, parses quantization configs before it loads a model,
so registering later (on transformers.modeling_utils, say) would be too late.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import warnings
from types import ModuleType

WATCHED = {
    "transformers.models.auto.configuration_auto": "moe_compress.folder.config",
    "transformers.quantizers": "moe_compress.folder.quantizer",
}


def _register(ours: str) -> None:
    # A failure here must not break the user's program, which may not even be loading a compressed model; the
    # folder's own model type still stops a load that would otherwise be wrong
    try:
        importlib.import_module(ours)
    except Exception as error:  # noqa: BLE001
        warnings.warn(f"moe-compress could not register with transformers ({type(error).__name__}: {error}); "
                      "compressed folders will not load in this process", RuntimeWarning, stacklevel=2)


class _RegisterAfterImport:
    """A meta path finder (not derived from importlib.abc, whose import costs every Python start ~10 ms) that finds
    nothing itself: for a watched module it asks the path finder, then wraps the loader's exec_module so that our
    registration runs once the module has executed."""

    def find_spec(self, fullname: str, path, target: ModuleType | None = None):
        if fullname not in WATCHED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        exec_module = spec.loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            exec_module(module)
            _register(WATCHED[fullname])

        spec.loader.exec_module = exec_then_register  # this loader instance serves this one module
        return spec


def install() -> None:
    """Register now with what transformers has already imported, and on import for the rest. Idempotent."""
    if any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        return
    for theirs, ours in WATCHED.items():
        if theirs in sys.modules:
            _register(ours)
    sys.meta_path.insert(0, _RegisterAfterImport())
