"""Reading a ``torch.fx`` graph of a model for the module-folding passes (``convert``'s ``fuse_inference`` and
``fold_activation_clips``): which module a node calls, and the one node that reads it."""

from __future__ import annotations

import torch
from torch import nn


def module_calls(graph: torch.fx.Graph) -> dict[str, list]:
    """The call_module nodes of ``graph`` per module name."""
    calls: dict[str, list] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    return calls


def called_module(model: nn.Module, calls: dict, node) -> nn.Module | None:
    """The module a call_module node runs, if it runs nowhere else."""
    if node.op != "call_module" or len(calls.get(node.target, ())) != 1:
        return None
    return model.get_submodule(node.target)


def only_user(model: nn.Module, calls: dict, node):
    """(the single user node, its module if it calls one that runs only there) or (None, None); the user must take
    the node as its one and only argument."""
    users = list(node.users)
    if len(users) != 1 or users[0].args[:1] != (node,) or len(users[0].args) + len(users[0].kwargs) != 1:
        return None, None
    return users[0], called_module(model, calls, users[0])
