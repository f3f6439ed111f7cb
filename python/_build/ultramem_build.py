"""A PEP 517 build backend for the ultramem package, standard library only, so that
`pip install ./python` needs no network (pip's isolated build cannot download setuptools here).

It writes a wheel of python/ultramem/*.py plus, when it finds one, the op library libultramem_ops.so:
$ULTRAMEM_OPS_LIB, else ../build/release/libultramem_ops.so of the checkout. With the library the wheel
is tagged for this platform, without it it is pure Python (set ULTRAMEM_OPS_LIB at run time then).
"""
import base64
import csv
import hashlib
import io
import os
import sysconfig
import zipfile

NAME, VERSION = "ultramem", "0.2.0"
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # python/
PACKAGE = os.path.join(HERE, NAME)
LIB = "libultramem_ops.so"

METADATA = """Metadata-Version: 2.1
Name: {name}
Version: {version}
Summary: UltraMem ultra-sparse memory layers for PyTorch, over the ultramem C++ op library
Requires-Python: >=3.9
License: Apache-2.0

Layers (UltraMem, PKM), the language model, checkpoints and export folders; see docs/python.md.
The op library must come from the same libtorch as the torch it runs with.
"""


def _op_library():
    env = os.environ.get("ULTRAMEM_OPS_LIB")
    if env:
        if not os.path.isfile(env):
            raise FileNotFoundError("ULTRAMEM_OPS_LIB=%s: no such file" % env)
        return env
    path = os.path.join(os.path.dirname(HERE), "build", "release", LIB)
    return path if os.path.isfile(path) else None


def _files():
    out = []
    for name in sorted(os.listdir(PACKAGE)):
        if name.endswith(".py"):
            out.append((os.path.join(PACKAGE, name), "%s/%s" % (NAME, name)))
    lib = _op_library()
    if lib:
        out.append((lib, "%s/%s" % (NAME, LIB)))
    return out, lib is not None


def _tag(platform_specific):
    if not platform_specific:
        return "py3-none-any"
    plat = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    return "py3-none-%s" % plat


def _record_line(arcname, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return [arcname, "sha256=" + digest, str(len(data))]


def _dist_info(tag, purelib):
    di = "%s-%s.dist-info" % (NAME, VERSION)
    wheel = "Wheel-Version: 1.0\nGenerator: ultramem_build\nRoot-Is-Purelib: %s\nTag: %s\n" % (
        "true" if purelib else "false", tag)
    return di, {"METADATA": METADATA.format(name=NAME, version=VERSION), "WHEEL": wheel, "top_level.txt": NAME + "\n"}


def get_requires_for_build_wheel(config_settings=None):
    return []


def get_requires_for_build_sdist(config_settings=None):
    return []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    _, platform_specific = _files()
    di, files = _dist_info(_tag(platform_specific), not platform_specific)
    os.makedirs(os.path.join(metadata_directory, di), exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(metadata_directory, di, name), "w") as f:
            f.write(text)
    return di


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    files, platform_specific = _files()
    tag = _tag(platform_specific)
    di, meta = _dist_info(tag, not platform_specific)
    wheel_name = "%s-%s-%s.whl" % (NAME, VERSION, tag)
    records = []
    with zipfile.ZipFile(os.path.join(wheel_directory, wheel_name), "w", zipfile.ZIP_DEFLATED) as z:
        for src, arc in files:
            with open(src, "rb") as f:
                data = f.read()
            info = zipfile.ZipInfo(arc, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = (0o755 if arc.endswith(".so") else 0o644) << 16
            z.writestr(info, data, zipfile.ZIP_DEFLATED)
            records.append(_record_line(arc, data))
        for name, text in meta.items():
            arc = "%s/%s" % (di, name)
            z.writestr(arc, text)
            records.append(_record_line(arc, text.encode()))
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerows(records + [["%s/RECORD" % di, "", ""]])
        z.writestr("%s/RECORD" % di, buf.getvalue())
    return wheel_name


def build_sdist(sdist_directory, config_settings=None):
    import tarfile
    base = "%s-%s" % (NAME, VERSION)
    name = base + ".tar.gz"
    with tarfile.open(os.path.join(sdist_directory, name), "w:gz") as t:
        for rel in ("pyproject.toml", "_build/ultramem_build.py"):
            t.add(os.path.join(HERE, rel), arcname="%s/%s" % (base, rel))
        for fname in sorted(os.listdir(PACKAGE)):
            if fname.endswith(".py"):
                t.add(os.path.join(PACKAGE, fname), arcname="%s/%s/%s" % (base, NAME, fname))
        pkg_info = METADATA.format(name=NAME, version=VERSION)
        data = pkg_info.encode()
        info = tarfile.TarInfo("%s/PKG-INFO" % base)
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    return name
