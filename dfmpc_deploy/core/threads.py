"""Thread control for code made of many small tensor operations."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["one_thread"]


@contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread inside: for loops of many small tensor operations. Each costs microseconds, and on a busy
    machine waking a second OpenMP thread for it costs milliseconds (the real MobileNetV2 on the 2 shared cores:
    ``dfmpc-weights`` in 1.1 s with one thread, 37 s with two; the error-feedback column loop likewise)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
