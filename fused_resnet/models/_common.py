"""What the fused models share: the fused stem, the ``backend`` switch, input checks, weight loading."""

from __future__ import annotations

import os
from collections.abc import Mapping
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from ..nn import _fusion, _onednn_stem, _tape
from ..nn._fusion import Act, EvalPlan, FoldCache, PlanSlot, run_unit
from ..nn.modules import Stage, _FusedBlockMixin, _no_hooks

_CL = torch.channels_last


class FusedModelMixin:
    """A model with ``conv1``/``bn1`` stem and fused blocks.

    * ``backend`` (None = auto): reading gives the model's setting; assigning sets it on every
      fused module inside (stem included).
    * ``_fused_entry(x)``: validates the input (4-D, the stem's channel count), converts it ONCE to
      channels_last (NCHW accepted; the fused ops keep channels_last from there on) and runs
      ``relu(bn1(conv1(x)))`` as one fused op (eval) or the training path.
    """

    def _init_fused_model(self, backend) -> None:
        self._stem_cache = FoldCache()
        self._stem_plan = PlanSlot()
        self.backend = backend
        # Stages of fused blocks become fused_resnet.nn.Stage (same children and keys): in eval
        # plans a block's end may then be written into its (dead) input.
        for child in self.children():
            if (type(child) is nn.Sequential and len(child) > 1
                    and all(isinstance(b, _FusedBlockMixin) for b in child)):
                child.__class__ = Stage

    @property
    def backend(self) -> str | None:
        return self.__dict__.get("_backend")

    @backend.setter
    def backend(self, value) -> None:
        value = _fusion.check_backend(value)
        self.__dict__["_backend"] = value
        for m in self.modules():
            if m is not self and (hasattr(m, "_fold_caches") or hasattr(m, "_fold_cache")):
                m.backend = value

    def _fused_entry(self, x: Tensor, pool: nn.Module | None = None) -> Tensor:
        """``relu(bn1(conv1(x)))``, then ``pool`` when given, channels_last out.

        Eval plans (see :class:`~fused_resnet.nn._fusion.EvalPlan`): the stem's ``conv_bn_act`` is
        called directly; on the ``cpu`` backend, with float32 input and an ``nn.MaxPool2d`` pool, the
        plan runs conv + BN + ReLU + pool in oneDNN's blocked layout instead
        (:mod:`fused_resnet.nn._onednn_stem`, measured faster for the 3-channel stem).
        """
        conv, bn = self.conv1, self.bn1
        _fusion.check_input(x, conv.in_channels, type(self).__name__)
        slot = getattr(self, "_stem_plan", None)
        key = None
        if slot is not None and _fusion.fast_eval_ready(x):
            key = (_fusion.plan_key_head(x, self.backend), _fusion.unit_state(conv, bn), _pool_state(pool))
            plan = slot.plan
            if plan is not None and plan.key == key:
                plan.record()
                if plan.stem is not None:
                    return plan.stem(x)
                y = plan.conv(0, x.contiguous(memory_format=_CL))
                return y if pool is None else pool(y)
        x = x.contiguous(memory_format=_CL)
        why = _fusion.conv_reason(conv) or _fusion.norm_reason(bn)
        if why is not None:
            _fusion.warn_unfused(self, f"stem conv1/bn1: {why}")
            out = torch.relu(bn(conv(x)))
        elif _tape.tape_ready(x) and (tensors := self._stem_tape_tensors(x, pool)) is not None:
            return _tape.BlockFunction.apply(lambda tape: self._stem_taped(x, pool, tape), *tensors)
        else:
            out = run_unit(Act(x), conv, bn, self._stem_cache, relu=True, backend=self.backend, defer=False).t
            if key is not None:
                plan = EvalPlan.build(key, x, [(conv, bn, self._stem_cache)], self.backend)
                if (plan is not None and pool is not None and plan.decision.backend == "cpu"
                        and _onednn_stem.unsupported_reason(x, conv, pool) is None):
                    _, scale, shift, *_ = plan.units[0]
                    plan.stem = _onednn_stem.OneDNNStem(conv, scale, shift, pool)
                slot.plan = plan
        return out if pool is None else pool(out)


    def _stem_tape_tensors(self, x: Tensor, pool: nn.Module | None) -> list[Tensor] | None:
        """The tensors of a taped training stem (``conv1 -> bn1 -> relu -> maxpool`` as one
        autograd node, :mod:`fused_resnet.nn._tape`), or None when it may not run taped: the unit
        as for blocks, and ``pool`` None or a plain ``nn.MaxPool2d`` without indices, nor hooks of
        its own or global ones (the tape runs the pool's aten op itself, so hooks would not see it). Taped, neither
        ``relu(bn1(conv1(x)))`` nor the pool's indices are kept for backward (recomputed there from
        the conv output), and the first block recomputes its input (the pool's output) likewise."""
        if pool is not None and (type(pool) is not nn.MaxPool2d or pool.return_indices or not _no_hooks(pool)):
            return None
        return _tape.tape_tensors(x, [(self.conv1, self.bn1)], self.backend)

    def _stem_taped(self, x: Tensor, pool: nn.MaxPool2d | None, tape) -> Tensor:
        y = run_unit(Act(x), self.conv1, self.bn1, self._stem_cache, relu=True, backend=self.backend,
                     defer=False, tape=tape).t
        return y if pool is None else tape.max_pool2d(y, *_onednn_stem.pool_args(pool))


