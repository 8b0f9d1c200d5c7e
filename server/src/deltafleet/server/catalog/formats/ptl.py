"""PyTorch Mobile (TorchScript lite, ``.ptl``): read without torch (``inspect_torch``)."""

from ..inspect import Inspector, register_inspector
from ..inspect_torch import inspect_ptl, is_torch_archive

register_inspector(Inspector("ptl", is_torch_archive, inspect_ptl))
