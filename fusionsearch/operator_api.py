"""The fusion operator interface: write an operator once, get it batched over every subset.

An operator fuses the ``k`` members of a subset of scales into one logit. The mixer gathers all
subsets of one size at once and calls the operator a single time with

    x: Tensor[n_subsets, k, B, C, *S]   ->   Tensor[n_subsets, B, C, *S]

so a stateless operator is one line (``return x.amax(1)``) and is batched for free.

Two kinds can be registered with :func:`fusionsearch.register_operator`:

* **stateless**: a plain function ``fn(x, **options)``; its keyword parameters after ``x`` are
  the options a space may set (``{name: power_mean, p: 3}``).
* **parametric**: a subclass of :class:`FusionOperator` (or any ``nn.Module`` class, or a factory
  function decorated with :func:`parametric`) built as
  ``factory(k, num_classes, spatial_dims, n_subsets, **options)``; one module is built per
  (operator, subset size) and owns the parameters of all subsets of that size.

Options are checked against the factory's signature (and its type hints, with pydantic) when a
space is validated, so a misspelt or mistyped option is reported by file and field before any
training starts.

**Stack paths (optional, used by the built-ins).** Gathering ``x`` copies every member of every
subset. An operator may also offer ``mix_stack(stack, index, context)``: it fuses the subsets
straight from the stack of scales ``[L, B, C, *S]`` given the subset index matrix ``[n, k]``
(positions in the stack; :meth:`StackContext.rows` gives them as Python ints without a device
read, for loops over subsets), takes its output memory from the :class:`StackContext` ``context`` and,
in its backward, adds its share of d(loss)/d(stack) into the context's gradient buffer instead of
returning a full-size gradient of its own. The mixer uses it when the class that defines
``forward`` also defines ``mix_stack`` (so a subclass that overrides ``forward`` falls back to the
plain interface); stateless functions attach one with :func:`stack_path`. Third-party operators
need none of this.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import TypeAdapter, ValidationError
from torch import Tensor, nn

from fusionsearch.allocator import memory_is_kept
from fusionsearch.registry import OPERATORS

# The arguments the mixer passes to every parametric factory; everything else is an option.
BUILD_ARGUMENTS = ("k", "num_classes", "spatial_dims", "n_subsets")


class FusionOperator(nn.Module):
    """Base class of parametric operators: one instance serves all subsets of one size.

    Subclasses take ``(k, num_classes, spatial_dims, n_subsets, **options)`` and implement
    ``forward(x: Tensor[n_subsets, k, B, C, *S]) -> Tensor[n_subsets, B, C, *S]``.
    """

    def __init__(self, k: int, num_classes: int, spatial_dims: int, n_subsets: int) -> None:
        super().__init__()
        self.k = k
        self.num_classes = num_classes
        self.spatial_dims = spatial_dims
        self.n_subsets = n_subsets

    def extra_repr(self) -> str:
        return f"k={self.k}, num_classes={self.num_classes}, n_subsets={self.n_subsets}"


def parametric(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Mark a factory function (not a class) as building a parametric operator module."""
    factory.__fusion_parametric__ = True  # type: ignore[attr-defined]
    return factory


def stack_path(kernel: Callable[..., Tensor]) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Attach a stack path ``kernel(stack, index, context, **options)`` to a stateless operator function."""

    def attach(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        fn.__fusion_stack_path__ = kernel  # type: ignore[attr-defined]
        return fn

    return attach


class StatelessOperator(nn.Module):
    """Wraps a stateless operator function (with its options bound) so the mixer holds only modules."""

    def __init__(self, name: str, fn: Callable[..., Tensor], options: dict[str, Any]) -> None:
        super().__init__()
        self.name = name
        self.options = dict(options)
        self.fn = functools.partial(fn, **options) if options else fn
        kernel = getattr(fn, "__fusion_stack_path__", None)
        self.stack_kernel = functools.partial(kernel, **options) if kernel is not None and options else kernel

    def mix_stack(self, stack: Tensor, index: Tensor, context: StackContext) -> Tensor:
        """The function's stack path (only called when :func:`has_stack_path` says it has one)."""
        return self.stack_kernel(stack, index, context)

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{self.name}" + (f", {opts}" if opts else "")


@dataclass(frozen=True)
class OperatorInfo:
    """What the registry knows about one operator: kind, accepted options and a one-line summary."""

    name: str
    factory: Callable[..., Any]
    parametric: bool
    options: dict[str, inspect.Parameter]
    accepts_any_option: bool
    summary: str


def is_parametric(obj: Any) -> bool:
    """True for nn.Module classes and factories marked with :func:`parametric`."""
    return (isinstance(obj, type) and issubclass(obj, nn.Module)) or bool(getattr(obj, "__fusion_parametric__", False))


