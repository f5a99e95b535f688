"""fused_resnet: fused convolution + BatchNorm + ReLU + shortcut-add for PyTorch ResNets.

Public entry points:

* :mod:`fused_resnet.functional` -- the fused ops (``conv_bn_act``, ``conv_stats``,
  ``bn_finalize``, ``bn_add_act``), differentiable, with backend choice;
* :mod:`fused_resnet.reference` -- the same ops in plain PyTorch: the executable spec;
* :mod:`fused_resnet.backends` -- which implementation runs a call, and why.

Importing never fails because the compiled kernels are missing or stale: it warns once and
falls back to the reference implementation (see :mod:`fused_resnet._ext`).
"""

from . import _ext, backends, functional, reference  # noqa: F401  (_ext loads _C first)

__version__ = "0.1.0"

__all__ = ["backends", "functional", "reference", "__version__"]
