"""Progress reporting for the stepwise generation (svd_jax/pipeline/pipeline.py ``_run_stepwise``).

The host loop calls :func:`start`, :func:`tick` after each denoising step's program finishes and
:func:`close` at the end. No
callback runs inside a compiled program: a program with host callbacks is never written to jax's persistent
compile cache, so every run would compile again.
"""

from __future__ import annotations

_BAR = {}


def start(n: int) -> None:
    """A tqdm bar over ``n`` denoising steps (closing the last run's, if any)."""
    from tqdm.auto import tqdm

    close()
    _BAR["bar"] = tqdm(total=n, desc="denoising", unit="step")


def tick() -> None:
    """One more step done."""
    if "bar" in _BAR:
        _BAR["bar"].update(1)


def close() -> None:
    """Close the bar of the last run, if any."""
    bar = _BAR.pop("bar", None)
    if bar is not None:
        bar.close()