def describe_operator(name: str) -> OperatorInfo:
    """Look an operator up by name (unknown names raise with the known names and closest match)."""
    factory = OPERATORS.get(name)
    kind_parametric = is_parametric(factory)
    try:
        signature = inspect.signature(factory, eval_str=True)
    except (NameError, TypeError, ValueError):  # unresolvable hints: fall back to the raw signature
        signature = inspect.signature(factory)
    params = list(signature.parameters.values())
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    if kind_parametric:
        option_params = [p for p in params if p.name not in BUILD_ARGUMENTS]
    else:
        option_params = params[1:]  # the first parameter is the stacked input x
    options = {
        p.name: p
        for p in option_params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    doc = inspect.getdoc(factory) or ""
    summary = doc.strip().splitlines()[0] if doc.strip() else "(no docstring)"
    return OperatorInfo(name, factory, kind_parametric, options, accepts_any, summary)


def validate_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Check options against the operator's signature and type hints; return them coerced.

    Raises ``ValueError`` with a message naming the offending option, so that pydantic reports it
    at the right place in the YAML file.
    """
    info = describe_operator(name)
    checked: dict[str, Any] = {}
    for key, value in options.items():
        param = info.options.get(key)
        if param is None:
            if info.accepts_any_option:
                checked[key] = value
                continue
            valid = ", ".join(sorted(info.options)) or "none"
            raise ValueError(f"operator '{name}' has no option '{key}' (its options: {valid})")
        if param.annotation is inspect.Parameter.empty:
            checked[key] = value
            continue
        try:
            checked[key] = TypeAdapter(param.annotation).validate_python(value)
        except ValidationError as exc:
            reason = exc.errors()[0].get("msg", "invalid value")
            raise ValueError(f"operator '{name}' option '{key}': {reason} (got {value!r})") from None
    missing = [p.name for p in info.options.values() if p.default is inspect.Parameter.empty and p.name not in checked]
    if missing:
        raise ValueError(f"operator '{name}' needs the option(s) {', '.join(missing)}")
    return checked


def build_operator(
    name: str, options: dict[str, Any], *, k: int, num_classes: int, spatial_dims: int, n_subsets: int
) -> nn.Module:
    """Build the module that fuses all ``n_subsets`` subsets of size ``k`` for operator ``name``."""
    info = describe_operator(name)
    options = validate_options(name, options)
    if not info.parametric:
        return StatelessOperator(name, info.factory, options)
    module = info.factory(k, num_classes, spatial_dims, n_subsets, **options)
    if not isinstance(module, nn.Module):
        raise TypeError(f"the factory of operator '{name}' returned {type(module).__name__}, not an nn.Module")
    return module


# -- stack paths ----------------------------------------------------------------------------------

# On CPUs the stack paths walk the pixels in blocks whose temporaries hold about this many elements
# in all. With glibc's default behaviour (big buffers are returned to the kernel when freed and
# page-faulted in afresh on the next use) small blocks are best: 4 MiB of float32 stay in cache and
# are recycled by malloc. Once freed memory is kept (fusionsearch.allocator, as the trainer does),
# big temporaries cost nothing extra and big blocks are best: fewer, larger operations that use
# every thread (on 2 threads the lomix criterion takes 0.55 s instead of 0.78 s; on 1 thread it
# makes no difference); the bound still caps the temporaries of large 3D inputs at 128 MiB.
# GPUs take everything in one block.
CPU_BLOCK_ELEMENTS = 1 << 20
CPU_BLOCK_ELEMENTS_KEPT_MEMORY = 1 << 25


def has_stack_path(module: nn.Module) -> bool:
    """True when the mixer may call ``module.mix_stack`` instead of ``module(x)``.

    Stateless wrappers qualify when their function has a :func:`stack_path`; modules when the class
    that defines ``forward`` (in the MRO) also defines ``mix_stack``.
    """
    if isinstance(module, StatelessOperator):
        return module.stack_kernel is not None

    def owner(attribute: str) -> type | None:
        return next((cls for cls in type(module).__mro__ if attribute in vars(cls)), None)

    return owner("mix_stack") is not None and owner("mix_stack") is owner("forward")


def _graph_task_id() -> int:
    """Id of the autograd pass running on this thread (-1 outside one)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current() if current is not None else -1


class StackContext:
    """What the stack paths of one mixing call share: the stack's gradient and the output memory.

    **Gradient.** Every stack path reads the whole stack, so returning its gradient the ordinary
    way would cost one full-size buffer per (operator, subset size). Instead each backward adds
    into one shared :meth:`gradient_buffer`, and the node that built the stack (which autograd
    runs only after all of its consumers) collects the sum with :meth:`take_gradient`.
    Contributions are tagged with the autograd pass that made them: a pass that never reaches the
    stack (e.g. ``torch.autograd.grad`` on the operators' parameters only, with
    ``retain_graph=True``) leaves nothing behind for the next one.

    **Outputs.** :meth:`new_output` gives each group's result fresh memory, unless the caller
    consumes every block before asking for the next one (the criterion scores each block as it is
    mixed) and says so with ``recycle_outputs``: then all blocks are views of one buffer, which
    saves the CPU from page-faulting a fresh block-sized buffer per group. The stack paths save
    no output for their backward; should anything else keep a block past the next one, autograd
    raises (a view whose base was modified in place) instead of computing a wrong gradient.
    """

    def __init__(
        self, shape: torch.Size, dtype: torch.dtype, device: torch.device, *, recycle_outputs: bool = False
    ) -> None:
        self.shape, self.dtype, self.device = shape, dtype, device
        self.recycle_outputs = recycle_outputs
        self._outputs: Tensor | None = None
        self._by_sample: Tensor | None = None
        self._grad: Tensor | None = None
        self._task = -1
        self._rows: tuple[Tensor, tuple[tuple[int, ...], ...]] | None = None

    def bind_rows(self, index: Tensor, rows: tuple[tuple[int, ...], ...]) -> None:
        """Tell the next stack path that ``index`` (the very tensor it will get) holds ``rows``."""
        self._rows = (index, rows)

    def rows(self, index: Tensor) -> tuple[tuple[int, ...], ...]:
        """The subset index matrix as Python ints, for stack paths that loop over subsets and members.

        The mixer binds them from the compiled graph before each call (:meth:`bind_rows`), so nothing
        is read back from the device; for any other ``index`` they are read from it (a host sync on GPUs).
        """
        if self._rows is not None and self._rows[0] is index:
            return self._rows[1]
        return tuple(tuple(row) for row in index.tolist())

    def new_output(self, n: int) -> Tensor:
        """Uninitialised memory for ``n`` terms shaped like one scale, ``[n, B, C, *S]``."""
        shape = (n, *self.shape[1:])
        if not self.recycle_outputs:
            return torch.empty(shape, dtype=self.dtype, device=self.device)
        numel = math.prod(shape)
        if self._outputs is None or self._outputs.numel() < numel:
            self._outputs = torch.empty(numel, dtype=self.dtype, device=self.device)
        return self._outputs[:numel].view(shape)

    def channels_by_sample(self, stack: Tensor) -> Tensor:
        """This call's ``stack`` laid out per sample, ``[B, L*C, pixels]``: one matrix per sample.

        Made once per call and shared by the stack paths that contract over (scale, class), whose
        blocks are then views of it (a matrix with row stride ``pixels`` is a valid GEMM operand).
        """
        if self._by_sample is None:
            scales, batch, classes = stack.shape[:3]
            by_sample = stack.detach().view(scales, batch, classes, -1).transpose(0, 1)
            self._by_sample = by_sample.reshape(batch, scales * classes, -1)
        return self._by_sample

    def gradient_buffer(self) -> Tensor:
        """The accumulator of the current backward pass (zeros the first time), to add into in place."""
        task = _graph_task_id()
        if self._grad is None or self._task != task:
            self._grad = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
            self._task = task
        return self._grad

    def take_gradient(self) -> Tensor | None:
        """The sum accumulated in the current pass (None if nothing was added), emptying the accumulator."""
        grad, task = self._grad, self._task
        self._grad = None
        return grad if grad is not None and task == _graph_task_id() else None


def pixel_blocks(batch: int, pixels: int, per_pixel: int, device: torch.device) -> list[tuple[slice, slice]]:
    """``(samples, pixels)`` slices covering ``[batch, pixels]`` for a stack path's blocked loop.

    ``per_pixel`` is the number of elements the loop's temporaries hold per (sample, pixel). On
    GPUs there is one block (everything at once); on CPUs blocks hold about ``CPU_BLOCK_ELEMENTS``
    (``CPU_BLOCK_ELEMENTS_KEPT_MEMORY`` once :func:`fusionsearch.allocator.keep_freed_memory` is in effect).
    """
    if device.type != "cpu":
        return [(slice(None), slice(None))]
    block_elements = CPU_BLOCK_ELEMENTS_KEPT_MEMORY if memory_is_kept() else CPU_BLOCK_ELEMENTS
    per_sample = pixels * per_pixel
    if per_sample <= block_elements:
        step = max(1, block_elements // per_sample)
        return [(slice(b, b + step), slice(None)) for b in range(0, batch, step)]
    step = max(1, block_elements // per_pixel)
    return [(slice(b, b + 1), slice(p, p + step)) for b in range(batch) for p in range(0, pixels, step)]


def sample_major(block: Tensor) -> Tensor:
    """A block ``[m, b, C, p]`` (of the stack or of a group's gradient) as per-sample matrices ``[b, m*C, p]``."""
    rows, samples, classes, pixels = block.shape
    return block.transpose(0, 1).reshape(samples, rows * classes, pixels)


def matmul_per_sample(matrix: Tensor, batched: Tensor) -> Tensor:
    """``matrix [m, q] @ batched[i] [q, p]`` for every i: ``[b, m, p]`` (one GEMM per call, no folding copies)."""
    if batched.shape[0] == 1:
        return torch.mm(matrix, batched[0]).unsqueeze(0)
    return torch.bmm(matrix.expand(batched.shape[0], *matrix.shape), batched)
