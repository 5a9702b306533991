"""Builds the SDK with its generated code: `imagegen/v1` (protobuf messages, their .pyi stubs
and the gRPC stubs) is made at build time from the repository's protos/ with grpc_tools.protoc,
into the build, never into the source tree (where `make proto` keeps the developers' copy).

`pip install ./sdk` from a checkout builds in place and finds ../protos; an sdist carries a copy
of them (sdk/protos).
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
PROTO_ROOTS = (HERE / "protos", HERE.parent / "protos")


def proto_root() -> Path:
    for root in PROTO_ROOTS:
        if list((root / "imagegen" / "v1").glob("*.proto")):
            return root
    tried = ", ".join(str(r / "imagegen" / "v1") for r in PROTO_ROOTS)
    raise SystemExit(
        "imagegen SDK build: no .proto files found (looked in "
        f"{tried}). Build it from the imagegen repository (pip install ./sdk) "
        "or from an sdist made there."
    )


def generate(out: Path) -> None:
    from grpc_tools import protoc

    root = proto_root()
    sources = sorted(str(p) for p in (root / "imagegen" / "v1").glob("*.proto"))
    well_known = resources.files("grpc_tools") / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{root}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *sources,
        ]
    )
    if code != 0:
        raise SystemExit(f"imagegen SDK build: protoc failed ({code}) on {root}")
    (out / "imagegen" / "v1" / "__init__.py").touch()


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib)
        shutil.rmtree(target / "imagegen" / "v1", ignore_errors=True)
        generate(target)


class Sdist(sdist):
    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        shutil.copytree(proto_root(), Path(base_dir) / "protos", dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPy, "sdist": Sdist})
