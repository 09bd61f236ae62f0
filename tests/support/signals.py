"""Child processes that a test stops with Ctrl-C (SIGINT) must be able to receive it.

A shell starts background jobs (`cmd &`, `nohup`, some CI runners) with SIGINT ignored, children inherit
that, and Python then never installs its KeyboardInterrupt handler: a test's SIGINT would do nothing.
Pass `preexec_fn=default_sigint` to `subprocess.Popen` to give the child the default disposition, as an
interactive terminal would.
"""

from __future__ import annotations

import signal


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
