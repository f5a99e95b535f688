"""Fused modules: :class:`ConvBNAct`, :class:`BasicBlock`, :class:`Bottleneck` (and the plain block).

They hold ordinary ``nn.Conv2d`` / ``nn.BatchNorm2d`` submodules under torchvision's names, so
optimizers, init, ``requires_grad_``, ``eval()`` and ``state_dict`` behave as usual, and run them
through :mod:`fused_resnet.functional` (see :mod:`fused_resnet.nn._fusion` for the engine):

* eval (BN with running statistics, or ``FrozenBatchNorm2d``): each conv + BN (+ shortcut-add)
  (+ ReLU) is ONE ``conv_bn_act`` call -- a BasicBlock is 2 ops (3 with a projection shortcut), a
  Bottleneck 3 (4); folded scale/shift are cached (:class:`~fused_resnet.nn._fusion.FoldCache`).
* train (batch statistics): ``conv_stats`` -> ``bn_finalize`` -> ``conv_stats`` with the previous
  BN + ReLU as prologue -> ... -> ``bn_add_act`` with the projection shortcut's BN applied on the
  fly; running statistics are updated exactly as ``nn.BatchNorm2d``.

Activations: (N, C, H, W) of float32/float64/float16/bfloat16, any memory layout accepted;
outputs are channels_last (keep inputs channels_last to avoid a copy per block).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models import resnet as _tv

from . import _fusion, _tape
from ._fusion import Act, EvalPlan, FoldCache, PlanSlot, run_unit

__all__ = ["ConvBNAct", "BasicBlock", "Bottleneck", "PlainBasicBlock", "Stage"]

# Child modules of foreign blocks (timm) that are fine when they do nothing.
_ACT_NAMES = ("relu", "act1", "act2", "act3")


def _is_noop(m) -> bool:
    return m is None or isinstance(m, nn.Identity)


def split_downsample(ds) -> tuple[list[nn.Module], nn.Conv2d, nn.Module] | None:
    """``(prefix, conv, norm)`` when ``ds`` is an ``nn.Sequential`` ending in a fusable
    (Conv2d, BatchNorm2d/FrozenBatchNorm2d) pair, else None (``ds`` then runs as given and its
    output is a plain residual)."""
    if not isinstance(ds, nn.Sequential) or len(ds) < 2:
        return None
    conv, norm = ds[-2], ds[-1]
    if _fusion.conv_reason(conv) is not None or not _fusion.is_fusable_norm(norm):
        return None
    return list(ds)[:-2], conv, norm


class _FusedBlockMixin:
    """Shared forward of the fused residual blocks. Subclasses set ``_units`` (conv/norm name pairs)."""

    _units: tuple[tuple[str, str], ...] = ()
    residual: bool = True  # False: a plain block (no shortcut at all), for the CIFAR plain nets

    def _init_fused(self, backend) -> None:
        self.backend = _fusion.check_backend(backend)
        self._fold_caches = {conv: FoldCache() for conv, _ in self._units}
        self._fold_caches["downsample"] = FoldCache()
        self._plan_slot = PlanSlot()

    @property
    def in_channels(self) -> int:
        return getattr(self, self._units[0][0]).in_channels

    def unfused_reason(self) -> str | None:
        """None when the block runs fused, else why it runs as plain PyTorch modules."""
        for conv, norm in self._units:
            why = _fusion.conv_reason(getattr(self, conv)) or _fusion.norm_reason(getattr(self, norm))
            if why is not None:
                return f"{conv}/{norm}: {why}"
        if not self.residual and self.downsample is not None:
            return "a plain block (no shortcut) has a downsample module"
        return None

    def _shortcut(self, x: Tensor, tape=None) -> Act | None:
        if not self.residual:
            return None
        if self.downsample is None:
            return Act(x)
        parts = split_downsample(self.downsample)
        if parts is None:
            return Act(self.downsample(x))
        prefix, conv, norm = parts
        for m in prefix:
            x = m(x)
        return run_unit(Act(x), conv, norm, self._fold_caches["downsample"], relu=False, backend=self.backend,
                        tape=tape)

    def _tape_tensors(self, x: Tensor) -> list[Tensor] | None:
        """The tensors of a taped training forward (input, then each unit's weight, BN weight and
        bias), or None when this call may not run on a tape (:mod:`fused_resnet.nn._tape`). When it
        may, the backend decisions of the taped ops are recorded (``backends.last_decision``)."""
        units = [(getattr(self, conv), getattr(self, norm)) for conv, norm in self._units]
        if self.residual and self.downsample is not None:
            parts = split_downsample(self.downsample)
            if parts is None or parts[0]:
                return None
            units.append(parts[1:])
        return _tape.tape_tensors(x, units, self.backend)

    def _plan_key(self, x: Tensor) -> tuple | None:
        """The :class:`~fused_resnet.nn._fusion.EvalPlan` key of this call, None when it may not
        use one."""
        if not _fusion.fast_eval_ready(x):
            return None
        key = [_fusion.plan_key_head(x, self.backend)]
        for conv, norm in self._units:
            key.append(_fusion.unit_state(getattr(self, conv), getattr(self, norm)))
        ds = self.downsample
        if ds is not None:
            parts = split_downsample(ds)
            key.append(id(ds) if parts is None else
                       (tuple(id(m) for m in parts[0]), _fusion.unit_state(parts[1], parts[2])))
        return tuple(key)

    def _build_plan(self, key: tuple, x: Tensor) -> EvalPlan | None:
        units = [(getattr(self, conv), getattr(self, norm), self._fold_caches[conv]) for conv, norm in self._units]
        parts = split_downsample(self.downsample) if self.downsample is not None else None
        if parts is not None:
            units.append((parts[1], parts[2], self._fold_caches["downsample"]))
        return EvalPlan.build(key, x, units, self.backend)

    def _run_plan(self, plan: EvalPlan, x: Tensor, owned: bool = False) -> Tensor:
        """The fold-mode forward through ``plan`` (same calls as the ordinary path). The block end
        writes into its shortcut when nothing else can read it (see "Writing into a dead residual"
        in :mod:`fused_resnet.nn._fusion`): the projection's output, made here, always; the
        identity shortcut ``x`` only when ``owned`` (the caller holds the only reference)."""
        last = len(self._units) - 1
        a = x
        for i in range(last):
            a = plan.conv(i, a)
        plan.record()
        if not self.residual:
            return plan.conv(last, a, None)
        if self.downsample is None:
            return plan.conv_into(last, a, x) if owned else plan.conv(last, a, x)
        parts = split_downsample(self.downsample)
        if parts is None:  # a foreign module: its output may be anything, x included
            return plan.conv(last, a, self.downsample(x))
        res = x
        for m in parts[0]:
            res = m(res)
        return plan.conv_into(last, a, plan.conv(last + 1, res, relu=False))

    def _forward_owned(self, x: Tensor) -> Tensor:
        """``forward(x)`` for a caller that holds the only reference to ``x`` and runs no hooks
        (:class:`Stage`): an eval plan may then write the block's output into ``x``."""
        key = self._plan_key(x)
        slot = getattr(self, "_plan_slot", None)
        if key is not None and slot is not None:
            plan = slot.plan
            if plan is not None and plan.key == key:
                _fusion.check_input(x, self.in_channels, type(self).__name__)
                return self._run_plan(plan, x, owned=True)
        return self.forward(x)

    def forward(self, x: Tensor) -> Tensor:
        _fusion.check_input(x, self.in_channels, type(self).__name__)
        key = self._plan_key(x)
        slot = getattr(self, "_plan_slot", None)
        if key is not None and slot is not None:
            plan = slot.plan
            if plan is not None and plan.key == key:
                return self._run_plan(plan, x)
        why = self.unfused_reason()
        if why is not None:
            _fusion.warn_unfused(self, why)
            return self._unfused_forward(x)
        if _tape.tape_ready(x):
            tensors = self._tape_tensors(x)
            if tensors is not None:
                return _tape.BlockFunction.apply(lambda tape: self._fused_forward(x, tape), *tensors)
        out = self._fused_forward(x)
        if key is not None and slot is not None:
            slot.plan = self._build_plan(key, x)
        return out

    def _fused_forward(self, x: Tensor, tape=None) -> Tensor:
        a = Act(x)
        last = len(self._units) - 1
        for i, (conv, norm) in enumerate(self._units):
            if i == last:
                shortcut = self._shortcut(x, tape)
                a = run_unit(a, getattr(self, conv), getattr(self, norm), self._fold_caches[conv], relu=True,
                             backend=self.backend, shortcut=shortcut, defer=False, tape=tape)
            else:
                a = run_unit(a, getattr(self, conv), getattr(self, norm), self._fold_caches[conv], relu=True,
                             backend=self.backend, tape=tape)
        return a.t

    def _unfused_forward(self, x: Tensor) -> Tensor:
        out = x
        last = len(self._units) - 1
        for i, (conv, norm) in enumerate(self._units):
            out = getattr(self, norm)(getattr(self, conv)(out))
            if i < last:
                out = torch.relu(out)
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return torch.relu(out)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"

    @classmethod
    def from_module(cls, block: nn.Module, backend: str | None = None):
        """A fused block that ADOPTS ``block``'s submodules (the very same objects: parameters are
        shared, weights kept exactly, state_dict keys unchanged).

        ``block`` is a torchvision block or any block with the same attribute names
        (``conv1, bn1, conv2, bn2`` [``, conv3, bn3``] and ``downsample``) -- e.g. timm's, whose
        parameter-free activations ``act1/act2/act3`` must be ``nn.ReLU`` and whose optional parts
        (``drop_block``, ``aa``, ``se``, ``drop_path``, ...) must be absent (None or Identity).
        ``stride`` is read from the strided conv (conv1 of a BasicBlock, conv2 of a Bottleneck).
        The new block is in ``block``'s train/eval mode.

        Raises:
            ValueError: saying why, when the block cannot be fused (missing or extra submodules,
            a conv that is not a zero-padded ``nn.Conv2d``, a norm that is not ``BatchNorm2d`` /
            ``FrozenBatchNorm2d``, a non-ReLU activation, a Bottleneck given to
            ``BasicBlock.from_module`` or the reverse).
        """
        kind = cls.__name__
        if not isinstance(block, nn.Module):
            raise ValueError(f"{kind}.from_module: expected an nn.Module, got {type(block).__name__}")
        names = [n for pair in cls._units for n in pair]
        missing = [n for n in names + ["downsample"] if not hasattr(block, n)]
        if missing:
            raise ValueError(f"{kind}.from_module: {type(block).__name__} has no {', '.join(missing)}")
        if issubclass(cls, BasicBlock) and getattr(block, "conv3", None) is not None:
            raise ValueError(f"{kind}.from_module: {type(block).__name__} has conv3 (a bottleneck); use "
                             "Bottleneck.from_module")
        for conv, norm in cls._units:
            why = _fusion.conv_reason(getattr(block, conv))
            if why is not None:
                raise ValueError(f"{kind}.from_module: {conv}: {why}")
            why = _fusion.norm_reason(getattr(block, norm))
            if why is not None:
                raise ValueError(f"{kind}.from_module: {norm}: {why}")
        if not cls.residual and block.downsample is not None:
            raise ValueError(f"{kind}.from_module: a plain block cannot have a downsample module")
        for name, child in block.named_children():
            if name in names or name == "downsample":
                continue
            if name in _ACT_NAMES:
                if not isinstance(child, nn.ReLU):
                    raise ValueError(f"{kind}.from_module: {name} is {type(child).__name__}; only ReLU is fused")
            elif not _is_noop(child):
                raise ValueError(f"{kind}.from_module: submodule {name!r} ({type(child).__name__}) is not part of "
                                 "a fused block and would be dropped")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        for conv, norm in cls._units:
            setattr(fused, conv, getattr(block, conv))
            setattr(fused, norm, getattr(block, norm))
            if conv == "conv1":
                fused.relu = nn.ReLU(inplace=True)
        fused.downsample = block.downsample
        fused.stride = getattr(fused, cls._stride_conv).stride[0]
        fused._init_fused(backend)
        fused.train(block.training)
        return fused


