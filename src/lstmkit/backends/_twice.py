"""Backward passes of fused kernels that stay correct when they must themselves be differentiated.

A fused backward computes its gradients outside autograd (NumPy, Numba, Triton), so it records no
graph. That is right for ordinary training, and wrong in two cases, where it would give silently
wrong numbers (second-order gradients of zero):

- ``create_graph=True`` (gradient penalties, MAML, Hessian-vector products, ``gradgradcheck``):
  autograd runs the backward with grad mode on;
- a ``vmap`` over the backward (of a vector-Jacobian product: ``torch.func`` transforms, and
  gradcheck's batched-gradient check, whose gradients are batched tensors of the older vmap).

There :func:`differentiable` reruns the node's forward on the reference math (the equations of
``reference.py`` in torch ops) from the saved inputs and differentiates that with autograd, so the
gradients carry a graph back to the inputs. The first-order numbers are the reference backend's
(the same as the fused kernels' to float tolerance); the fused backward stays the path of every
backward that needs no graph.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["differentiable", "graph_needed"]


def graph_needed(grads: Sequence[torch.Tensor] = ()) -> bool:
    """True inside a backward (of these incoming gradients) whose results must carry a graph or be
    batched (see the module docstring)."""
    return (torch.is_grad_enabled() or torch._C._are_functorch_transforms_active()
            or any(torch._C._functorch.is_legacy_batchedtensor(g) for g in grads))


# reference(ctx) -> (inputs, fn): the node's forward inputs in their positions (the tensors as saved,
# with their autograd history) and fn(*inputs) -> the node's outputs computed on the reference math
Reference = Callable[[Any], tuple[Sequence[Any], Callable[..., Any]]]


def differentiable(reference: Reference) -> Callable:
    """Decorate a fused ``backward(ctx, *grads)``: where :func:`graph_needed`, the gradients come from
    differentiating ``fn(*inputs)`` of ``reference(ctx)`` with autograd instead (a graph of their own);
    elsewhere the fused backward runs unchanged."""

    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            if not graph_needed(grads):
                return backward(ctx, *grads)
            inputs, fn = reference(ctx)
            need = [i for i, n in enumerate(ctx.needs_input_grad) if n]
            with torch.enable_grad():
                outs = fn(*inputs)
            pairs = [(o, g) for o, g in zip(outs, grads) if o.requires_grad]
            got = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in need], [g for _, g in pairs],
                                      allow_unused=True, create_graph=torch.is_grad_enabled())
            res: list = [None] * len(ctx.needs_input_grad)
            for i, g in zip(need, got):
                res[i] = g
            return tuple(res)

        return wrapper

    return decorate
