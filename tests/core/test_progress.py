import io

from dfmpc_deploy.core.progress import Progress


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_only_on_a_terminal():
    pipe = io.StringIO()
    with Progress(stream=pipe) as p:
        p.task("eval")(5, 10)
        p.say("building engine")
    assert pipe.getvalue() == ""

    tty = _Tty()
    with Progress(stream=tty) as p:
        p.task("eval")(10, 10)
        p.say("building engine")
    out = tty.getvalue()
    assert "eval" in out and "10/10" in out and "#" * 30 in out and "building engine" in out


def test_quiet_overrides_terminal():
    tty = _Tty()
    with Progress(enabled=False, stream=tty) as p:
        p.task("synthesise")(1, 2, 0.5)
    assert tty.getvalue() == ""
