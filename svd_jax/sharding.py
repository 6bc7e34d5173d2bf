"""Device meshes and partitioning rules: the only place that knows about devices.

Mesh axes (:func:`make_mesh`):
  * ``"data"``:  the UNet batch (videos x the two CFG halves, [uncond; cond]) is split over it, and in the VAE
    decode one video per device group;
  * ``"space"``: splits the inside of a video, so one video uses every device. The default rule
    (``split="height+frames"``) splits each frame's HEIGHT where the space axis divides it (convolutions exchange
    one-row halos, spatial attention gathers keys/values, temporal layers stay local) and the frames over all
    devices in the UNet levels where it does not (SVD-XT's 18- and 9-row levels on 4 or 8 devices). Chosen by
    ``benchmarks/sharding_report.py``: for one SVD-XT video (CFG, bf16) on 8 devices it gives 7.7x less
    compute per device than one device on a 2 x 4 mesh (9.3 GB of collectives per step) and 7.5x on 1 x 8;
    height only gives 6.7x / 4.6x, frames only 7.1x with 24.7 GB.

Uneven splits (a dimension the axis does not divide) are padded by XLA, never replicated; jit inputs, which
must split evenly, are left whole on such dimensions. Convolution kernels are pinned replicated where they are
used (:meth:`Partitioner.model_options`): without that, XLA's Shardy partitioner split a kernel's taps along with a
device-split image axis and computed wrong convolutions (jax 0.10, CPU).

The models apply ``options.constrain(x)`` (:class:`~svd_jax.options.ModelOptions`) to (N, h, w, C) activations
at block boundaries (N = videos x frames, b-major); :meth:`Partitioner.model_options` sets it to
``with_sharding_constraint`` with these rules, and XLA inserts the collectives. Parameters are replicated, or
with ``fsdp=True`` split over all devices along their largest dimension that divides (gathered by XLA where used).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .options import ModelOptions

DATA, SPACE = "data", "space"
AXES = (DATA, SPACE)
SPLITS = ("height+frames", "height", "frames")


def make_mesh(data: int | None = None, space: int | None = None, devices: Sequence | None = None) -> Mesh:
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
    split: str = "height+frames"  # what the space axis splits inside a video (SPLITS; module docstring)

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {self.split!r}")

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
        return P(AXES, None, None, None) if self.split == "frames" else P(DATA, SPACE, None, None)

    def video_spec(self) -> P:
        """(B, F, h, w, C) videos: videos over data, height (or frames) over space."""
        return P(DATA, SPACE, None, None, None) if self.split == "frames" else P(DATA, None, SPACE, None, None)

    def fit(self, spec: P, shape: Sequence[int]) -> P:
        """``spec`` with every dimension the mesh does not divide evenly left unsplit (replicated)."""
        out = []
        for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
            names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
            out.append(axes if dim % math.prod(self.mesh.shape[a] for a in names) == 0 else None)
        return P(*out)

    def pin(self, x, spec: P):
        """with_sharding_constraint(x, spec). A dimension the mesh does not divide is split unevenly (XLA pads
        the last shards), which costs less than leaving it whole on every device."""
        return jax.lax.with_sharding_constraint(x, self.sharding(spec))

    def replicate(self, x):
        """Pin ``x`` replicated on every device (used for convolution kernels, see :meth:`model_options`)."""
        return jax.lax.with_sharding_constraint(x, self.sharding(P()))

    def model_options(self, options: ModelOptions) -> ModelOptions:
        """``options`` for models running in a program partitioned over this mesh: activations pinned at block
        boundaries (:meth:`constrain`), every convolution kernel pinned replicated at its use (gathered there
        when FSDP-split), which XLA needs to partition convolutions correctly, no single-device kernels and no
        row slicing (``partitioned``), and the mesh's platform."""
        return options.replace(partitioned=True, constrain=self.constrain, conv_kernel_hook=self.replicate,
                               platform=self.mesh.devices.flat[0].platform)

    def constrain(self, x):
        """The models' block-boundary hook: pin (N, h, w, C) activations to :meth:`frames_spec` (with
        ``split="height+frames"``, the frames over all devices where the space axis does not divide the height)."""
        if x.ndim != 4:
            return x
        spec = self.frames_spec()
        if self.split == "height+frames" and x.shape[1] % self.mesh.shape[SPACE]:
            spec = P(AXES, None, None, None)
        return self.pin(x, spec)

    def input_sharding(self, spec: P, shape: Sequence[int]) -> NamedSharding:
        """``spec`` for a jit input of ``shape``, dimensions the mesh does not divide unsplit (jit inputs must
        split evenly)."""
        return self.sharding(self.fit(spec, shape))

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
