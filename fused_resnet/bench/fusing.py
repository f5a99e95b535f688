"""How the benchmark obtains fused blocks and models, whichever pieces of the package exist.

Preference (the first that works is used, and every row names it in ``impl``):

* model: ``fused_resnet.models.<name>()`` with the torchvision model's state_dict loaded
  (strict), else ``fused_resnet.convert.fuse(model, backend=...)``, else each residual block
  adopted with ``fused_resnet.nn.<Block>.from_module`` and the stem with
  ``fused_resnet.nn.ConvBNAct.from_modules``;
* block: ``fused_resnet.nn.<Block>.from_module(copy_of_block, backend=...)``.

The backend is pinned twice: the ``backend`` attribute of every fused module, and
``FUSED_RESNET_BACKEND`` while a variant runs (see :func:`._util.backend_env`).
"""

from __future__ import annotations

import copy
import importlib

from torch import nn


def set_backend(model: nn.Module, backend: str | None) -> None:
    for m in model.modules():
        if type(m).__module__.startswith("fused_resnet.") and hasattr(m, "backend"):
            m.backend = backend


def fused_block(block: nn.Module, backend: str | None) -> tuple[nn.Module, str]:
    """A fused copy of a torchvision block (weights equal), and a description of how it was made."""
    fnn = importlib.import_module("fused_resnet.nn")
    cls = fnn.Bottleneck if hasattr(block, "conv3") else fnn.BasicBlock
    fused = cls.from_module(copy.deepcopy(block), backend=backend)
    return fused, f"fused_resnet.nn.{cls.__name__}.from_module"


def fused_model(name: str, tv_model: nn.Module, backend: str | None) -> tuple[nn.Module, str]:
    """A fused model with ``tv_model``'s weights, and a description of how it was made."""
    problems = []
    try:
        models = importlib.import_module("fused_resnet.models")
        ctor = getattr(models, name)
        model = ctor()
        model.load_state_dict(tv_model.state_dict(), strict=True)
        set_backend(model, backend)
        return model.train(tv_model.training), f"fused_resnet.models.{name} + load_state_dict(strict=True)"
    except (ImportError, AttributeError, TypeError, RuntimeError) as exc:
        problems.append(f"models: {type(exc).__name__}: {exc}"[:120])
    try:
        convert = importlib.import_module("fused_resnet.convert")
        res = convert.fuse(tv_model, backend=backend)
        model = res[0] if isinstance(res, tuple) else res
        return model, "fused_resnet.convert.fuse"
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        problems.append(f"convert: {type(exc).__name__}: {exc}"[:120])
    fnn = importlib.import_module("fused_resnet.nn")
    model = copy.deepcopy(tv_model)
    for parent in list(model.modules()):
        for cname, child in list(parent.named_children()):
            if hasattr(child, "conv1") and hasattr(child, "downsample"):
                setattr(parent, cname, fused_block(child, backend)[0])
    if all(hasattr(model, a) for a in ("conv1", "bn1", "relu")):
        model.conv1 = fnn.ConvBNAct.from_modules(model.conv1, model.bn1, relu=True, backend=backend)
        model.bn1, model.relu = nn.Identity(), nn.Identity()
    return model, "fused_resnet.nn blocks adopted by the benchmark (" + "; ".join(problems) + ")"
