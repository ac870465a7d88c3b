"""Generate the Python messages, stubs and .pyi files from protos/.

One command, pinned tools (grpcio-tools and mypy-protobuf from the `dev`
extra). `--check` regenerates into a temporary folder and fails when the
committed code differs, so CI catches stale generated code.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "client"
GENERATED = Path("queueservice") / "v1"


def generate(out: Path) -> None:
    protos = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / GENERATED).glob("*.proto"))
    wkt = Path(protoc.__file__).parent / "_proto"
    # mypy-protobuf's plugins sit beside this interpreter, whether or not its bin/ is on PATH.
    plugins = Path(sys.executable).parent
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={plugins / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={plugins / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTOS}",
        f"-I{wkt}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def generated_files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in (root / GENERATED).glob("*_pb2*.py*")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    check = parser.parse_args().check
    if not check:
        for old in generated_files(OUT):
            (OUT / old).unlink()
        generate(OUT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        want, have = generated_files(fresh), generated_files(OUT)
        stale = sorted(
            str(p)
            for p in want | have
            if p not in want or p not in have or not filecmp.cmp(fresh / p, OUT / p, shallow=False)
        )
    if stale:
        print("generated code is stale; run `make protos`:", *stale, sep="\n  ", file=sys.stderr)
        return 1
    print("generated code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
