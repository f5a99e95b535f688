"""Models built from the fused blocks.

* :mod:`~fused_resnet.models.resnet`: ``resnet18/34/50/101/152``, ``resnext50_32x4d``,
  ``resnext101_32x8d``, ``resnext101_64x4d``, ``wide_resnet50_2``, ``wide_resnet101_2`` --
  torchvision's builder signatures and state_dict keys (strict loading works both ways).
* :mod:`~fused_resnet.models.cifar`: He et al.'s CIFAR family ``cifar_resnet20/32/44/56/110/1202``
  (shortcut options ``"A"``/``"B"``/``"C"``) and the plain nets ``cifar_plain20/...``.

Every model converts its input to channels_last once at entry and has a ``backend`` attribute
that sets the backend of all its fused modules.
"""

from .cifar import (  # noqa: F401
    CifarResNet,
    PadShortcut,
    cifar_plain20,
    cifar_plain32,
    cifar_plain44,
    cifar_plain56,
    cifar_plain110,
    cifar_plain1202,
    cifar_resnet,
    cifar_resnet20,
    cifar_resnet32,
    cifar_resnet44,
    cifar_resnet56,
    cifar_resnet110,
    cifar_resnet1202,
)
from .resnet import (  # noqa: F401
    ResNet,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    resnext101_32x8d,
    resnext101_64x4d,
    wide_resnet50_2,
    wide_resnet101_2,
)

__all__ = [
    "ResNet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
    "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
    "CifarResNet", "PadShortcut", "cifar_resnet",
    "cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56", "cifar_resnet110", "cifar_resnet1202",
    "cifar_plain20", "cifar_plain32", "cifar_plain44", "cifar_plain56", "cifar_plain110", "cifar_plain1202",
]
