"""The Node.js client (client/node, @grpc/grpc-js + @grpc/proto-loader) against a live server."""
import os
import shutil
import subprocess

import pytest

from conftest import ROOT

NODE_DIR = ROOT / "client" / "node"


def test_node_client_streams_generate_and_reads_status(server):
    if shutil.which("node") is None or not (NODE_DIR / "node_modules").is_dir():
        if os.environ.get("CI"):
            pytest.fail("CI must run the Node client test: make test installs client/node's packages")
        pytest.skip("node or client/node/node_modules missing (run: cd client/node && npm install)")
    result = subprocess.run(["node", "--test", "test/"], cwd=NODE_DIR, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HJCG_TARGET": server.tcp})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "# pass 2" in result.stdout and "# skipped 0" in result.stdout
