"""What the command-line entry points share."""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable


def quiet_on_closed_pipe(main: Callable[..., int]) -> Callable[..., int]:
    """`medattn info | head -3`: once the reader has what it wants it closes the pipe, and the next print
    raises BrokenPipeError. The command then stops with exit status 1 and no traceback; stdout goes to
    /dev/null first so that the interpreter's final flush does not raise again (Python's documented
    recipe, "Note on SIGPIPE" in the signal module's docs)."""
    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            status = main(*args, **kwargs)
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's flush at exit
            return status
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
    return run
