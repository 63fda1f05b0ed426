"""Side-by-side timing of training and inference forms, and ``python -m common.speed``.

Timings of two forms are only comparable when taken under the same machine load, so every comparison
here is interleaved: each round times one call of every form in turn, after a warm-up, and the figure
of a form is its median over rounds. Ratios are speeds relative to a named reference (> 1: faster).

``python -m common.speed`` prints, for ResNet-20 and ResNet-56, training images/s (batch 128) and
inference images/s (batch 1 and 128) of fp32 eager, channels_last, bf16 autocast, folded BN, folded +
bf16 weights, and a compiled form, as ratios against fp32 eager. Run it with ``OMP_NUM_THREADS=1``
(or ``--threads``) to reproduce the README table.
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .cost import cross_entropy_step
from .data import ImageTensors
from .data.splits import class_interleaved_order

MIN_CALL_SECONDS = 0.02  # each timed measurement repeats a call until it lasts at least this long


# ---------------------------------------------------------------------------------------------------
# images


def class_mixed_indices(split: ImageTensors, n: int, seed: int = 0) -> Tensor:
    """The first ``n`` indices of ``split`` in the class-interleaved order of ``seed``
    (``common.data.splits.class_interleaved_order``), cycled when the split is shorter than ``n``.

    Splits from ``common.data.load_dataset`` already come in that order (seed ``SPLIT_ORDER_SEED``), so
    ``split[:n]`` is such a subset too; this draws another one per seed, and mixes a split built elsewhere."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if len(split) == 0:
        raise ValueError("the split holds no images")
    order = torch.from_numpy(class_interleaved_order(split.labels.cpu().numpy(), seed))[:n].to(split.labels.device)
    if n > len(order):  # fewer images than asked: cycle them
        order = order.repeat(math.ceil(n / len(order)))[:n]
    return order


def class_mixed_images(split: ImageTensors, n: int, seed: int = 0) -> Tensor:
    """``n`` float images in [0, 1] from :func:`class_mixed_indices` (every class represented)."""
    return split.images[class_mixed_indices(split, n, seed)].float().div_(255.0)


# ---------------------------------------------------------------------------------------------------
# timing


def _timer(fn: Callable[[Tensor], object], x: Tensor) -> Any:
    # torch.utils.benchmark pulls in cpp_extension, which warns "No CUDA runtime" on every CPU-only machine:
    # irrelevant to timing, so that one logger is quietened before the import
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import benchmark

    return benchmark.Timer(stmt="fn(x)", globals={"fn": fn, "x": x}, num_threads=torch.get_num_threads())


def time_side_by_side(fns: dict[str, Callable[[Tensor], object]], images: Tensor,
                      batch_sizes: Sequence[int] = (1, 128), *, min_repeats: int = 20,
                      reference: str | None = None, warmup: int = 2) -> dict[str, Any]:
    """Median seconds per call of every ``fns[name](batch)``, measured in interleaved rounds.

    The batch of size ``b`` is the first ``b`` of ``images`` (cycled when ``images`` is shorter). Each
    form is warmed up ``warmup`` times per batch size, then ``min_repeats`` rounds time every form once
    in turn (``torch.utils.benchmark``; short calls repeat within a measurement to last at least
    ``MIN_CALL_SECONDS``). ``reference`` (default: the first name) gives the ratios.

    Returns ``{"reference": name, "batches": {b: {name: {"seconds", "images_per_s", "ratio"}}}}``.
    """
    if not fns:
        raise ValueError("time_side_by_side needs at least one function")
    reference = next(iter(fns)) if reference is None else reference
    if reference not in fns:
        raise ValueError(f"reference {reference!r} is not one of {', '.join(fns)}")
    if min_repeats < 1 or any(b < 1 for b in batch_sizes):
        raise ValueError("min_repeats and every batch size must be >= 1")
    result: dict[str, Any] = {"reference": reference, "batches": {}}
    for b in batch_sizes:
        x = images[torch.arange(b) % len(images)].contiguous()
        timers, numbers, samples = {}, {}, {name: [] for name in fns}
        for name, fn in fns.items():
            timers[name] = _timer(fn, x)
            warm = min(timers[name].timeit(1).median for _ in range(max(1, warmup)))
            numbers[name] = max(1, math.ceil(MIN_CALL_SECONDS / max(warm, 1e-9)))
        for _ in range(min_repeats):
            for name in fns:
                samples[name].append(timers[name].timeit(numbers[name]).median)
        medians = {name: statistics.median(s) for name, s in samples.items()}
        result["batches"][b] = {
            name: {"seconds": sec, "images_per_s": b / sec, "ratio": medians[reference] / sec}
            for name, sec in medians.items()}
    return result


