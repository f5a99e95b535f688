"""fused_resnet: fused convolution + BatchNorm + ReLU + shortcut-add for PyTorch ResNets.

Public entry points:

* :mod:`fused_resnet.functional` -- the fused ops (``conv_bn_act``, ``conv_stats``,
  ``bn_finalize``, ``bn_add_act``), differentiable, with backend choice;
* :mod:`fused_resnet.reference` -- the same ops in plain PyTorch: the executable spec;
* :mod:`fused_resnet.backends` -- which implementation runs a call, and why;
* :mod:`fused_resnet.nn` -- fused drop-in ``BasicBlock`` / ``Bottleneck`` / ``ConvBNAct``;
* :mod:`fused_resnet.models` -- torchvision-compatible ResNet/ResNeXt/Wide builders and the CIFAR family;
* :func:`fuse` / :func:`unfuse` (:mod:`fused_resnet.convert`) -- swap fused blocks into a model you have;
* :mod:`fused_resnet.distributed` -- batch statistics synchronized across processes.

``nn``, ``models``, ``convert``, ``distributed`` and ``fuse``/``unfuse`` load on first use, so
``import fused_resnet`` stays light (it does not import torchvision).

Importing never fails because the compiled kernels are missing or stale: it warns once and
falls back to the reference implementation (see :mod:`fused_resnet._ext`).
"""

from . import _ext, backends, functional, reference  # noqa: F401  (_ext loads _C first)

__version__ = "0.1.0"

__all__ = ["backends", "functional", "reference", "nn", "models", "convert", "distributed", "fuse", "unfuse",
           "__version__"]

_LAZY_MODULES = ("nn", "models", "convert", "distributed")


def __getattr__(name: str):
    import importlib

    if name in _LAZY_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in ("fuse", "unfuse"):
        return getattr(importlib.import_module(f"{__name__}.convert"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
