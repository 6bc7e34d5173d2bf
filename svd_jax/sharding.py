"""Device meshes and partitioning rules: the only place that knows about devices.

Mesh axes (:func:`make_mesh`):
  * ``"data"``:  videos, and the two CFG halves, are split over it (data parallel);
  * ``"space"``: the latent/pixel HEIGHT of every frame is split over it, so one video uses every device
    (convolutions exchange one-row halos, spatial attention gathers keys/values, temporal layers are local:
    each pixel's frames stay on one device). Chosen over splitting frames, whose temporal attention needs an
    all-to-all of every activation, by ``benchmarks/sharding_report.py``.

The models call a ``constrain(x)`` hook on (N, h, w, C) activations at block boundaries (N = videos x frames,
b-major); :class:`Partitioner` provides it as ``with_sharding_constraint`` with these rules, and XLA inserts
the collectives. Parameters are replicated, or with ``fsdp=True`` split over all devices along their largest
dimension that divides (gathered by XLA where used).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, SPACE = "data", "space"
AXES = (DATA, SPACE)


def make_mesh(data: Optional[int] = None, space: Optional[int] = None, devices: Optional[Sequence] = None) -> Mesh:
    """A (data, space) mesh over ``devices`` (default: all of ``jax.devices()``, every process's).

    With no sizes, all devices go to ``space`` (one video over every device); ``make_mesh(data=n)`` splits
    videos over n groups and the rest of the devices over space. data * space must equal the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data is None and space is None:
        data, space = 1, n
    elif data is None:
        data = n // space
    elif space is None:
        space = n // data
    if data * space != n or data < 1 or space < 1:
        raise ValueError(f"mesh data={data} x space={space} must use all {n} devices exactly")
    try:  # topology-aware order where jax knows one (TPU slices)
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh((data, space), devices=devices)
    except Exception:  # noqa: BLE001 - fall back to the given order (CPU, odd shapes)
        arr = np.asarray(devices, dtype=object).reshape(data, space)
    return Mesh(arr, AXES)


@dataclasses.dataclass(frozen=True)
class Partitioner:
    """Sharding rules over one mesh. Hashable, so it can sit in a Flax module attribute."""

    mesh: Mesh
    fsdp: bool = False

    @property
    def data_size(self) -> int:
        return self.mesh.shape[DATA]

    @property
    def size(self) -> int:
        return self.mesh.size

    def sharding(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    # activations ------------------------------------------------------------------------------------------
    def frames_spec(self) -> P:
        """(N, h, w, C) frame-folded activations: videos over data, height over space."""
        return P(DATA, SPACE, None, None)

    def video_spec(self) -> P:
        """(B, F, h, w, C) videos: videos over data, height over space."""
        return P(DATA, None, SPACE, None, None)

    def constrain(self, x):
        """The models' block-boundary hook: pin (N, h, w, C) activations to :meth:`frames_spec`."""
        if x.ndim != 4:
            return x
        return jax.lax.with_sharding_constraint(x, self.sharding(self.frames_spec()))

    # parameters -------------------------------------------------------------------------------------------
    def param_spec(self, shape: Sequence[int]) -> P:
        """Replicated, or (fsdp) split over every device along the largest dimension the device count divides."""
        if not self.fsdp or len(shape) == 0:
            return P()
        order = sorted(range(len(shape)), key=lambda i: -shape[i])
        for i in order:
            if shape[i] % self.size == 0 and shape[i] >= self.size:
                spec = [None] * len(shape)
                spec[i] = AXES
                return P(*spec)
        return P()

    def param_sharding(self, shape: Sequence[int]) -> NamedSharding:
        return self.sharding(self.param_spec(shape))


def place(array_fn, shape, dtype, sharding: NamedSharding):
    """Build a global jax.Array of ``shape`` on ``sharding`` from ``array_fn(index) -> numpy slice``, so each
    device (of this process) receives only its own slice, read straight from the source."""
    return jax.make_array_from_callback(tuple(shape), sharding, lambda idx: np.asarray(array_fn(idx), dtype))


def pad_to_multiple(n: int, m: int) -> int:
    """The smallest multiple of m that is >= n."""
    return int(math.ceil(n / m) * m)
