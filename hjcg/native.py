"""Loads the native extension hjcg._C (torch must be imported first: the extension links to libtorch)."""
import torch  # noqa: F401  (loads libtorch's shared libraries for the extension)

from hjcg import _C

__all__ = ["_C"]
