"""The fastest inference form of a trained model: BatchNorm folded into its conv, channels_last, optional
bf16 weights and an optional graph compiler, verified against the eval-mode original.

Folding works in place on a deep copy and keeps the model's own classes, hooks and methods: each folded
conv gets ``W * gamma / sqrt(var + eps)`` and the matching bias (``torch.nn.utils.fusion``), and its
BatchNorm becomes a :class:`FoldedBatchNorm2d` (an identity whose statistics are those of the identity, so
code that reads a BN's affine form, such as Decoupling's gathered execution, stays correct). Per-input
execution (DRIB's decision hooks, Decoupling's controllers) therefore keeps working.

Conv -> BN pairs come from a ``torch.fx`` trace where the model traces (a conv whose only user is a BN),
else from one probe forward that records which BN reads a conv's output tensor directly. Convs with
forward hooks (their output is rewritten before the BN) and BNs with pre-hooks are never folded.
Every fold is checked on an example batch; a difference above tolerance raises :class:`DeployError`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import types
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

log = logging.getLogger("icnn.deploy")

FOLD_TOLERANCE = 1e-4  # max |logit difference| of the fp32 fold, scaled by max(1, max |logit|)
COMPILERS = ("jit", "inductor")
DEFAULT_INPUT_SIZE = (3, 32, 32)


class DeployError(RuntimeError):
    """The deployed form does not reproduce the eval-mode original (or cannot be built)."""


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm whose scale and shift now live in the preceding conv: the identity in eval mode."""

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            raise RuntimeError("a folded BatchNorm is for inference only; fold a fresh copy after training")
        return x


@dataclass
class DeployInfo:
    """What :func:`deploy` did: folded pairs, pair-finding method, dtype, compiler and the check."""

    folded: int = 0
    unfolded_bns: list[str] = field(default_factory=list)
    pairing: str = ""
    dtype: str = "fp32"
    channels_last: bool = True
    compiler: str | None = None
    max_logit_diff: float = float("nan")
    top1_agreement: float = float("nan")
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ---------------------------------------------------------------------------------------------------
# copying


