"""The one error every checkpoint problem raises, and the report both layouts use for a tree that does not fit."""

from __future__ import annotations

from collections.abc import Sequence


class CheckpointError(ValueError):
    """A checkpoint folder, file, config or tensor does not match what the model needs."""


def raise_mismatches(what: str, mismatched: Sequence[str], unexpected: Sequence[str], missing: Sequence[str],
                     duplicated: Sequence[str] = (), hint: str = "") -> None:
    """Raise one :class:`CheckpointError` listing every problem at once (nothing when all lists are empty), so a
    bad checkpoint is diagnosed in one run; ``what`` names the checkpoint, ``hint`` ends the message."""
    problems = []
    for label, items in (
        ("shape mismatch", mismatched),
        ("unexpected tensor (not in the model)", unexpected),
        ("missing tensor (model parameter not in the checkpoint)", missing),
        ("duplicate", duplicated),
    ):
        if items:
            shown = "\n  ".join(items[:20]) + (f"\n  ... and {len(items) - 20} more" if len(items) > 20 else "")
            problems.append(f"{len(items)} {label}:\n  {shown}")
    if problems:
        raise CheckpointError(f"{what} does not match the model:\n" + "\n".join(problems) + hint)
