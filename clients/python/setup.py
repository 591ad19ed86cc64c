"""Generates txengine_client._gen from the repository's proto/ whenever the package is built.

protoc writes absolute imports (``from txengine.v1 import ledger_pb2``); they are rewritten to
``txengine_client._gen.txengine.v1`` so the SDK carries its own copy of the generated modules and
never imports the engine. The files land in the source tree (git-ignored) before setup() runs,
because setuptools checks that the listed packages exist while it prepares metadata; regular
and editable installs therefore behave the same. An sdist carries a copy of proto/ so that it
builds outside the repository too. All project metadata lives in pyproject.toml.
"""
import pathlib
import re
import shutil

from setuptools import setup
from setuptools.command.sdist import sdist

HERE = pathlib.Path(__file__).resolve().parent
# The repository's proto/ first; an sdist's own copy second.
PROTO_DIRS = (HERE.parent.parent / "proto", HERE / "proto")
GEN_DIR = HERE / "src" / "txengine_client" / "_gen"
IMPORT_RE = re.compile(r"^from txengine\.v1 import ", re.MULTILINE)


def proto_dir() -> pathlib.Path:
    for candidate in PROTO_DIRS:
        if (candidate / "txengine" / "v1").is_dir():
            return candidate
    raise RuntimeError(f"no txengine proto files in any of {[str(p) for p in PROTO_DIRS]}")


def generate() -> None:
    from grpc_tools import protoc  # a build requirement (pyproject.toml)

    source = proto_dir()
    shutil.rmtree(GEN_DIR, ignore_errors=True)
    GEN_DIR.mkdir(parents=True)
    protos = sorted(str(p.relative_to(source)) for p in source.rglob("*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    code = protoc.main([
        "grpc_tools.protoc", f"-I{source}", f"-I{include}",
        f"--python_out={GEN_DIR}", f"--pyi_out={GEN_DIR}", f"--grpc_python_out={GEN_DIR}",
        *protos,
    ])
    if code != 0:
        raise RuntimeError(f"protoc failed with exit status {code}")
    for package in [GEN_DIR, *(p for p in GEN_DIR.rglob("*") if p.is_dir())]:
        (package / "__init__.py").touch()
    for module in GEN_DIR.rglob("*.py*"):
        text = module.read_text()
        module.write_text(IMPORT_RE.sub("from txengine_client._gen.txengine.v1 import ", text))


class SdistWithProto(sdist):
    def make_release_tree(self, base_dir, files) -> None:
        super().make_release_tree(base_dir, files)
        shutil.copytree(proto_dir(), pathlib.Path(base_dir) / "proto", dirs_exist_ok=True)


generate()
setup(cmdclass={"sdist": SdistWithProto})
