"""Device meshes and partitioning rules: the only place that knows about devices.

Mesh axes (:func:`make_mesh`):
  * ``"data"``:  the UNet batch (videos x the two CFG halves, [uncond; cond]) is split over it;
  * ``"space"``: the latent/pixel HEIGHT of every frame is split over it, so one video uses every device
    (convolutions exchange one-row halos, spatial attention gathers keys/values, temporal layers stay local:
    each pixel's frames stay on one device). ``benchmarks/sharding_report.py`` measured it against splitting
    the frames (``split="frames"``): for one SVD-XT video on 8 devices, CFG halves on data=2 and height on
    space=4 give 6.7x less compute per device with 6.1 GB of collectives per step; frames give 7.1x with
    24.7 GB; height alone (data=1) 4.6x with 13 GB.


The models call a ``constrain(x)`` hook on (N, h, w, C) activations at block boundaries (N = videos x frames,
b-major); :class:`Partitioner` provides it as ``with_sharding_constraint`` with these rules, and XLA inserts
the collectives. Parameters are replicated, or with ``fsdp=True`` split over all devices along their largest
dimension that divides (gathered by XLA where used).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, SPACE = "data", "space"
AXES = (DATA, SPACE)


def make_mesh(data: Optional[int] = None, space: Optional[int] = None, devices: Optional[Sequence] = None) -> Mesh:
    """A (data, space) mesh over ``devices`` (default: all of ``jax.devices()``, every process's).

    With no sizes: data = 2 (the two CFG halves of every video go to two device groups, which costs no
    communication) and space = the rest (each frame's height split), or (1, 1) on one device.
    ``make_mesh(data=n)`` splits a batch of videos over n groups. data * space must equal the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data is None and space is None:
        data = 2 if n % 2 == 0 else 1
        space = n // data
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
    split: str = "height"  # what the space axis splits inside a video: "height" or "frames"

    def __post_init__(self):
        if self.split not in ("height", "frames"):
            raise ValueError(f"split must be 'height' or 'frames', not {self.split!r}")

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
        """(N, h, w, C) frame-folded activations: videos over data, height (or frames) over space."""
        return P(DATA, SPACE, None, None) if self.split == "height" else P(AXES, None, None, None)

    def video_spec(self) -> P:
        """(B, F, h, w, C) videos: videos over data, height (or frames) over space."""
        return P(DATA, None, SPACE, None, None) if self.split == "height" else P(DATA, SPACE, None, None, None)

    def divides(self, spec: P, shape: Sequence[int]) -> bool:
        """Whether the mesh splits every dimension of ``shape`` evenly under ``spec``."""
        for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
            names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
            if dim % math.prod(self.mesh.shape[a] for a in names):
                return False
        return True

    def fit(self, spec: P, shape: Sequence[int]) -> P:
        """``spec`` with every dimension the mesh does not divide evenly left unsplit (replicated)."""
        out = []
        for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
            names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
            out.append(axes if dim % math.prod(self.mesh.shape[a] for a in names) == 0 else None)
        return P(*out)

    def pin(self, x, spec: P):
        """with_sharding_constraint(x, spec), with the dimensions the mesh does not divide left unsplit.
        Every activation gets an explicit, even layout: XLA's own choices for uneven splits (padded shards)
        gave wrong results with this jaxlib on CPU."""
        return jax.lax.with_sharding_constraint(x, self.sharding(self.fit(spec, x.shape)))

    def replicate(self, x):
        """Pin ``x`` replicated on every device (used for convolution kernels, see :meth:`tracing`)."""
        return jax.lax.with_sharding_constraint(x, self.sharding(P()))

    def tracing(self):
        """Context to trace sharded model calls in: every convolution kernel is pinned replicated at its use
        (gathered there when FSDP-split), which XLA needs to partition convolutions correctly (models/layers.py)."""
        from .models.layers import kernel_hook

        return kernel_hook(self.replicate)

    def constrain(self, x):
        """The models' block-boundary hook: pin (N, h, w, C) activations to :meth:`frames_spec`."""
        return self.pin(x, self.frames_spec()) if x.ndim == 4 else x

    def input_sharding(self, spec: P, shape: Sequence[int]) -> NamedSharding:
        """``spec`` for a jit input of ``shape`` if the mesh divides it evenly (jit requires it), else replicated."""
        return self.sharding(spec if self.divides(spec, shape) else P())

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
