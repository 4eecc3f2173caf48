"""proto/: buf's lint passes, and every language's code generator gets the package it expects."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from conftest import ROOT

PROTO = ROOT / "proto"
BUF = PROTO / "node_modules" / ".bin" / "buf"


def _descriptor(tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    out = tmp_path / "hjcg.pb"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO}", f"--descriptor_set_out={out}",
                    str(PROTO / "hjcg/v1/hjcg.proto")], check=True)
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return files[0]


def test_buf_lint_passes():
    if not BUF.exists():
        if os.environ.get("CI"):
            pytest.fail("CI must run buf lint: make test installs proto/'s packages (npm ci)")
        pytest.skip("proto/node_modules missing (run: make node-deps, or cd proto && npm ci)")
    result = subprocess.run([str(BUF), "lint"], cwd=PROTO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_language_option_is_set(tmp_path):
    options = _descriptor(tmp_path).options
    assert options.go_package == "hjcg/gen/go/hjcg/v1;hjcgv1"
    assert options.java_package == "com.hjcg.v1" and options.java_multiple_files
    assert options.java_outer_classname == "HjcgProto"
    assert options.csharp_namespace == "Hjcg.V1"
    assert options.php_namespace == "Hjcg\\V1" and options.php_metadata_namespace == "Hjcg\\V1\\GPBMetadata"
    assert options.ruby_package == "Hjcg::V1"
    assert options.objc_class_prefix == "HJCG" and options.swift_prefix == "Hjcg_V1_"


def test_protoc_generators_use_the_options(tmp_path):
    """protoc's own generators (Java, C#, PHP, Ruby, Objective-C): where a full protoc is installed."""
    protoc = shutil.which("protoc")
    if protoc is None:
        pytest.skip("protoc not installed (Debian: protobuf-compiler); grpcio-tools' protoc only makes Python")
    outs = {lang: tmp_path / lang for lang in ("java", "csharp", "php", "ruby", "objc")}
    for out in outs.values():
        out.mkdir()
    subprocess.run([protoc, f"-I{PROTO}", *(f"--{lang}_out={out}" for lang, out in outs.items()),
                    str(PROTO / "hjcg/v1/hjcg.proto")], check=True)
    assert (outs["java"] / "com/hjcg/v1/GenerateRequest.java").is_file()
    assert "namespace Hjcg.V1 {" in (outs["csharp"] / "Hjcg.cs").read_text()
    assert "namespace Hjcg\\V1;" in (outs["php"] / "Hjcg/V1/GenerateRequest.php").read_text()
    assert (outs["php"] / "Hjcg/V1/GPBMetadata/Hjcg.php").is_file()
    ruby = (outs["ruby"] / "hjcg/v1/hjcg_pb.rb").read_text()
    assert "module Hjcg" in ruby and "module V1" in ruby
    assert "@interface HJCGGenerateRequest" in (outs["objc"] / "hjcg/v1/Hjcg.pbobjc.h").read_text()
