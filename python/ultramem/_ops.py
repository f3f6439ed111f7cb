"""Finding and loading the op library (libultramem_ops.so), which registers torch.ops.ultramem.*.

Searched in this order: $ULTRAMEM_OPS_LIB; next to this package (a wheel built after the C++ build
carries it); the build folders of the checkout the package sits in (build/release, then build/debug).
The library must come from the same libtorch as the `torch` imported here (Debian's python3-torch with
libtorch-dev); the C++ build prints its location.
"""
import os

import torch

_NAME = "libultramem_ops.so"
_loaded = None


class OpsLibraryError(ImportError):
    """The op library could not be found or loaded; the message says where it looked and why."""


def candidates():
    """The paths looked at, in order."""
    here = os.path.dirname(os.path.abspath(__file__))
    out = []
    env = os.environ.get("ULTRAMEM_OPS_LIB")
    if env:
        out.append(env)
    out.append(os.path.join(here, _NAME))
    root = os.path.dirname(os.path.dirname(here))  # python/ultramem -> the checkout
    for preset in ("release", "debug"):
        out.append(os.path.join(root, "build", preset, _NAME))
    return out


def library_path():
    """The op library's path, or None when it is not loaded yet."""
    return _loaded


def load():
    """Loads the op library once; raises OpsLibraryError naming the paths tried."""
    global _loaded
    if _loaded is not None:
        return _loaded
    tried = []
    env = os.environ.get("ULTRAMEM_OPS_LIB")
    for path in candidates():
        if not os.path.isfile(path):
            tried.append("%s (missing)" % path)
            if env and path == env:
                raise OpsLibraryError("ULTRAMEM_OPS_LIB=%s: no such file" % env)
            continue
        try:
            torch.ops.load_library(path)
        except (OSError, RuntimeError) as e:
            raise OpsLibraryError("cannot load the op library %s: %s (build it with the same libtorch as this "
                                  "torch %s)" % (path, e, torch.__version__)) from None
        _loaded = path
        return path
    raise OpsLibraryError("the op library %s was not found; build it (cmake --preset release && cmake --build "
                          "--preset release) or set ULTRAMEM_OPS_LIB. Tried: %s" % (_NAME, "; ".join(tried)))


def ops():
    """torch.ops.ultramem, the library loaded."""
    load()
    return torch.ops.ultramem
