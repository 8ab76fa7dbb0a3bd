"""The optional packages the benchmark uses, and what to say when one is missing.

``pip install kvuring`` brings only cffi and xxhash; the ``bench`` extra adds
tqdm (progress bar), matplotlib (chart) and uvloop (one implementation).
"""

from __future__ import annotations

import importlib

BENCH_EXTRA = "pip install 'kvuring[bench]'"

#: Module -> what the benchmark needs it for.
PURPOSE = {
    "tqdm": "the progress bar",
    "matplotlib": "the chart (results.png)",
    "uvloop": "the kvuring-uvloop implementation",
}


class MissingExtra(RuntimeError):
    """An optional package a subcommand needs is not installed."""

    def __init__(self, module: str, alternative: str = "") -> None:
        self.module = module
        text = (
            f"{PURPOSE.get(module, module)} needs {module}, which is not installed: {BENCH_EXTRA}"
        )
        super().__init__(f"{text} ({alternative})" if alternative else text)


def missing(module: str) -> str | None:
    """None if ``module`` imports, else why not (one line, with the extra to install)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return f"{module} is not installed ({BENCH_EXTRA})"
    return None
