"""The mixer: all K terms of a compiled graph from the L logits, in one vectorised pass.

The logits of the scales the graph uses are stacked once into ``[L', B, C, *S]``. The originals
are that stack itself (or one ``index_select`` of it when only some scales are supervised). Each
(operator, size) group then fuses all of its subsets in one call:

- operators with a stack path (the built-ins, see ``fusionsearch.operator_api``) read the members
  straight from the stack with the group's subset index matrix and add their share of the stack's
  gradient into one shared accumulator, so nothing of size ``[n, k, B, C, *S]`` is ever copied and
  the backward allocates one stack-sized gradient in all;
- any other operator gets the members gathered with one ``index_select`` into
  ``[n_subsets, k, B, C, *S]`` (shared by the groups that use the same subsets).

The blocks are concatenated in term order, or handed one by one to the criterion, which scores
each block as it comes and so never allocates the whole ``[K, B, C, *S]``. There is no Python loop
over terms and nothing is read back to the host.

Mixing runs with autocast disabled, in float32 for half-precision inputs (float64 stays float64):
a ``mul`` of five logits of magnitude 30 is about 2.4e7, far beyond float16's 65504.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

from fusionsearch.compile import Graph
from fusionsearch.errors import FusionSearchError
from fusionsearch.operator_api import StackContext, build_operator, has_stack_path

REDUCED_PRECISION = (torch.float16, torch.bfloat16)


class Mixer(nn.Module):
    """``forward(logits: L tensors [B, C, *S], coarsest first, same size) -> Tensor[K, B, C, *S]``.

    Logits of scales that no term uses are ignored (they may have any shape).
    """

    def __init__(self, graph: Graph) -> None:
        super().__init__()
        self.graph = graph
        self.operators = nn.ModuleDict()
        for group in graph.groups:
            key = _module_key(group.operator, group.size)
            if key in self.operators:
                raise FusionSearchError(
                    f"Operator names '{group.operator}' and another one map to the same module name '{key}'; "
                    f"rename one of them."
                )
            self.operators[key] = build_operator(
                group.operator,
                group.options,
                k=group.size,
                num_classes=graph.num_classes,
                spatial_dims=graph.spatial_dims,
                n_subsets=group.n_subsets,
            )
        # Positions in the stack of used scales. Index tensors live in (non-persistent) buffers so
        # that they follow .to(device) without entering checkpoints.
        self.used_scales = graph.used_scales
        position = {scale: i for i, scale in enumerate(self.used_scales)}
        self._originals_are_stack = graph.originals == self.used_scales
        originals = [position[s] for s in graph.originals]
        self.register_buffer("original_index", torch.tensor(originals, dtype=torch.long), persistent=False)
        # Groups with the same subsets (every operator, for a given size) share one subset index matrix
        # (and, for operators without a stack path, one gather of the members).
        gathers: dict[tuple[tuple[int, ...], ...], int] = {}
        self._gather_of_group = [gathers.setdefault(group.subsets, len(gathers)) for group in graph.groups]
        self._rows_of_gather: list[tuple[tuple[int, ...], ...]] = []  # the index matrices as Python ints
        for subsets, i in gathers.items():
            rows = tuple(tuple(position[s] for s in subset) for subset in subsets)
            self._rows_of_gather.append(rows)
            index = torch.tensor(rows, dtype=torch.long)
            self.register_buffer(f"gather_index_{i}", index.reshape(-1), persistent=False)

    def forward(self, logits: Sequence[Tensor]) -> Tensor:
        stacked, context = self.stack(logits)
        with torch.autocast(device_type=stacked.device.type, enabled=False):
            parts = list(self.iter_parts(stacked, context))
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def iter_parts(self, stacked: Tensor, context: StackContext) -> Iterator[Tensor]:
        """The terms in order, as consecutive blocks ``[n, B, C, *S]``: the originals, then one per group.

        ``stacked`` and ``context`` come from :meth:`stack`; run this with autocast disabled. A
        consumer that scores each block as it comes (the criterion) never needs the whole
        ``[K, B, C, *S]`` tensor at once; with ``recycle_outputs`` it must be done with a block
        before asking for the next (see :class:`~fusionsearch.operator_api.StackContext`).
        """
        if self.graph.originals:
            yield stacked if self._originals_are_stack else stacked.index_select(0, self.original_index)
        gathered: dict[int, Tensor] = {}
        for gather, group, operator in zip(
            self._gather_of_group, self.graph.groups, self.operators.values(), strict=True
        ):
            index = getattr(self, f"gather_index_{gather}")
            if has_stack_path(operator):
                matrix = index.view(group.n_subsets, group.size)
                context.bind_rows(matrix, self._rows_of_gather[gather])
                yield operator.mix_stack(stacked, matrix, context)
                continue
            if gather not in gathered:
                members = stacked.index_select(0, index)
                gathered[gather] = members.view(group.n_subsets, group.size, *stacked.shape[1:])
            yield operator(gathered[gather])

    def stack(self, logits: Sequence[Tensor], *, recycle_outputs: bool = False) -> tuple[Tensor, StackContext]:
        """Check the logits and stack the used scales into ``[L', B, C, *S]`` in the mixing dtype.

        Also returns the :class:`~fusionsearch.operator_api.StackContext` of the call: the operators'
        stack paths add the stack's gradient into it (the stack's autograd node hands that sum, plus
        the gradient reaching it the ordinary way, back to the logits) and take their outputs from it.
        """
        items = check_logits(logits, self.graph, self.used_scales)
        dtype = functools.reduce(torch.promote_types, (items[s].dtype for s in self.used_scales))
        dtype = torch.float32 if dtype in REDUCED_PRECISION else dtype
        used = [items[s].to(dtype) for s in self.used_scales]
        parameter = next(self.parameters(), None)
        if parameter is not None and parameter.dtype != dtype:
            raise FusionSearchError(
                f"The operators' parameters are {parameter.dtype} but the logits are mixed in {dtype}. "
                f"Convert the criterion to the logits' precision (criterion.to({dtype})) or the logits to "
                f"the criterion's; half-precision logits are mixed in float32 and need a float32 criterion."
            )
        shape = torch.Size((len(used), *used[0].shape))
        context = StackContext(shape, dtype, used[0].device, recycle_outputs=recycle_outputs)
        if self._uses_stack_paths and torch.is_grad_enabled() and any(item.requires_grad for item in used):
            return _StackForMixing.apply(context, *used), context
        return torch.stack(used), context

    @property
    def _uses_stack_paths(self) -> bool:
        return any(has_stack_path(operator) for operator in self.operators.values())


class _StackForMixing(torch.autograd.Function):
    """``torch.stack`` of the logits whose backward also collects the stack paths' shared gradient.

    Autograd runs this node only after every consumer of the stack, so by then each stack path has
    added its share into the :class:`StackContext`'s buffer; the ordinary gradient (originals, gathered
    operators) is added to that sum, and the logits get views of the one buffer.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, context: StackContext, *logits: Tensor) -> Tensor:
        ctx.stack_context = context
        ctx.set_materialize_grads(False)
        return torch.stack(logits)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor | None) -> tuple[Tensor | None, ...]:
        total = ctx.stack_context.take_gradient()
        if total is None:
            total = grad
        elif grad is not None:
            total.add_(grad)
        if total is None:
            return (None,) * (1 + ctx.stack_context.shape[0])
        return (None, *total.unbind(0))


