"""Command-line arguments shared by the Python tests (paths of the binaries they drive)."""
import os
import sys


def take_arg(flag, env):
    """Removes `flag VALUE` from sys.argv (so unittest does not see it) and returns VALUE, else $env."""
    if flag in sys.argv:
        i = sys.argv.index(flag)
        value = sys.argv[i + 1]
        del sys.argv[i:i + 2]
        return value
    return os.environ.get(env)