def _pool_state(pool: nn.Module | None) -> tuple | None:
    if pool is None:
        return None
    return (id(pool), type(pool)) + tuple(getattr(pool, a, None) for a in (
        "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"))


def hub_checkpoint_path(weights) -> str:
    """Where torch hub keeps the file of a torchvision weights enum:
    ``torch.hub.get_dir()/checkpoints/<file name of weights.url>``."""
    name = os.path.basename(urlparse(weights.url).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", name)


def resolve_weights(weights, enum_cls=None) -> tuple[Mapping | None, int | None]:
    """``(state_dict, num_classes from the enum's metadata or None)`` for a builder's ``weights``.

    ``weights`` is None, a state_dict (a Mapping), a path (str / ``os.PathLike``) to a file saved
    with ``torch.save(state_dict)``, or (when ``enum_cls`` is given) a torchvision weights enum
    member or its name (``"DEFAULT"``, ``"IMAGENET1K_V2"``, ``"ResNet50_Weights.IMAGENET1K_V2"``).
    An enum's file must already be in the local torch hub cache -- nothing is ever downloaded.

    Raises:
        FileNotFoundError: the file is not there (says where it looked and how to get it).
        TypeError: an enum of another architecture, or an unsupported type.
    """
    if weights is None:
        return None, None
    if isinstance(weights, Mapping):
        return weights, None
    enum = None
    if enum_cls is not None:
        from torchvision.models import WeightsEnum

        if isinstance(weights, WeightsEnum):
            enum = enum_cls.verify(weights)
        elif isinstance(weights, str) and not os.path.exists(weights):
            try:
                enum = enum_cls.verify(weights)
            except (KeyError, ValueError):
                enum = None
    if enum is not None:
        path = hub_checkpoint_path(enum)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"weights: {enum} is not in the local torch hub cache; looked for {path}. fused_resnet never "
                f"downloads: fetch it once with torchvision (e.g. `{enum}.get_state_dict()` on a machine with "
                f"network access, copying the file there), or pass a path or a state_dict")
        return _load_file(path), len(enum.meta["categories"])
    if isinstance(weights, (str, os.PathLike)):
        path = os.fspath(weights)
        if not os.path.isfile(path):
            names = f" nor a {enum_cls.__name__} member ({', '.join(enum_cls.__members__)})" if enum_cls else ""
            raise FileNotFoundError(f"weights: {path!r} is not a file{names}")
        return _load_file(path), None
    raise TypeError(f"weights: expected None, a weights enum, a path or a state_dict, got {type(weights).__name__}")


def _load_file(path: str) -> Mapping:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping):
        raise TypeError(f"weights: {path} holds a {type(sd).__name__}, expected a state_dict")
    return sd


def num_classes_of(state_dict: Mapping, key: str = "fc.weight") -> int | None:
    w = state_dict.get(key)
    return int(w.shape[0]) if isinstance(w, Tensor) and w.dim() == 2 else None


def set_num_classes(kwargs: dict, num_classes: int | None, source: str) -> None:
    """Take ``num_classes`` from the weights unless the caller gave a different one (an error)."""
    if num_classes is None:
        return
    given = kwargs.get("num_classes")
    if given is not None and given != num_classes:
        raise ValueError(f"num_classes: the weights ({source}) have {num_classes} classes, got num_classes={given}")
    kwargs["num_classes"] = num_classes


def load_strict(model: nn.Module, state_dict: Mapping) -> None:
    """``model.load_state_dict(state_dict, strict=True)``, with missing/unexpected keys reported
    first as a ValueError naming them (nothing is loaded then)."""
    expected = set(model.state_dict().keys())
    given = set(state_dict.keys())
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        def show(keys):
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        raise ValueError(f"weights: state_dict does not match {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)