class BasicBlock(_FusedBlockMixin, _tv.BasicBlock):
    """Fused drop-in for ``torchvision.models.resnet.BasicBlock`` (a subclass of it, so
    ``isinstance`` checks such as torchvision's ``zero_init_residual`` still apply).

    ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; eval: 2 ``conv_bn_act`` calls (3 with a
    projection shortcut); train: ``conv_stats, bn_finalize, conv_stats`` (bn1 + ReLU in its
    prologue), ``bn_finalize``, [shortcut ``conv_stats, bn_finalize``], ``bn_add_act``.

    Args: as torchvision's (``inplanes, planes, stride=1, downsample=None, groups=1,
    base_width=64, dilation=1, norm_layer=None``; groups/base_width/dilation other than the
    defaults raise as in torchvision), plus ``backend`` (None = auto, or ``torch``/``cpu``/
    ``cuda``/``triton``), passed to every functional op.

    A norm layer other than BatchNorm2d/FrozenBatchNorm2d (e.g. GroupNorm) cannot be fused: the
    block then runs its modules unfused and emits a ``FallbackWarning`` saying why (see
    :meth:`unfused_reason`).
    """

    expansion = 1
    _units = (("conv1", "bn1"), ("conv2", "bn2"))
    _stride_conv = "conv1"

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1, norm_layer=None,
                 backend: str | None = None) -> None:
        super().__init__(inplanes, planes, stride, downsample, groups, base_width, dilation, norm_layer)
        self._init_fused(backend)


