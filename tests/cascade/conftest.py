"""Cascade unit tests run single-threaded: their tensors are tiny, and on a shared 2-core machine an
intra-op thread pool waiting for a busy core turns a 10 ms step into 100s of ms."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
