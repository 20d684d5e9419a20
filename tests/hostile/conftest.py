"""Shared by the hostile-input tests: a deadline instead of a hang, and the one-line check of an error message."""
import signal

import pytest

from dfmpc_deploy.io.container import save_packed
from dfmpc_deploy.passes.recipes import compensate
from tests.io.helpers import quick_config, variant_net


@pytest.fixture
def deadline():
    """Fail instead of hanging: a blocking open or read is interrupted after 60 s (generous for a loaded 2-core CI
    machine; use with ``usefixtures``)."""
    def boom(*_):
        raise TimeoutError("hung for 60 s")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def default_sigint() -> None:
    """``preexec_fn`` of a child that is sent SIGINT: a shell starts background jobs (``pytest ... &``) with SIGINT
    ignored, and a child inherits that; the test is about the default disposition, so restore it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def one_line(err: pytest.ExceptionInfo) -> str:
    """The message of a raised error, asserted to be one line without a traceback."""
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid packed file of a tiny model (one per test module)."""
    mp = compensate(variant_net("relu6"), (3, 16, 16), **quick_config(), arch="tiny")
    path = tmp_path_factory.mktemp("good") / "m.dfmpc"
    save_packed(mp, path)
    return path