class PlainBasicBlock(BasicBlock):
    """A :class:`BasicBlock` without a shortcut: ``relu(bn2(conv2(relu(bn1(conv1(x))))))`` -- the
    "plain" networks of He et al. (2015). ``downsample`` must be None."""

    residual = False

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1, norm_layer=None,
                 backend: str | None = None) -> None:
        if downsample is not None:
            raise ValueError("downsample: a plain block has no shortcut; expected None")
        super().__init__(inplanes, planes, stride, None, groups, base_width, dilation, norm_layer, backend)


class Bottleneck(_FusedBlockMixin, _tv.Bottleneck):
    """Fused drop-in for ``torchvision.models.resnet.Bottleneck`` (ResNet V1.5: stride on conv2).

    Eval: 3 ``conv_bn_act`` calls (4 with a projection shortcut); train: ``conv_stats`` +
    ``bn_finalize`` per conv, each BN + ReLU applied in the next conv's prologue, ``bn_add_act`` at
    the end with the projection's BN applied on the fly. Args as torchvision's plus ``backend``;
    see :class:`BasicBlock` for the fallback rule.
    """

    expansion = 4
    _units = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))
    _stride_conv = "conv2"

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1, norm_layer=None,
                 backend: str | None = None) -> None:
        super().__init__(inplanes, planes, stride, downsample, groups, base_width, dilation, norm_layer)
        self._init_fused(backend)