def check_logits(logits: Sequence[Tensor], graph: Graph, used_scales: Sequence[int]) -> list[Tensor]:
    """The L logits as a list, after checking count, shape and dtype of the used ones (no host sync)."""
    if isinstance(logits, Tensor):
        raise FusionSearchError(
            f"Pass the logits as a list of {graph.num_scales} tensors [B, C, *spatial] (coarsest first), "
            f"not one tensor of shape {tuple(logits.shape)}; for a stacked tensor use list(tensor.unbind(dim))."
        )
    items = list(logits)
    if len(items) != graph.num_scales:
        raise FusionSearchError(
            f"Expected {graph.num_scales} logit tensors (one per scale, coarsest first) but got {len(items)}. "
            f"Build the criterion with num_scales equal to the number of model outputs."
        )
    reference = None
    for scale in used_scales:
        item = items[scale]
        if not isinstance(item, Tensor) or not item.is_floating_point():
            raise FusionSearchError(f"Logit P{scale} must be a floating-point tensor, got {type(item).__name__}.")
        if reference is None:
            reference = (scale, item.shape)
        if item.dim() != graph.spatial_dims + 2 or item.shape[1] != graph.num_classes or item.shape != reference[1]:
            raise FusionSearchError(
                f"Logit P{scale} has shape {tuple(item.shape)}; the mixed logits must share one shape "
                f"[B, {graph.num_classes}, *spatial] with {graph.spatial_dims} spatial dimensions "
                f"(P{reference[0]} has {tuple(reference[1])}). Resize them to the label size first."
            )
    return items


def _module_key(operator: str, size: int) -> str:
    """ModuleDict key of an (operator, size) group, e.g. ``concat_k3`` (dots are not allowed in keys)."""
    return f"{operator.replace('.', '_')}_k{size}"
