"""Builds hjcg: the Python packages and the native extension hjcg._C.

The extension is built through torch's cpp_extension (with ninja). CUDA sources are compiled only where
torch has CUDA and nvcc is found (or HJCG_WITH_CUDA=1 forces them; =0 leaves them out), so a CPU-only
machine builds and imports the CPU kernels alone. Without a visible GPU, set TORCH_CUDA_ARCH_LIST
(e.g. 9.0 for H100/H200), or torch's architecture detection fails.
"""
import os
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = Path(__file__).parent
CSRC = "csrc"


def want_cuda() -> bool:
    forced = os.environ.get("HJCG_WITH_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def extension():
    cpu_sources = [f"{CSRC}/bindings.cpp", f"{CSRC}/ops_cpu.cpp", f"{CSRC}/registration.cpp"]
    cxx_flags = ["-O3", "-std=c++17"]
    if not want_cuda():
        return CppExtension("hjcg._C", cpu_sources, extra_compile_args={"cxx": cxx_flags})
    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / CSRC).glob("*.cu"))
    cuda_sources += [f"{CSRC}/graph_cache.cpp"]
    return CUDAExtension(
        "hjcg._C",
        cpu_sources + cuda_sources,
        define_macros=[("HJCG_WITH_CUDA", None)],
        extra_compile_args={
            "cxx": cxx_flags + ["-DHJCG_WITH_CUDA"],
            "nvcc": ["-O3", "-std=c++17", "-DHJCG_WITH_CUDA", "--use_fast_math", "-lineinfo"],
        },
    )


setup(
    name="hjcg",
    version="0.1.0",
    description="Hybrid JIT-CUDA-Graph LLM inference server with a gRPC API",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["hjcg", "hjcg.v1", "hjcg_server", "hjcg_client"],
    package_dir={"hjcg_server": "server/hjcg_server", "hjcg_client": "client/hjcg_client"},
    package_data={"hjcg.v1": ["*.pyi"], "hjcg_server": ["web/*"]},  # web/: the built-in page's files
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    entry_points={
        "console_scripts": [
            "hjcg = hjcg_server.cli:main",
            "hjcg-client = hjcg_client.cli:main",
        ]
    },
)