def _no_hooks(m: nn.Module) -> bool:
    """No forward/backward hook on ``m`` nor a global module hook (which would see its tensors)."""
    g = nn.modules.module
    return not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
                or g._global_backward_pre_hooks)


class Stage(nn.Sequential):
    """An ``nn.Sequential`` of fused blocks (a ResNet stage, ``layer1`` ... ``layer4``) that lets
    each block after the first write its output into its input in eval plans.

    Between two blocks of a stage the activation is the previous block's output, which nothing
    but this loop holds -- unless a hook on a block (or a global module hook) has seen it. So with
    no such hook, plain fused blocks (not subclasses with their own ``forward``) and a call that
    may use eval plans, blocks 2..n run with their input donated (``_forward_owned``: the block end
    is written into its identity shortcut, see "Writing into a dead residual" in
    :mod:`fused_resnet.nn._fusion`); in every other case it is exactly ``nn.Sequential.forward``.
    The stage's own input is never written (the first block runs as called) and its output is
    returned untouched, so hooks on the stage itself do not matter. Same children and state_dict
    keys as the ``nn.Sequential`` it replaces; :mod:`fused_resnet.models` build their stages as
    ``Stage``, and :func:`fused_resnet.convert.fuse` turns a fused model's all-block
    ``nn.Sequential`` into one (class swap; :func:`~fused_resnet.convert.unfuse` swaps back)."""

    def forward(self, x: Tensor) -> Tensor:
        blocks = list(self._modules.values())
        if not (len(blocks) > 1 and _fusion.fast_eval_ready(x) and not torch.jit.is_tracing()
                and all(isinstance(b, _FusedBlockMixin) and type(b).forward is _FusedBlockMixin.forward
                        and _no_hooks(b) for b in blocks)):
            return super().forward(x)
        x = blocks[0](x)
        for b in blocks[1:]:
            x = b._forward_owned(x)
        return x


