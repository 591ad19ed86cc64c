"""Generates the Python protobuf and gRPC modules from proto/ into engine/gen/.

protoc writes absolute imports (``from txengine.v1 import ledger_pb2``); they are rewritten to
``engine.gen.txengine.v1`` so that the generated package lives inside the engine package.
"""
import pathlib
import re
import shutil
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "engine" / "gen"
IMPORT_RE = re.compile(r"^from txengine\.v1 import ", re.MULTILINE)


def main() -> int:
    shutil.rmtree(OUT_DIR, ignore_errors=True)
    OUT_DIR.mkdir(parents=True)
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    code = protoc.main([
        "grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{include}",
        f"--python_out={OUT_DIR}", f"--pyi_out={OUT_DIR}", f"--grpc_python_out={OUT_DIR}",
        *protos,
    ])
    if code != 0:
        return code
    for package in [OUT_DIR, *(p for p in OUT_DIR.rglob("*") if p.is_dir())]:
        (package / "__init__.py").touch()
    for module in OUT_DIR.rglob("*.py*"):
        text = module.read_text()
        module.write_text(IMPORT_RE.sub("from engine.gen.txengine.v1 import ", text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
