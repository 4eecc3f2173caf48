"""hjcg: hybrid JIT-CUDA-graph LLM inference."""
__version__ = "0.1.0"