class ConvBNAct(nn.Module):
    """``relu?(bn(conv(x)))`` as one fused op in eval (``conv_bn_act``), ``conv_stats`` +
    ``bn_finalize`` + ``bn_add_act`` in training. For stems and other conv + BN (+ ReLU) layers.

    Args (modelled on ``torchvision.ops.Conv2dNormActivation``): ``in_channels, out_channels,
    kernel_size=3, stride=1, padding=None`` (None = ``dilation * (kernel_size - 1) // 2``),
    ``groups=1, norm_layer=None`` (BatchNorm2d), ``relu=True, dilation=1, bias=False`` (a conv bias
    is folded into the BN shift), ``backend=None``.

    Submodules: ``conv`` (``nn.Conv2d``) and ``bn`` (the norm layer); ``relu`` is a bool.
    A norm layer that cannot be fused runs unfused with a ``FallbackWarning``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None, groups: int = 1, norm_layer=None, relu: bool = True,
                 dilation: int = 1, bias: bool = False, backend: str | None = None) -> None:
        super().__init__()
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2
        norm_layer = nn.BatchNorm2d if norm_layer is None else norm_layer
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=bias)
        self.bn = norm_layer(out_channels)
        self.relu = bool(relu)
        self.backend = _fusion.check_backend(backend)
        self._fold_cache = FoldCache()
        self._plan_slot = PlanSlot()

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.Module, relu: bool = True, backend: str | None = None):
        """A ConvBNAct that ADOPTS ``conv`` and ``bn`` (same objects, parameters shared); in
        ``bn``'s train/eval mode. Raises ValueError when they cannot be fused (see
        :func:`~fused_resnet.nn._fusion.conv_reason` / ``norm_reason``)."""
        why = _fusion.conv_reason(conv)
        if why is not None:
            raise ValueError(f"ConvBNAct.from_modules: conv: {why}")
        why = _fusion.norm_reason(bn)
        if why is not None:
            raise ValueError(f"ConvBNAct.from_modules: bn: {why}")
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.conv, m.bn, m.relu = conv, bn, bool(relu)
        m.backend = _fusion.check_backend(backend)
        m._fold_cache = FoldCache()
        m._plan_slot = PlanSlot()
        m.train(bn.training)
        return m

    def unfused_reason(self) -> str | None:
        return _fusion.conv_reason(self.conv) or _fusion.norm_reason(self.bn)

    def forward(self, x: Tensor) -> Tensor:
        conv, bn = self.conv, self.bn
        _fusion.check_input(x, conv.in_channels, "ConvBNAct")
        slot = getattr(self, "_plan_slot", None)
        key = None
        if slot is not None and _fusion.fast_eval_ready(x):  # see fused_resnet.nn._fusion.EvalPlan
            key = (_fusion.plan_key_head(x, self.backend), self.relu, _fusion.unit_state(conv, bn))
            plan = slot.plan
            if plan is not None and plan.key == key:
                plan.record()
                return plan.conv(0, x, relu=self.relu)
        why = self.unfused_reason()
        if why is not None:
            _fusion.warn_unfused(self, why)
            y = bn(conv(x))
            return torch.relu(y) if self.relu else y
        out = run_unit(Act(x), conv, bn, self._fold_cache, self.relu, self.backend, defer=False).t
        if key is not None:
            slot.plan = EvalPlan.build(key, x, [(conv, bn, self._fold_cache)], self.backend)
        return out

    def extra_repr(self) -> str:
        return f"relu={self.relu}, backend={self.backend!r}"
