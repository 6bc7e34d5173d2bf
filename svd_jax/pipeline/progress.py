"""Progress reporting from inside the compiled denoising loop.

The scan calls :func:`tick` through ``jax.debug.callback`` (ordered) when the generation's config asks for
progress; the bar lives on the host and is created on the first step. The program stays a pure function of its
inputs, so it is cached like any other (the callback is part of the program, not of its inputs).
"""

from __future__ import annotations

import jax

_BAR = {}


def tick(i, n):
    """Host callback: advance a tqdm bar over ``n`` steps (created when step ``i`` is 0)."""
    from tqdm.auto import tqdm

    i, n = int(i), int(n)
    if i == 0 or "bar" not in _BAR:
        close()
        _BAR["bar"] = tqdm(total=n, desc="denoising", unit="step")
    _BAR["bar"].update(1)


def report(i, n: int) -> None:
    """Inside a traced loop: report step ``i`` (traced) of ``n`` to the host, in order."""
    jax.debug.callback(tick, i, n, ordered=True)


def close() -> None:
    """Close the bar of the last run, if any."""
    bar = _BAR.pop("bar", None)
    if bar is not None:
        bar.close()
