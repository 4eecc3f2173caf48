"""The committed Python stubs match proto/ (regenerated with the pinned grpcio-tools)."""
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT


def test_committed_stubs_are_up_to_date(tmp_path: Path):
    tools = pytest.importorskip("grpc_tools")
    from importlib.metadata import version

    if version("grpcio-tools") != "1.84.0":
        pytest.skip("stubs are generated with grpcio-tools 1.84.0")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                    str(ROOT / "proto/hjcg/v1/hjcg.proto")], check=True)
    for name in ("hjcg_pb2.py", "hjcg_pb2.pyi", "hjcg_pb2_grpc.py"):
        assert (tmp_path / "hjcg/v1" / name).read_text() == (ROOT / "hjcg/v1" / name).read_text(), name