def deepcopy_module(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also re-points hook closures at the copy's modules.

    ``deepcopy`` treats functions as atoms, so a hook made by a closure (``lambda`` over a gate module)
    would keep calling the *original* module; here every hook closure that captured an object of the
    original model captures its copy instead.
    """
    memo: dict[int, Any] = {}
    clone = copy.deepcopy(model, memo)
    for module in clone.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key, hook in list(hooks.items()):
                hooks[key] = _rebind(hook, memo)
    return clone


def _rebind(fn: Any, memo: dict[int, Any]) -> Any:
    if not isinstance(fn, types.FunctionType) or not fn.__closure__:
        return fn
    cells = []
    changed = False
    for cell in fn.__closure__:
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            cells.append(cell)
            continue
        if id(value) in memo:
            cells.append(types.CellType(memo[id(value)]))
            changed = True
        else:
            cells.append(cell)
    if not changed:
        return fn
    new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, tuple(cells))
    new.__kwdefaults__ = fn.__kwdefaults__
    return new


# ---------------------------------------------------------------------------------------------------
# finding conv -> BN pairs


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and bn.track_running_stats
            and bn.running_mean is not None and conv.out_channels == bn.num_features
            and not conv._forward_hooks and not bn._forward_pre_hooks)


def _pairs_by_fx(model: nn.Module) -> list[tuple[str, str]] | None:
    """Conv -> BN edges of a ``torch.fx`` trace (the conv's output has no other user); None if untraceable."""
    try:  # trace a throwaway copy: tracing runs forward code that may store proxies on the modules
        graph = torch.fx.symbolic_trace(copy.deepcopy(model)).graph
    except Exception as exc:  # fx raises many types for Python control flow
        log.info("fx cannot trace %s (%s); finding conv -> BN pairs with a probe forward",
                 type(model).__name__, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        source = node.args[0] if node.args else None
        if (isinstance(source, torch.fx.Node) and source.op == "call_module" and len(source.users) == 1
                and isinstance(modules.get(source.target), nn.Conv2d)):
            pairs.append((str(source.target), str(node.target)))
    return pairs


@torch.no_grad()
def _pairs_by_probe(model: nn.Module, example: Tensor) -> list[tuple[str, str]]:
    """Conv -> BN pairs where the BN's input is exactly the conv's output tensor in one forward."""
    names = {id(m): n for n, m in model.named_modules()}
    outputs: dict[int, str] = {}
    pairs: dict[str, str] = {}
    handles = []

    def conv_hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        outputs[id(output)] = names[id(module)]

    def bn_hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        conv = outputs.get(id(inputs[0]))
        if conv is not None:
            pairs.setdefault(names[id(module)], conv)

    kept: list[Tensor] = []  # keep conv outputs alive so that ids stay unique during the probe

    def keep(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        kept.append(output)

    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
            handles.append(module.register_forward_hook(keep))
        elif isinstance(module, nn.BatchNorm2d):
            handles.append(module.register_forward_pre_hook(bn_hook))
    try:
        model(example)
    finally:
        for handle in handles:
            handle.remove()
    return [(conv, bn) for bn, conv in pairs.items()]


# ---------------------------------------------------------------------------------------------------
# folding


def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                        bn.weight, bn.bias)
    conv.weight, conv.bias = weight, bias
    with torch.no_grad():  # the statistics of the identity: code reading the BN's affine form gets 1 and 0
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
        if bn.weight is not None:
            bn.weight.fill_(1.0)
            bn.bias.zero_()
    bn.__class__ = FoldedBatchNorm2d


def _example_for(model: nn.Module, example: Tensor | None) -> Tensor:
    if example is not None:
        return example
    size = tuple(getattr(model, "input_size", DEFAULT_INPUT_SIZE))
    return torch.rand(4, *size, generator=torch.Generator().manual_seed(0))


def _logits(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    raise DeployError(f"the model returned {type(output).__name__}; expected logits (a tensor)")


@torch.no_grad()
def _compare(reference: Tensor, candidate: Tensor) -> tuple[float, float]:
    reference, candidate = reference.float().cpu(), candidate.float().cpu()
    if reference.shape != candidate.shape:
        raise DeployError(f"deployed form returns shape {tuple(candidate.shape)}, original {tuple(reference.shape)}")
    if not torch.isfinite(candidate).all():
        raise DeployError("the deployed form returns non-finite logits")
    diff = float((reference - candidate).abs().max()) if reference.numel() else 0.0
    agree = float((reference.argmax(-1) == candidate.argmax(-1)).double().mean()) if reference.dim() > 1 else 1.0
    return diff, agree


def _fold_into(model: nn.Module, example: Tensor, info: DeployInfo) -> None:
    pairs = None
    if not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        pairs = _pairs_by_fx(model)  # fx ignores hooks, so hooked models always take the probe
        info.pairing = "fx"
    if pairs is None:
        pairs = _pairs_by_probe(model, example)
        info.pairing = "probe"
    modules = dict(model.named_modules())
    folded: set[str] = set()
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        if bn_name in folded or not _foldable(conv, bn):
            continue
        _fold_pair(conv, bn)  # type: ignore[arg-type]
        folded.add(bn_name)
    info.folded = len(folded)
    info.unfolded_bns = [n for n, m in modules.items()
                         if isinstance(m, nn.BatchNorm2d) and not isinstance(m, FoldedBatchNorm2d)]
    if info.unfolded_bns:
        info.notes.append(f"{len(info.unfolded_bns)} BatchNorm(s) not folded (no conv feeds them directly): "
                          f"{', '.join(info.unfolded_bns[:3])}")


def fold_batchnorm(model: nn.Module, *, example: Tensor | None = None,
                   tolerance: float = FOLD_TOLERANCE) -> nn.Module:
    """A deep copy of ``model`` in eval mode with every BatchNorm that directly follows a conv folded into it.

    ``example`` (pixels, default: 4 random images of ``model.input_size`` or 3 x 32 x 32) is used to find
    pairs when the model does not trace with fx and to verify the fold: a max logit difference above
    ``tolerance * max(1, max |logit|)`` raises :class:`DeployError`. ``folded.deploy_info`` says what was done.
    """
    example = _example_for(model, example)
    original = deepcopy_module(model).eval()
    with torch.no_grad():
        reference = _logits(original(example))
    folded = deepcopy_module(model).eval()
    info = DeployInfo(channels_last=False)
    _fold_into(folded, example, info)
    with torch.no_grad():
        candidate = _logits(folded(example))
    info.max_logit_diff, info.top1_agreement = _compare(reference, candidate)
    limit = tolerance * max(1.0, float(reference.abs().max()))
    if info.max_logit_diff > limit:
        raise DeployError(f"folding BatchNorm changed the logits of {type(model).__name__} by "
                          f"{info.max_logit_diff:.3g} (> {limit:.3g}); {info.folded} pairs folded by {info.pairing}")
    folded.deploy_info = info  # type: ignore[attr-defined]
    return folded


# ---------------------------------------------------------------------------------------------------
# the deployed form


class DeployedModel(nn.Module):
    """Pixels (fp32, any layout) in, fp32 logits out; runs ``net`` in its dtype and memory format under
    ``torch.no_grad`` (an inference form: no gradients flow through it). ``autocast``: run an fp32 ``net``
    under bf16 autocast (the fallback for models whose code does not run with bf16 weights)."""

    def __init__(self, net: nn.Module, dtype: torch.dtype, channels_last: bool, info: DeployInfo,
                 runner: Any = None, autocast: bool = False):
        super().__init__()
        self.net = net
        self.dtype = dtype
        self.channels_last = channels_last
        self.autocast = autocast
        self.deploy_info = info
        self.set_runner(runner)

    def set_runner(self, runner: Any) -> None:
        """A traced / compiled callable to run instead of ``net`` (None: ``net``); kept unregistered so that
        the state dict holds the weights once."""
        self.__dict__["_runner"] = runner

    def prepare(self, x: Tensor) -> Tensor:
        x = x.to(self.dtype)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, x: Tensor) -> Any:
        cast = (torch.autocast(device_type=x.device.type, dtype=torch.bfloat16) if self.autocast
                else contextlib.nullcontext())
        with torch.no_grad(), cast:
            runner = self._runner if self._runner is not None else self.net
            out = runner(self.prepare(x))
        if isinstance(out, Tensor):
            return out.float()
        return out

    def train(self, mode: bool = True) -> DeployedModel:
        if mode:
            raise RuntimeError("a deployed model is for inference only; train the original model")
        return super().train(False)


def _compile(deployed: DeployedModel, compiler: str, example: Tensor, info: DeployInfo) -> None:
    has_hooks = any(m._forward_hooks or m._forward_pre_hooks for m in deployed.net.modules())
    if compiler == "jit":
        if has_hooks or deployed.autocast or _pairs_by_fx(deployed.net) is None:
            # A trace freezes Python control flow and per-input decisions: wrong on other inputs.
            info.notes.append("jit skipped: the model has hooks, per-input Python control flow or runs under autocast")
            log.warning("deploy: jit skipped for %s (hooks or per-input control flow); running eager",
                        type(deployed.net).__name__)
            return
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but still the fastest here
            traced = torch.jit.trace(deployed.net, deployed.prepare(example), check_trace=False)
            runner = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
    else:
        runner = torch.compile(deployed.net, mode="max-autotune-no-cudagraphs", dynamic=False)
    deployed.set_runner(runner)
    info.compiler = compiler


def _failure(form: DeployedModel, example: Tensor) -> str | None:
    """Why ``form`` cannot run ``example`` (an exception or non-finite logits), or None when it can."""
    try:
        out = _logits(form(example))
    except (RuntimeError, TypeError, ValueError) as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None if bool(torch.isfinite(out).all()) else "non-finite logits"


def _bf16_form(folded: nn.Module, channels_last: bool, info: DeployInfo, example: Tensor,
               weights: bool = True) -> DeployedModel:
    """bf16 weights where the model's code runs with them; else bf16 autocast over the fp32 weights (a
    method may keep plain fp32 tensors or do arithmetic that bf16 weights break), with a note and a warning."""
    if not weights:
        info.dtype = "bf16 autocast"
        return DeployedModel(folded, torch.float32, channels_last, info, autocast=True).eval()
    form = DeployedModel(deepcopy_module(folded).to(torch.bfloat16), torch.bfloat16, channels_last, info).eval()
    problem = _failure(form, example)
    if problem is None:
        info.dtype = "bf16"
        return form
    info.dtype = "bf16 autocast"
    info.notes.append(f"bf16 weights failed ({problem}); running bf16 autocast over fp32 weights")
    log.warning("deploy %s: bf16 weights failed (%s); using bf16 autocast over fp32 weights",
                type(folded).__name__, problem)
    return DeployedModel(folded, torch.float32, channels_last, info, autocast=True).eval()


def deploy(model: nn.Module, *, bf16: bool = False, compile: str | None = None,
           example: Tensor | None = None, channels_last: bool = True, bf16_weights: bool = True,
           tolerance: float = FOLD_TOLERANCE) -> DeployedModel:
    """The fastest inference form of ``model``: BN folded (:func:`fold_batchnorm`), ``channels_last``,
    optionally bf16 weights and a compiler (``compile``: ``"jit"`` = trace + freeze +
    ``optimize_for_inference``, only for models without hooks or per-input control flow; ``"inductor"`` =
    ``torch.compile``). Runs on the device of ``model``'s parameters.

    Verified on ``example`` against the eval-mode original; the max logit difference and the share of
    unchanged top-1 predictions are logged and kept in ``deployed.deploy_info``. With ``bf16``, weights
    are cast to bf16 (``bf16_weights``, the fastest) unless the model's code fails or returns non-finite
    logits with them; then, or with ``bf16_weights=False``, the fp32 weights run under bf16 autocast
    (``deploy_info.dtype`` says which). The fp32 fold must match
    within ``tolerance``; bf16 forms are reported, not bounded (bf16 keeps ~3 significant digits).
    """
    if compile is not None and compile not in COMPILERS:
        raise ValueError(f"compile must be None or one of {', '.join(COMPILERS)}, got {compile!r}")
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    example = _example_for(model, example).to(device)
    with torch.no_grad():
        reference = _logits(deepcopy_module(model).eval()(example))
    folded = fold_batchnorm(model, example=example, tolerance=tolerance)
    info: DeployInfo = folded.deploy_info  # type: ignore[assignment]
    info.dtype, info.channels_last = "fp32", channels_last
    if channels_last:
        folded.to(memory_format=torch.channels_last)
    deployed = DeployedModel(folded, torch.float32, channels_last, info).eval()
    if bf16:
        deployed = _bf16_form(folded, channels_last, info, example, bf16_weights)
    if compile is not None:
        _compile(deployed, compile, example, info)
    candidate = _logits(deployed(example))
    info.max_logit_diff, info.top1_agreement = _compare(reference, candidate)
    limit = tolerance * max(1.0, float(reference.abs().max()))
    if not bf16 and info.max_logit_diff > limit:
        raise DeployError(f"the deployed form of {type(model).__name__} differs from the original by "
                          f"{info.max_logit_diff:.3g} (> {limit:.3g}); form: {info.as_dict()}")
    log.info("deploy %s: %d BN folded (%s), %s, %s, compiler %s: max logit diff %.3g, top-1 agreement %.4f",
             type(model).__name__, info.folded, info.pairing, info.dtype,
             "channels_last" if channels_last else "contiguous", info.compiler, info.max_logit_diff,
             info.top1_agreement)
    return deployed
