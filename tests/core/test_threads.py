"""core/threads.py: one intra-op thread inside the block, the caller's count restored afterwards, even on error."""
import pytest
import torch

from dfmpc_deploy.core.threads import one_thread


def test_one_thread_inside_and_restored_even_on_error():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), one_thread():
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        with one_thread():  # already one: nothing to change
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