# ---------------------------------------------------------------------------------------------------
# the benchmark script


def _training_step(model: nn.Module, labels: Tensor, precision: Any) -> Callable[[Tensor], object]:
    """One SGD step on a batch under ``precision`` (a ``common.precision.Precision``)."""
    step = cross_entropy_step(model, precision, lr=1e-3, momentum=0.9)
    return lambda x: step(x, labels[: len(x)])


def _inference(model: nn.Module, precision: Any) -> Callable[[Tensor], object]:
    model.eval()

    @torch.no_grad()
    def run(x: Tensor) -> object:
        with precision.autocast():
            return model(precision.prepare_inputs(x))

    return run


def _forms(backbone: str, weights: str | None, compiler: str | None, bf16: bool, train: bool
           ) -> dict[str, Callable[[Tensor], object]]:
    import copy

    from .backbones import build_backbone
    from .deploy import deploy
    from .precision import Precision

    base = build_backbone(backbone, 10, weights)
    cpu = torch.device("cpu")
    fp32, cl = Precision("fp32", cpu, False), Precision("fp32", cpu, True)
    bf = Precision("bf16", cpu, True)
    fresh = lambda: copy.deepcopy(base)  # noqa: E731
    example = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    if train:
        labels = torch.arange(1024) % 10
        forms = {"fp32 eager": _training_step(fresh(), labels, fp32),
                 "channels_last": _training_step(cl.prepare_model(fresh()), labels, cl)}
        if bf16:
            forms["bf16 autocast + channels_last"] = _training_step(bf.prepare_model(fresh()), labels, bf)
        return forms
    forms = {"fp32 eager": _inference(fresh(), fp32),
             "channels_last": _inference(cl.prepare_model(fresh()), cl)}
    if bf16:
        forms["bf16 autocast + channels_last"] = _inference(bf.prepare_model(fresh()), bf)
    forms["folded + channels_last"] = deploy(base, example=example)
    if bf16:
        forms["folded + channels_last + bf16 weights"] = deploy(base, example=example, bf16=True)
    if compiler is not None:
        forms[f"folded + channels_last + {compiler}"] = deploy(base, example=example, compile=compiler)
        if bf16:
            forms[f"folded + channels_last + bf16 + {compiler}"] = deploy(base, example=example, bf16=True,
                                                                         compile=compiler)
    return forms


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from .precision import cpu_has_native_bf16
    return (f"{cpu}, {torch.get_num_threads()} torch thread(s), native bf16: {cpu_has_native_bf16()}, "
            f"torch {torch.__version__}")


def format_table(title: str, timing: dict[str, Any]) -> str:
    batches = list(timing["batches"])
    lines = [f"| {title} | " + " | ".join(f"b{b} img/s | b{b} ratio" for b in batches) + " |",
             "|---|" + "---:|---:|" * len(batches)]
    for name in timing["batches"][batches[0]]:
        cells = []
        for b in batches:
            row = timing["batches"][b][name]
            cells += [f"{row['images_per_s']:.0f}", f"{row['ratio']:.2f}x"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m common.speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["resnet20", "resnet56"])
    parser.add_argument("--weights", default=None, help="a weights file for the first backbone (speed does "
                        "not depend on the weights; default random)")
    parser.add_argument("--train-batch", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 128], help="inference batch sizes")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per batch size")
    parser.add_argument("--compile", choices=["jit", "inductor", "none"], default="jit",
                        help="compiler of the compiled form (inductor compiles for minutes on a small CPU)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 forms")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as set by OMP)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from .precision import cpu_has_native_bf16
    bf16 = not args.no_bf16 and cpu_has_native_bf16()
    compiler = None if args.compile == "none" else args.compile
    images = torch.rand(max(args.train_batch, *args.batches), 3, 32, 32,
                        generator=torch.Generator().manual_seed(args.seed))
    print(f"machine: {machine_line()}")
    for i, name in enumerate(args.backbones):
        weights = args.weights if i == 0 else None
        train = time_side_by_side(_forms(name, weights, None, bf16, train=True), images, (args.train_batch,),
                                  min_repeats=args.repeats)
        print(f"\n{format_table(f'{name} training', train)}")
        infer = time_side_by_side(_forms(name, weights, compiler, bf16, train=False), images, args.batches,
                                  min_repeats=args.repeats)
        print(f"\n{format_table(f'{name} inference', infer)}", flush=True)


if __name__ == "__main__":
    main()
