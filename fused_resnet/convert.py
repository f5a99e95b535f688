"""``fuse(model)`` / ``unfuse(model)``: swap fused blocks into a model you already have, and back.

::

    from fused_resnet.convert import fuse, unfuse

    fused, report = fuse(torchvision.models.resnet50())    # a copy; the original is untouched
    print(report)                                          # what was fused, what was skipped and why
    plain = unfuse(fused)                                  # the original module classes again

What is fused
-------------

* **Residual blocks**: ``torchvision.models.resnet.BasicBlock`` / ``Bottleneck`` (the exact classes,
  or subclasses that do not override ``forward``) -- this covers torchvision's ResNet, ResNeXt and
  Wide ResNet and any user model built from these blocks -- and timm's
  ``timm.models.resnet.BasicBlock`` / ``Bottleneck`` (plain, ``-d`` deep-stem / avg-down variants)
  when every extra feature timm adds is absent: ``se`` (attention: SE, ECA, ...) is None,
  ``aa`` (anti-aliasing) and ``drop_block`` are ``nn.Identity``, ``drop_path`` is None, and the
  activations are ``nn.ReLU``. Each becomes :class:`fused_resnet.nn.BasicBlock` /
  :class:`fused_resnet.nn.Bottleneck` built by ``from_module(block, backend=...)``, which
  **adopts** the block's ``conv1, bn1, conv2, bn2, [conv3, bn3], downsample`` (the very same module
  objects), so parameters are shared, weights are kept exactly and the state_dict keys are the
  block's own. timm's blocks name the same submodules the same way; their extra submodules are
  parameter-free when they are absent, so the keys match there too.
* **Stems and conv-BN-ReLU chains**: torchvision ``ResNet``'s ``conv1 -> bn1 -> relu`` and timm
  ``ResNet``'s ``conv1 -> bn1 -> act1`` (for the deep stem, ``conv1`` is
  ``Sequential(conv, bn, act, conv, bn, act, conv)``: its last conv is fused with ``bn1``/``act1``),
  plus any ``(Conv2d, BatchNorm2d, ReLU)`` run of consecutive children of an ``nn.Sequential``
  (the exact class, or a subclass that keeps ``Sequential.forward``) -- the deep stem's first two
  triples among them. Each becomes one :class:`fused_resnet.nn.ConvBNAct` call (see "state_dict
  keys" for how).

``nn.SyncBatchNorm`` is fused like ``BatchNorm2d`` (blocks and stems): in training, the fused ops
merge its batch statistics across its process group between ``conv_stats`` and ``bn_finalize``
(:func:`fused_resnet.distributed.sync_stats`), as ``nn.SyncBatchNorm`` does; without an
initialized process group (or with a group of one) it is an ordinary BatchNorm, as in PyTorch.
Unlike ``nn.SyncBatchNorm`` it also runs on CPU tensors (gloo). The report's reason says which
units synchronize.

Everything else is left as it is. A candidate that cannot be fused is **skipped** and the report
says why: a norm layer that is not ``BatchNorm2d`` / ``SyncBatchNorm`` /
``torchvision.ops.FrozenBatchNorm2d`` (GroupNorm, timm's own FrozenBatchNorm2d, ...), a
conv/norm/activation subclass with its own ``forward`` (weight standardisation, ...), an activation
other than ``nn.ReLU``, timm's extra features, a block class whose ``forward`` is overridden, a
module object registered at two places (fusing it would change the other use too), a
``padding_mode`` other than ``"zeros"``, or whatever ``from_module`` itself refuses (its
``ValueError`` text is the reason).

Results and the report
----------------------

``fuse`` returns a :class:`FuseResult` -- a named tuple ``(model, report)`` -- so both
``model, report = fuse(m)`` and ``fuse(m).model`` work. The :class:`FusionReport` has one
:class:`FusionEntry` per candidate (qualified name, original class, action ``"fused"`` or
``"skipped"``, reason, replacement class), in module order, plus notes (e.g. that the requested
backend cannot run on the model's device and its calls will fall back). ``str(report)`` is a table;
``report.counts``, ``report.fused``, ``report.skipped`` and ``report.to_dict()`` (JSON-ready)
give the same data.

Decisions
---------

* **Copy or in place.** ``fuse(model)`` / ``unfuse(model)`` deep-copy the model first and return the
  copy (the argument is untouched); ``inplace=True`` modifies and returns the same object (the root
  module is then still the same object, unless the root itself is a block, which is replaced).
* **backend** (``None`` = auto, or ``"torch"``, ``"cpu"``, ``"cuda"``, ``"triton"``, ``"auto"``)
  is stored on every fused module as its ``backend`` attribute and passed to every fused op call; an
  unknown name raises ``ValueError`` before anything is changed.
* **state_dict keys unchanged.** Blocks: adoption (above). Stems / chains: the modules stay where
  they are and keep their parameters and buffers; only their behaviour changes. The conv's class
  becomes :class:`FusedConv2d` (an ``nn.Conv2d`` subclass whose forward runs the whole conv -> BN ->
  ReLU as one :class:`fused_resnet.nn.ConvBNAct` built over the same conv and BN objects); the BN's
  class becomes :class:`FoldedBatchNorm2d` / :class:`FoldedSyncBatchNorm` /
  :class:`FoldedFrozenBatchNorm2d` (still a ``BatchNorm2d`` / ``SyncBatchNorm`` /
  ``FrozenBatchNorm2d``, holding its weight, bias and running statistics exactly as before, but its
  forward returns its input because the conv already applied it); the ReLU's slot holds a
  :class:`FoldedReLU` (an ``nn.Identity`` that remembers the original object). Hence
  ``fused.load_state_dict(original.state_dict(), strict=True)`` and the reverse work, the ResNet's
  own ``forward`` is still the one that runs, ``model.train()/eval()/.to()/.half()`` reach every
  tensor as before, and ``for m in model.modules(): if isinstance(m, nn.BatchNorm2d): m.eval()``
  still freezes that BN's statistics (the :class:`~fused_resnet.nn.ConvBNAct` is deliberately not a
  registered submodule -- that would add keys -- so :class:`FusedConv2d` copies its own ``training``
  flag to it at each call and leaves the BN's flag to the user). Class swapping is how
  ``torch.nn.utils.parametrize`` changes a module's behaviour in place, too. Only the exact classes
  ``nn.Conv2d`` and ``nn.BatchNorm2d`` / ``nn.SyncBatchNorm`` / ``FrozenBatchNorm2d`` are swapped: a
  subclass (e.g. a conv with a parametrized weight, whose class is a generated subclass) is skipped
  with that reason, as swapping its class would lose its behaviour. (Blocks are adopted, not
  swapped, so their convs/BNs may be subclasses that keep the base forward.)
* **Train and eval.** Fused modules run the batch-statistics path in ``train()`` (updating the
  adopted BN's running statistics exactly like ``nn.BatchNorm2d``) and the folded single-launch path
  in ``eval()``; gradients reach every adopted parameter.
* **Layout.** NCHW inputs are accepted: the first fused module (the stem, or the first block) reads
  them into channels_last once; every fused module returns channels_last, so later ones keep it.
  Unfused modules in between (max-pool, a skipped block) see channels_last tensors.
* **unfuse.** A fused block remembers the original block object (not a registered submodule); its
  current submodules are put back into that object (so a submodule replaced after fusing is kept),
  and the object takes the block's place again. ``FusedConv2d``/``Folded*`` get their original
  classes back and the original ReLU object its slot. Modules that ``fuse`` did not create (e.g. the
  blocks of :mod:`fused_resnet.models`) are left as they are. Weights are never copied, so they are
  exactly those of the fused model.
* **Hooks.** A replaced block's hooks (forward, forward-pre, backward, state_dict and
  load_state_dict hooks, registered on the block object itself) are carried over to the fused
  block: it *shares* the original's hook dictionaries, so the handles the user holds still remove
  them, hooks run with the fused block as ``module`` argument, and after ``unfuse`` they are on the
  original again. The same holds for a stem's ReLU and its :class:`FoldedReLU` (whose input is
  already the ReLU's output). A stem's conv and BN keep their hooks (same objects), but their
  meaning changes: a hook on the conv sees the whole conv+BN+ReLU output, a hook on the BN sees
  its input unchanged (the BN is a no-op there). The report's reason names carried and changed
  hooks.
* **Stages.** An ``nn.Sequential`` (the exact class) whose children are all fused blocks (a
  ResNet's ``layer1`` ... ``layer4``) becomes a :class:`fused_resnet.nn.Stage` by a class swap (same
  object, children and keys; ``unfuse`` swaps back): in eval plans each block after the first may
  then write its output into its input, which only the stage holds (no hooks on the blocks, no
  global hooks). It is not a report entry (nothing is fused by it).
* **convert_sync_batchnorm after fuse.** :func:`fused_resnet.nn.convert_sync_batchnorm` converts
  a fused model too: blocks' adopted BNs become ``SyncBatchNorm``, a stem's
  :class:`FoldedBatchNorm2d` becomes a :class:`FoldedSyncBatchNorm` (same parameters), and the
  stem's fused op switches to it; ``unfuse`` then gives plain ``SyncBatchNorm`` back.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from . import backends

__all__ = [
    "fuse",
    "unfuse",
    "FuseResult",
    "FusionReport",
    "FusionEntry",
    "FusedConv2d",
    "FoldedBatchNorm2d",
    "FoldedSyncBatchNorm",
    "FoldedReLU",
]

_SYNC_NOTE = "SyncBatchNorm: batch statistics synchronized across its process group (sync_stats)"
_ORIGINAL = "_fused_resnet_original"  # fused block -> the block object it replaced (not registered)
_STAGE = "_fused_resnet_stage"  # Stage made by fuse -> the class it had (nn.Sequential)
_STEM = "_fused_resnet_stem"  # FusedConv2d -> _StemState (not registered)


def _fused_nn():
    """``fused_resnet.nn`` (imported on first use, so importing this module stays cheap)."""
    return importlib.import_module("fused_resnet.nn")


# ----------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class FusionEntry:
    """One candidate module: ``name`` (qualified, ``""`` for the root; ``a+b+c`` for a
    conv-BN-ReLU run), ``original`` (class path, ``+``-joined for runs), ``action``
    (``"fused"`` or ``"skipped"``), ``reason`` and ``fused_as`` (the replacement class, or None)."""

    name: str
    original: str
    action: str
    reason: str
    fused_as: str | None = None


@dataclass
class FusionReport:
    """What :func:`fuse` did: one :class:`FusionEntry` per candidate, in module order.

    ``backend`` is the backend stored on every fused module (None = auto); ``notes`` are
    model-wide remarks (e.g. the backend cannot run on the model's device).
    """

    entries: list[FusionEntry] = field(default_factory=list)
    backend: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def fused(self) -> list[FusionEntry]:
        return [e for e in self.entries if e.action == "fused"]

    @property
    def skipped(self) -> list[FusionEntry]:
        return [e for e in self.entries if e.action == "skipped"]

    @property
    def counts(self) -> dict[str, int]:
        """``{"fused": n, "skipped": m}``."""
        return {"fused": len(self.fused), "skipped": len(self.skipped)}

    def __getitem__(self, name: str) -> FusionEntry:
        """The entry whose qualified name is ``name`` (KeyError if none)."""
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(f"no fusion entry named {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``backend``, ``counts``, ``notes`` and ``entries`` (list of dicts)."""
        return {"backend": self.backend, "counts": self.counts, "notes": list(self.notes),
                "entries": [asdict(e) for e in self.entries]}

    def __str__(self) -> str:
        def short(path: str | None) -> str:
            return "-" if path is None else "+".join(p.rsplit(".", 1)[-1] for p in path.split("+"))

        rows = [("module", "original", "action", "fused as", "reason")]
        rows += [(e.name or "(root)", short(e.original), e.action, short(e.fused_as), e.reason) for e in self.entries]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [f"fusion report: {self.counts['fused']} fused, {self.counts['skipped']} skipped "
                 f"(backend: {self.backend or 'auto'})"]
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
            if i == 0:
                lines.append("  ".join("-" * w for w in widths) + "  " + "-" * len(r[4]))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


class FuseResult(NamedTuple):
    """What :func:`fuse` returns: the fused ``model`` and its :class:`FusionReport`."""

    model: nn.Module
    report: FusionReport


# ----------------------------------------------------------------------------- stem modules


@dataclass
class _StemState:
    op: nn.Module  # fused_resnet.nn.ConvBNAct over (this conv, bn)
    bn: nn.Module  # the BN (class swapped to Folded*), still registered where it was
    bn_class: type
    bn_name: str
    act_name: str | None


class FusedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (same parameters, same state_dict keys) whose forward is the fused
    ``relu?(bn(conv(x)))`` of itself and the BN that follows it, run by a
    :class:`fused_resnet.nn.ConvBNAct` over the same conv and BN objects.

    Made by :func:`fuse` by changing the class of an existing ``nn.Conv2d``; :func:`unfuse`
    changes it back. Input (N, C, H, W) in any layout; output channels_last. ``backend`` is the
    fused ops' backend (None = auto)."""

    def _stem(self) -> _StemState:
        return self.__dict__[_STEM]

    @property
    def backend(self) -> str | None:
        return self._stem().op.backend

    @backend.setter
    def backend(self, value: str | None) -> None:
        self._stem().op.backend = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self._stem()
        st.op.training = self.training  # not recursive: the BN keeps its own mode (see module docs)
        if st.op.unfused_reason() is not None:  # changed after fusing (e.g. padding_mode): run it eagerly
            y = st.bn_class.forward(st.bn, nn.Conv2d.forward(self, x))
            return torch.relu(y) if st.act_name else y
        return st.op(x)

    def extra_repr(self) -> str:
        st = self._stem()
        tail = f" + {st.act_name}" if st.act_name else ""
        return f"{super().extra_repr()}, fused with {st.bn_name}{tail}, backend={st.op.backend!r}"


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """An ``nn.BatchNorm2d`` whose normalisation is applied by the preceding :class:`FusedConv2d`.

    It keeps its parameters, buffers and state_dict keys (and the running statistics are still
    updated, by the fused conv, in training); its own forward returns the input unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return super().extra_repr() + ", applied by the preceding FusedConv2d"


class FoldedSyncBatchNorm(nn.SyncBatchNorm):
    """An ``nn.SyncBatchNorm`` whose normalisation (with statistics synchronized across its process
    group in training) is applied by the preceding :class:`FusedConv2d`; same parameters, buffers
    and state_dict keys; its own forward returns the input unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return super().extra_repr() + ", applied by the preceding FusedConv2d"


_FOLDED_FROZEN: type | None = None


def _folded_frozen_class() -> type:
    """:class:`FoldedFrozenBatchNorm2d`, created on first use (it subclasses torchvision's
    ``FrozenBatchNorm2d``, and importing torchvision is not free)."""
    global _FOLDED_FROZEN
    if _FOLDED_FROZEN is None:
        from torchvision.ops import FrozenBatchNorm2d

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

        _FOLDED_FROZEN = type("FoldedFrozenBatchNorm2d", (FrozenBatchNorm2d,), {
            "__module__": __name__,
            "__qualname__": "FoldedFrozenBatchNorm2d",
            "__doc__": "A torchvision ``FrozenBatchNorm2d`` applied by the preceding :class:`FusedConv2d` "
                       "(same buffers and keys; forward returns the input).",
            "forward": forward,
        })
    return _FOLDED_FROZEN


def __getattr__(name: str):  # PEP 562: `fused_resnet.convert.FoldedFrozenBatchNorm2d` (also for pickle)
    if name == "FoldedFrozenBatchNorm2d":
        return _folded_frozen_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class FoldedReLU(nn.Identity):
    """Takes the slot of a ReLU that the preceding :class:`FusedConv2d` applies. Parameter-free,
    so no state_dict key changes; remembers the original module for :func:`unfuse`."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.__dict__[_ORIGINAL] = original  # not registered: it is not part of the model now

    def extra_repr(self) -> str:
        return "applied by the preceding FusedConv2d"


# ----------------------------------------------------------------------------- detection


def _cls_path(obj) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def _overrides(obj, base: type, method: str = "forward") -> bool:
    return getattr(type(obj), method) is not getattr(base, method)


def _frozen_bn_class() -> type | None:
    mod = sys.modules.get("torchvision.ops.misc")
    return getattr(mod, "FrozenBatchNorm2d", None) if mod is not None else None


def _block_classes() -> list[tuple[str, type]]:
    """(family, class) of the residual blocks we know, from libraries already imported (a model
    holding their blocks has imported them)."""
    out = []
    tv = sys.modules.get("torchvision.models.resnet")
    if tv is not None:
        out += [("torchvision", tv.BasicBlock), ("torchvision", tv.Bottleneck)]
    timm = sys.modules.get("timm.models.resnet")
    if timm is not None:
        out += [("timm", timm.BasicBlock), ("timm", timm.Bottleneck)]
    return out


def _resnet_classes() -> list[tuple[str, type]]:
    out = []
    tv = sys.modules.get("torchvision.models.resnet")
    if tv is not None:
        out.append(("torchvision", tv.ResNet))
    timm = sys.modules.get("timm.models.resnet")
    if timm is not None:
        out.append(("timm", timm.ResNet))
    return out


def _match(obj, classes):
    for family, cls in classes:
        if isinstance(obj, cls):
            return family, cls
    return None


def _conv_problem(name: str, conv) -> str | None:
    if not isinstance(conv, nn.Conv2d):
        return f"{name} is {type(conv).__name__}, not nn.Conv2d"
    if type(conv) is not nn.Conv2d and _overrides(conv, nn.Conv2d):
        return f"{name} is {type(conv).__name__}, an nn.Conv2d subclass with its own forward"
    if conv.padding_mode != "zeros":
        return f"{name} has padding_mode={conv.padding_mode!r}; only 'zeros' is fused"
    return None


def _norm_problem(name: str, bn) -> str | None:
    frozen = _frozen_bn_class()
    if isinstance(bn, nn.SyncBatchNorm):
        if type(bn) is not nn.SyncBatchNorm and _overrides(bn, nn.SyncBatchNorm):
            return f"{name} is {type(bn).__name__}, a SyncBatchNorm subclass with its own forward"
        return None
    if isinstance(bn, nn.BatchNorm2d):
        if type(bn) is not nn.BatchNorm2d and _overrides(bn, nn.BatchNorm2d):
            return f"{name} is {type(bn).__name__}, a BatchNorm2d subclass with its own forward"
        return None
    if frozen is not None and isinstance(bn, frozen):
        if type(bn) is not frozen and _overrides(bn, frozen):
            return f"{name} is {type(bn).__name__}, a FrozenBatchNorm2d subclass with its own forward"
        return None
    return f"{name} is {_cls_path(bn)}, not nn.BatchNorm2d, nn.SyncBatchNorm or torchvision.ops.FrozenBatchNorm2d"


def _act_problem(name: str, act) -> str | None:
    if type(act) is not nn.ReLU:
        return f"{name} is {type(act).__name__}, not nn.ReLU"
    return None


# The hook registries of an nn.Module that count as "hooks on this module" in the report (the
# *_with_kwargs / *_always_called companions hold flags for the same hook ids).
_HOOK_KINDS = (("_forward_pre_hooks", "forward-pre"), ("_forward_hooks", "forward"),
               ("_backward_pre_hooks", "backward-pre"), ("_backward_hooks", "backward"),
               ("_state_dict_pre_hooks", "state_dict-pre"), ("_state_dict_hooks", "state_dict"),
               ("_load_state_dict_pre_hooks", "load_state_dict-pre"),
               ("_load_state_dict_post_hooks", "load_state_dict-post"))


def _hooks_of(m: nn.Module) -> str:
    """``"2 forward, 1 forward-pre"``: the hooks registered on ``m`` itself ("" if none)."""
    parts = [f"{len(d)} {kind}" for attr, kind in _HOOK_KINDS if (d := getattr(m, attr, None))]
    return ", ".join(parts)


def _share_hooks(src: nn.Module, dst: nn.Module) -> None:
    """Make ``dst`` use ``src``'s hook registries (the same dict objects, not copies): its hooks run
    on ``dst``, and the ``RemovableHandle`` s the user holds (weak references to those dicts) still
    remove them. Every ``nn.Module`` attribute whose name contains "hook" is shared, so registries
    added by newer torch versions come along too."""
    for name, value in vars(src).items():
        if "hook" in name:
            dst.__dict__[name] = value


def _absent(m) -> bool:
    return m is None or type(m) is nn.Identity


def _block_problems(block, family: str, cls: type) -> list[str]:
    """Why ``block`` (a torchvision/timm BasicBlock/Bottleneck) cannot be fused; [] if it can."""
    problems = []
    if type(block) is not cls and _overrides(block, cls):
        problems.append(f"{type(block).__name__} overrides {cls.__name__}.forward")
    n = 3 if hasattr(block, "conv3") else 2
    for i in range(1, n + 1):
        for p in (_conv_problem(f"conv{i}", getattr(block, f"conv{i}", None)),
                  _norm_problem(f"bn{i}", getattr(block, f"bn{i}", None))):
            if p:
                problems.append(p)
    if family == "torchvision":
        p = _act_problem("relu", getattr(block, "relu", None))
        if p:
            problems.append(p)
    else:  # timm: the features the fused block does not implement
        for i in range(1, n + 1):
            p = _act_problem(f"act{i}", getattr(block, f"act{i}", None))
            if p:
                problems.append(p)
        se = getattr(block, "se", None)
        if se is not None:
            problems.append(f"attention se={type(se).__name__} is not fused")
        if not _absent(getattr(block, "aa", None)):
            problems.append(f"anti-aliasing aa={type(block.aa).__name__} is not fused")
        if not _absent(getattr(block, "drop_block", None)):
            problems.append(f"drop_block={type(block.drop_block).__name__} is not fused")
        dp = getattr(block, "drop_path", None)
        if not _absent(dp):
            p = getattr(dp, "drop_prob", None)
            problems.append(f"drop_path={type(dp).__name__}" + (f"({p:.3g})" if isinstance(p, float) else "")
                            + " is not fused")
    return problems


# ----------------------------------------------------------------------------- fuse


class _Fuser:
    def __init__(self, root: nn.Module, backend: str | None):
        self.backend = backend
        self.report = FusionReport(backend=backend)
        self.blocks = _block_classes()
        self.resnets = _resnet_classes()
        # how many places each module object is registered at (shared modules are not fused)
        self.uses: dict[int, int] = {}
        for _, m in root.named_modules(remove_duplicate=False):
            self.uses[id(m)] = self.uses.get(id(m), 0) + 1
        self.done: set[int] = set()

    def add(self, name, original, action, reason, fused_as=None):
        self.report.entries.append(FusionEntry(name, original, action, reason, fused_as))

    # -- blocks

    def try_block(self, block: nn.Module, name: str) -> nn.Module | None:
        """The fused replacement of ``block`` (and a report entry), or None if it is no block."""
        fnn = sys.modules.get("fused_resnet.nn")
        if fnn is not None and isinstance(block, (fnn.BasicBlock, fnn.Bottleneck)):
            self.add(name, _cls_path(block), "skipped", "already a fused_resnet block")
            return None
        hit = _match(block, self.blocks)
        if hit is None:
            return None
        family, cls = hit
        problems = _block_problems(block, family, cls)
        if not problems:
            shared = [n for n, c in block.named_children() if self.uses.get(id(c), 1) > 1]
            if shared:
                problems.append(f"submodule(s) {', '.join(shared)} also registered elsewhere in the model")
        if problems:
            self.add(name, _cls_path(block), "skipped", "; ".join(problems))
            return None
        fnn = _fused_nn()
        target = fnn.Bottleneck if hasattr(block, "conv3") else fnn.BasicBlock
        try:
            with _modes_kept(block):
                fused = target.from_module(block, backend=self.backend)
        except (ValueError, TypeError, NotImplementedError) as e:
            self.add(name, _cls_path(block), "skipped", f"{target.__name__}.from_module: {e}")
            return None
        fused.__dict__[_ORIGINAL] = block
        fused.training = block.training
        reason = self._block_reason(block)
        if hooks := _hooks_of(block):
            reason += f"; hooks carried over to the fused block ({hooks})"
        _share_hooks(block, fused)
        self.add(name, _cls_path(block), "fused", reason, _cls_path(fused))
        return fused

    @staticmethod
    def _block_reason(block) -> str:
        ds = getattr(block, "downsample", None)
        if ds is None:
            short = "identity shortcut"
        elif (isinstance(ds, nn.Sequential) and len(ds) >= 2 and isinstance(ds[-2], nn.Conv2d)
              and _norm_problem("", ds[-1]) is None):
            before = [type(m).__name__ for m in list(ds)[:-2] if type(m) is not nn.Identity]
            pre = f" (after {', '.join(before)})" if before else ""
            short = f"projection shortcut conv+BN fused{pre}"
        else:
            short = f"downsample {type(ds).__name__} runs unfused, added as the residual"
        norms = [getattr(block, f"bn{i}", None) for i in (1, 2, 3)]
        norms += list(ds) if isinstance(ds, nn.Sequential) else []
        if any(isinstance(m, nn.SyncBatchNorm) for m in norms):
            short += "; " + _SYNC_NOTE
        return short

    # -- conv -> bn -> relu

    def try_cba(self, slots, names, relu: bool, report_mismatch: bool) -> bool:
        """Fuse conv, bn[, act] given as (parent, attribute) slots. Returns True if fused."""
        mods = [p._modules.get(a) for p, a in slots]
        conv, bn = mods[0], mods[1]
        act = mods[2] if relu else None
        label = "+".join(names)
        original = "+".join(_cls_path(m) for m in mods)
        if isinstance(conv, FusedConv2d):
            self.add(label, original, "skipped", "already fused")
            return False
        problems = [p for p in (_conv_problem(names[0], conv), _norm_problem(names[1], bn),
                                _act_problem(names[2], act) if relu else None) if p]
        if not problems:  # the conv and BN change class in place: only the exact classes (see module docs)
            frozen = _frozen_bn_class()
            if type(conv) is not nn.Conv2d:
                problems.append(f"{names[0]} is {type(conv).__name__}, a subclass of nn.Conv2d (e.g. parametrized); "
                                "only an exact nn.Conv2d is fused in place")
            if type(bn) not in (nn.BatchNorm2d, nn.SyncBatchNorm) and (frozen is None or type(bn) is not frozen):
                problems.append(f"{names[1]} is {type(bn).__name__}, a subclass; only an exact nn.BatchNorm2d, "
                                "nn.SyncBatchNorm or FrozenBatchNorm2d is fused in place")
        problems += [f"{n} is also registered elsewhere in the model"
                     for n, m in zip(names, mods, strict=True) if self.uses.get(id(m), 1) > 1]
        if problems:
            if report_mismatch:
                self.add(label, original, "skipped", "; ".join(problems))
            return False
        try:
            with _modes_kept(conv, bn):
                op = _fused_nn().ConvBNAct.from_modules(conv, bn, relu=relu, backend=self.backend)
        except (ValueError, TypeError, NotImplementedError) as e:
            self.add(label, original, "skipped", f"ConvBNAct.from_modules: {e}")
            return False
        frozen = _frozen_bn_class()
        bn_class = type(bn)
        if frozen is not None and isinstance(bn, frozen):
            folded = _folded_frozen_class()
        elif isinstance(bn, nn.SyncBatchNorm):
            folded = FoldedSyncBatchNorm
        else:
            folded = FoldedBatchNorm2d
        notes = []
        if isinstance(bn, nn.SyncBatchNorm):
            notes.append(_SYNC_NOTE)
        if hooks := _hooks_of(conv):
            notes.append(f"hooks on {names[0]} ({hooks}) now see the fused conv+BN{'+ReLU' if relu else ''} output")
        if hooks := _hooks_of(bn):
            notes.append(f"hooks on {names[1]} ({hooks}) see its input unchanged (the BN is applied by the conv)")
        conv.__dict__[_STEM] = _StemState(op, bn, bn_class, names[1], names[2] if relu else None)
        conv.__dict__[_ORIGINAL] = type(conv)
        object.__setattr__(conv, "__class__", FusedConv2d)
        object.__setattr__(bn, "__class__", folded)
        if relu:
            parent, attr = slots[2]
            folded_relu = FoldedReLU(act)
            if hooks := _hooks_of(act):
                notes.append(f"hooks on {names[2]} ({hooks}) carried over to its FoldedReLU (input: the ReLU's output)")
            _share_hooks(act, folded_relu)
            setattr(parent, attr, folded_relu)
        reason = "conv+BN+ReLU as one ConvBNAct" if relu else "conv+BN as one ConvBNAct"
        self.add(label, original, "fused", "; ".join([reason, *notes]), _cls_path(op))
        self.done.update(id(m) for m in mods)
        return True

    def sequential_runs(self, seq: nn.Sequential, prefix: str) -> None:
        """Fuse (Conv2d, BN, ReLU) runs of consecutive children of an ``nn.Sequential``."""
        if type(seq) is not nn.Sequential and _overrides(seq, nn.Sequential):
            return
        keys = list(seq._modules)
        i = 0
        while i + 2 < len(keys):
            c, b, a = (seq._modules[k] for k in keys[i:i + 3])
            norm_like = isinstance(b, (nn.BatchNorm2d, nn.SyncBatchNorm)) or (
                _frozen_bn_class() is not None and isinstance(b, _frozen_bn_class()))
            if isinstance(c, nn.Conv2d) and norm_like and isinstance(a, nn.ReLU) and not isinstance(c, FusedConv2d):
                names = [_join(prefix, k) for k in keys[i:i + 3]]
                if self.try_cba([(seq, k) for k in keys[i:i + 3]], names, True, report_mismatch=True):
                    i += 3
                    continue
            i += 1

    def resnet_stem(self, model: nn.Module, prefix: str, family: str, cls: type) -> None:
        act_attr = "relu" if family == "torchvision" else "act1"
        names = [_join(prefix, "conv1"), _join(prefix, "bn1"), _join(prefix, act_attr)]
        method = "_forward_impl" if family == "torchvision" else "forward_features"
        native = getattr(sys.modules.get("fused_resnet.models._common"), "FusedModelMixin", None)
        if native is not None and isinstance(model, native):
            self.add("+".join(names), _cls_path(model), "skipped", "already fused (a fused_resnet.models model)")
            return
        if type(model) is not cls and (_overrides(model, cls, method) or _overrides(model, cls)):
            self.add("+".join(names), _cls_path(model), "skipped",
                     f"{type(model).__name__} overrides {cls.__name__}.{method}/forward; the stem is not fused")
            return
        conv1 = model.conv1
        if isinstance(conv1, nn.Sequential) and len(conv1) > 0:  # timm deep stem
            self.sequential_runs(conv1, names[0])
            self.done.add(id(conv1))
            last = list(conv1._modules)[-1]
            slots = [(conv1, last), (model, "bn1"), (model, act_attr)]
            names[0] = _join(names[0], last)
        else:
            slots = [(model, "conv1"), (model, "bn1"), (model, act_attr)]
        self.try_cba(slots, names, True, report_mismatch=True)

    # -- the walk

    def visit(self, module: nn.Module, prefix: str) -> None:
        hit = _match(module, self.resnets)
        if hit is not None:
            self.resnet_stem(module, prefix, *hit)
        if isinstance(module, nn.Sequential):
            self.sequential_runs(module, prefix)
        for attr, child in list(module._modules.items()):
            if child is None or id(child) in self.done:
                continue
            self.done.add(id(child))
            qual = _join(prefix, attr)
            fused = self.try_block(child, qual)
            if fused is not None:
                module._modules[attr] = fused
                self.done.add(id(fused))
            elif not isinstance(child, (FusedConv2d, FoldedReLU)):
                self.visit(child, qual)
        fnn = sys.modules.get("fused_resnet.nn")
        if (fnn is not None and type(module) is nn.Sequential and len(module) > 1
                and all(isinstance(c, (fnn.BasicBlock, fnn.Bottleneck)) for c in module)):
            module.__dict__[_STAGE] = nn.Sequential
            object.__setattr__(module, "__class__", fnn.Stage)


@contextlib.contextmanager
def _modes_kept(*modules: nn.Module):
    """Restore the train/eval flag of every module in ``modules`` (and below) on exit.

    ``from_module``/``from_modules`` put the new module in the given block's/BN's mode with a
    recursive ``train()``; a model whose BNs were frozen individually (``bn.eval()`` inside a
    training model) must keep exactly the flags it had."""
    flags = [(m, m.training) for top in modules for m in top.modules()]
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _check_model(model, fn: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(f"{fn}: model: expected an eager torch.nn.Module, got a TorchScript module "
                        f"({type(model).__name__}); fuse the eager model, then script/compile it")


def _check_backend(backend) -> str | None:
    if backend is None:
        return None
    if not isinstance(backend, str) or backend.lower() not in backends.BACKENDS + ("auto",):
        raise ValueError(f"backend: expected None or one of {', '.join(backends.BACKENDS)}, 'auto'; got {backend!r}")
    return backend.lower()


def _first_tensor(model: nn.Module) -> torch.Tensor | None:
    for t in model.parameters():
        return t
    for t in model.buffers():
        return t
    return None


def fuse(model: nn.Module, inplace: bool = False, backend: str | None = None) -> FuseResult:
    """Replace every fusable residual block, stem and conv-BN-ReLU run of ``model`` by fused modules.

    Args:
        model: any ``nn.Module`` (torchvision ResNet/ResNeXt/Wide ResNet, timm ResNet family, a
            model built from torchvision blocks, or a single block).
        inplace: modify ``model`` itself (True) or a deep copy (False, default).
        backend: the fused ops' backend stored on every fused module: None (auto, or the
            ``FUSED_RESNET_BACKEND`` variable at call time), ``"auto"``, ``"torch"``, ``"cpu"``,
            ``"cuda"`` or ``"triton"``.

    Returns:
        ``FuseResult(model, report)``: the fused model (``model`` itself when ``inplace``, else
        the copy) and a :class:`FusionReport` of each candidate fused or skipped, with reasons.
        Parameters and buffers are the original ones (shared, never copied beyond the deep copy),
        so state_dict keys and values are unchanged.

    Raises:
        TypeError: ``model`` is not an eager ``nn.Module``.
        ValueError: ``backend`` is not a known backend name.
    """
    _check_model(model, "fuse")
    backend = _check_backend(backend)
    if not isinstance(inplace, bool):
        raise TypeError(f"fuse: inplace: expected a bool, got {type(inplace).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    fuser = _Fuser(model, backend)
    root = fuser.try_block(model, "")
    if root is not None:
        model = root
    else:
        fuser.visit(model, "")
    t = _first_tensor(model)
    if backend not in (None, "auto") and t is not None and fuser.report.fused:
        why = backends.unsupported_reason(backend, t.device, t.dtype, "conv_bn_act")
        if why is not None:
            fuser.report.notes.append(f"backend {backend!r} cannot run this model ({why}); its calls will fall "
                                      f"back to another backend with a FallbackWarning")
    return FuseResult(model, fuser.report)


def _stem_bns(model: nn.Module) -> dict[int, FusedConv2d]:
    """``{id(bn): conv}`` for every :class:`FusedConv2d` in ``model`` and the BN it applies."""
    return {id(m.__dict__[_STEM].bn): m for m in model.modules() if isinstance(m, FusedConv2d)}


def _rebind_stem_bn(conv: FusedConv2d, bn: nn.Module, bn_class: type) -> None:
    """Point a fused stem at a new BN object (already in the old one's slot; class swapped to its
    Folded* class by the caller); ``bn_class`` is what :func:`unfuse` restores."""
    st: _StemState = conv.__dict__[_STEM]
    st.op.bn = bn
    st.op._fold_cache.clear()
    st.bn, st.bn_class = bn, bn_class


# ----------------------------------------------------------------------------- unfuse


def _restore_block(fused: nn.Module) -> nn.Module:
    original = fused.__dict__[_ORIGINAL]
    for name in list(original._modules):
        if name in fused._modules:  # put back the current child (it may have been replaced since)
            original._modules[name] = fused._modules[name]
        elif original._modules[name] is not None:  # parameter-free extras (act1, aa, ...): the mode
            for m in original._modules[name].modules():
                m.training = fused.training
    original.training = fused.training
    return original


def _restore_stems(model: nn.Module) -> None:
    for m in list(model.modules()):
        if _STAGE in m.__dict__:
            object.__setattr__(m, "__class__", m.__dict__.pop(_STAGE))
        if isinstance(m, FusedConv2d):
            st: _StemState = m.__dict__.pop(_STEM)
            object.__setattr__(m, "__class__", m.__dict__.pop(_ORIGINAL))
            object.__setattr__(st.bn, "__class__", st.bn_class)


def _restore_children(module: nn.Module) -> None:
    for attr, child in list(module._modules.items()):
        if child is None:
            continue
        if isinstance(child, FoldedReLU):
            module._modules[attr] = child.__dict__[_ORIGINAL]
            continue
        if _ORIGINAL in child.__dict__ and not isinstance(child, FusedConv2d):
            child = _restore_block(child)
            module._modules[attr] = child
        _restore_children(child)


def unfuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Undo :func:`fuse`: every module it replaced or changed gets its original class back.

    Args:
        model: a model returned by :func:`fuse` (any other module is returned unchanged).
        inplace: modify ``model`` itself (True) or a deep copy (False, default).

    Returns:
        The unfused model (``model`` itself when ``inplace`` and the root is not a fused block).
        Its parameters and buffers are the fused model's (values exact), and its outputs equal
        those of the model before :func:`fuse`.

    Raises:
        TypeError: ``model`` is not an eager ``nn.Module``.
    """
    _check_model(model, "unfuse")
    if not isinstance(inplace, bool):
        raise TypeError(f"unfuse: inplace: expected a bool, got {type(inplace).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    _restore_stems(model)
    if _ORIGINAL in model.__dict__ and not isinstance(model, (FusedConv2d, FoldedReLU)):
        model = _restore_block(model)
    if isinstance(model, FoldedReLU):
        return model.__dict__[_ORIGINAL]
    _restore_children(model)
    return model
