"""Counting the collectives a forward runs: a measuring tool for the benchmark and the tests, not model code."""

import collections

from torch.utils._python_dispatch import TorchDispatchMode


class CollectiveCounter(TorchDispatchMode):
    """Count every collective that reaches the dispatcher while active: `with CollectiveCounter() as counter: ...`.

    `counter.ops` maps `namespace.op` to calls. It sees both `c10d` ops (`torch.distributed.all_reduce`, what a PT
    merge runs) and `_c10d_functional` ops (functional collectives, what DTensors such as transformers' own tensor
    parallelism run), which a wrapper around `torch.distributed.all_reduce` would miss.
    """

    NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional")
    NOT_COLLECTIVES = {"wait_tensor", "_wrap_tensor_autograd"}  # bookkeeping ops of the functional collectives

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in self.NAMESPACES:
            name = func.__name__.split(".")[0]
            if name not in self.NOT_COLLECTIVES:
                self.ops[f"{func.namespace}.{name}"] += 1
        return func(*args, **(kwargs or {}))
