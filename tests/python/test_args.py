"""Command-line arguments shared by the Python tests (paths of the binaries they drive). Importing it also
puts the checkout's Python package (python/ultramem) first on sys.path."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "python"))


def take_arg(flag, env):
    """Removes `flag VALUE` from sys.argv (so unittest does not see it) and returns VALUE, else $env."""
    if flag in sys.argv:
        i = sys.argv.index(flag)
        value = sys.argv[i + 1]
        del sys.argv[i:i + 2]
        return value
    return os.environ.get(env)
