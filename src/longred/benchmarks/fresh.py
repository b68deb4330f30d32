"""Benchmarks that measure peak memory run each case in a new interpreter, so its peak is its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys

__all__ = ["call_in_fresh_process"]


def call_in_fresh_process(
    module: str, call: str, argument: dict, *, what: str, env: dict[str, str] | None = None
) -> dict:
    """``call(json argument)`` with ``from module import ...`` done first, in a new interpreter (with
    ``env`` added to its environment); its JSON result.

    Raises:
        RuntimeError: the run failed (naming ``what``, with the end of its output).
    """
    code = f"import json, sys\nfrom {module}\nprint(json.dumps({call}(json.loads(sys.argv[1]))))\n"
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(argument)],
        capture_output=True,
        text=True,
        env=None if env is None else os.environ | env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
