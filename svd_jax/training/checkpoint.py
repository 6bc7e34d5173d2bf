"""Resumable training checkpoints (orbax-checkpoint): the trainer's whole state, its metadata, its config.

:class:`TrainCheckpointer` saves an arbitrary JAX pytree (a ``flax.struct.dataclass`` train state with parameter
dicts, optax states, int32 counters, PRNG keys old-style ``PRNGKey`` uint32[2] or typed ``jax.random.key``),
sharded or not, with a small JSON-able metadata dict (data position, ...) and the run's config fingerprint, and
restores it onto the shardings of a target tree (any mesh: another device count than at save time works too).

Layout on disk (``directory``, e.g. ``OUTPUT/checkpoints``)::

    directory/
      4/                                   one folder per complete step (orbax CheckpointManager layout)
        state/                             orbax array item (OCDBT/zarr): a flat dict "leaf00000", "leaf00001", ...
                                           of the state's leaves in ``jax.tree_util`` flattening order; typed
                                           PRNG keys are stored as their uint32 key data
        meta/metadata                      JSON: {"format", "step", "fingerprint", "metadata", "leaves": [{"path",
                                           "shape", "dtype", "key_impl"}...]} ("path": jax.tree_util.keystr)
        _CHECKPOINT_METADATA               orbax's step metadata
        commit_success.txt                 orbax's completion marker
      6/ ...
      8.orbax-checkpoint-tmp-<timestamp>/  a save in progress (or cut off by a crash): never read, removed when
                                           the next TrainCheckpointer opens the directory

Guarantees:
  * A save is atomic. Orbax writes a step into a temporary folder and renames it to ``<step>`` once every process
    has written everything (on a local or POSIX filesystem; on GCS it writes in place and ``commit_success.txt``
    marks completion instead). :meth:`TrainCheckpointer.latest_step`, :meth:`~TrainCheckpointer.all_steps` and
    :meth:`~TrainCheckpointer.restore` see complete steps only, so a crash mid-save leaves the previous one as the
    latest. Older steps are deleted only after a newer one is complete (``keep`` newest are kept).
  * Saves are asynchronous by default: :meth:`~TrainCheckpointer.save` returns once the arrays are copied off
    the devices (the training step may then overwrite or donate them), and the files are written in the
    background. After :meth:`~TrainCheckpointer.wait` (or ``close``, or the next save) the step is complete.
  * Restoring checks, before reading any array, that the fingerprint is the stored one and that the tree
    (leaf paths), shapes and dtypes are those of the target; a mismatch raises :class:`CheckpointError` naming
    what differs. Restored leaves are bit-identical to the saved ones.
  * Multi-host: every process calls every method with the same arguments; orbax synchronises the processes and
    each writes and reads only its own shards.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, SingleDeviceSharding

from ..weights.errors import CheckpointError

__all__ = ["CheckpointError", "TrainCheckpointer"]

FORMAT = 1
STATE, META = "state", "meta"
_TMP_HINT = "temporary folders of unfinished saves (*.orbax-checkpoint-tmp*) are ignored"


def _json_normalised(value: Any, what: str) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, keys strings); TypeError if it is not JSON-able."""
    try:
        return json.loads(json.dumps(value, sort_keys=True, allow_nan=True))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be JSON-able (dicts, lists, str, numbers, bool, None): {e}") from None


def _flat_items(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": value} (lists and other values are compared whole)."""
    if not isinstance(d, dict):
        return {prefix: d} if prefix else {"": d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(_flat_items(v, key))
        else:
            out[key] = v
    return out


_ABSENT = "<absent>"


def fingerprint_differences(stored: dict | None, current: dict) -> list[str]:
    """The keys (dotted for nested dicts) whose values differ, as ``"key: stored X, current Y"`` lines."""
    a, b = _flat_items(stored or {}), _flat_items(current)
    lines = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if va != vb:
            show = lambda v: v if v is _ABSENT else json.dumps(v)
            lines.append(f"{key}: stored {show(va)}, current {show(vb)}")
    return lines


def _is_key_dtype(dtype) -> bool:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _default_sharding():
    """Where a leaf without a sharding goes: the first local device (one process), else replicated everywhere."""
    if jax.process_count() == 1:
        return SingleDeviceSharding(jax.local_devices()[0])
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("all",))
    return NamedSharding(mesh, jax.sharding.PartitionSpec())


def _leaf_spec(x) -> tuple[tuple[int, ...], str, str]:
    """(shape, dtype name, kind) of a state or target leaf; kind "jax" (jax.Array / ShapeDtypeStruct: restored as
    a jax.Array), "numpy" (np.ndarray / np scalar) or "python" (int, float, bool, complex)."""
    if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
        return tuple(x.shape), str(x.dtype), "jax"
    if isinstance(x, (np.ndarray, np.generic)):
        return tuple(x.shape), str(x.dtype), "numpy"
    if isinstance(x, (bool, int, float, complex)):
        return (), str(np.asarray(x).dtype), "python"
    raise CheckpointError(f"cannot checkpoint a state leaf of type {type(x).__name__} ({x!r:.80}): leaves must be "
                          "jax arrays, numpy arrays or Python numbers")


def _describe(state) -> tuple[list[str], list, Any]:
    """(leaf paths (keystr), leaves, treedef) of ``state``."""
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    return [jax.tree_util.keystr(p) for p, _ in path_leaves], [x for _, x in path_leaves], treedef


def _leaf_name(i: int) -> str:
    return f"leaf{i:05d}"


class TrainCheckpointer:
    """Periodic, resumable checkpoints of a training state in ``directory`` (module docstring: layout, guarantees).

    Args:
      directory: the checkpoint folder (created if missing), e.g. ``OUTPUT/checkpoints``; local path or a URL
        orbax/etils understand (``gs://...``).
      keep: how many of the newest steps are kept; older ones are deleted after a newer save is complete.
      save_every: :meth:`should_save` is True at the positive multiples of this (None: never; saves are then
        the caller's explicit ``save`` calls).
      fingerprint: a JSON-able description of the run's config (model config, num_frames, height, width,
        trainable parameters, optimizer, ...), stored with every checkpoint and checked by :meth:`restore`.
        None: nothing is checked.
      async_save: write files in the background (:meth:`wait` blocks until done); False: ``save`` returns with
        the step complete on disk.

    Every process of a multi-host run creates one with the same arguments and makes the same calls.
    """

    def __init__(self, directory, *, keep: int = 3, save_every: int | None = None, fingerprint: dict | None = None,
                 async_save: bool = True):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, not {keep}")
        if save_every is not None and save_every < 1:
            raise ValueError(f"save_every must be >= 1 or None, not {save_every}")
        directory = os.fspath(directory)
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self.keep, self.save_every = keep, save_every
        self.fingerprint = None if fingerprint is None else _json_normalised(fingerprint, "fingerprint")
        options = ocp.CheckpointManagerOptions(
            create=True,
            cleanup_tmp_directories=True,  # leftovers of saves cut off by a crash
            enable_async_checkpointing=async_save,
            **_keep_option(keep),
        )
        self._preempted_step: int | None = None
        self._manager = ocp.CheckpointManager(self.directory, item_names=(STATE, META), options=options)

    # --- when --------------------------------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        """True when ``save_every`` divides ``step`` (step > 0), or orbax saw a preemption notice for this step
        (jax.distributed runs on preemptible machines); False when ``save_every`` is None otherwise."""
        if self._periodic(step):
            return True
        try:  # a collective in jax.distributed runs: call should_save at every step on every process
            preempted = bool(self._manager.reached_preemption(step))
        except Exception:  # noqa: BLE001 - no preemption service (not a jax.distributed run)
            preempted = False
        if preempted:
            self._preempted_step = step
        return preempted

    def _periodic(self, step: int) -> bool:
        return self.save_every is not None and step > 0 and step % self.save_every == 0

    # --- save --------------------------------------------------------------------------------------------------
    def save(self, step: int, state, metadata: dict | None = None, *, force: bool = False) -> bool:
        """Save ``state`` (any pytree of jax / numpy arrays, Python numbers) and ``metadata`` (JSON-able) as
        ``step``. Returns whether a save started.

        Without ``force``, nothing is saved (False) when ``save_every`` is set and :meth:`should_save` is False,
        or when ``step`` is already saved. ``force=True`` saves regardless, replacing a saved ``step``. Saving
        a step older than the latest saved one raises :class:`CheckpointError` (the run went back: delete the
        newer steps with :meth:`delete`, or use a new directory). Each leaf is stored as one global array of its
        global shape (whatever its sharding), so any mesh can restore it; a typed key array of shape S as its key
        data, uint32 S + (2,) for threefry (S + (4,) for rbg), with the implementation's name. Asynchronous by
        default: complete after :meth:`wait`.
        """
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, not {step}")
        if not force and self.save_every is not None and not (self._periodic(step)
                                                              or step == self._preempted_step):
            return False
        steps = self.all_steps()
        if step in steps:
            if not force:
                return False
            self.delete(step)  # waits for a save of it still in progress
        elif steps and step < steps[-1]:
            raise CheckpointError(
                f"cannot save step {step} in {self.directory}: newer steps {[s for s in steps if s > step]} are "
                "there (restored from an older step?); the latest would stay the newer one. Delete them "
                "(TrainCheckpointer.delete) or start a new output dir")
        user_meta = {} if metadata is None else _json_normalised(metadata, "metadata")
        paths, leaves, _ = _describe(state)
        arrays, records = {}, []
        for i, (path, x) in enumerate(zip(paths, leaves)):
            shape, dtype, kind = _leaf_spec(x)
            record = {"path": path, "shape": list(shape), "dtype": dtype}
            if kind == "jax" and _is_key_dtype(x.dtype):
                record["key_impl"] = str(jax.random.key_impl(x))
                x = jax.random.key_data(x)
            elif kind == "python" or isinstance(x, np.generic):
                x = np.asarray(x)
            arrays[_leaf_name(i)] = x
            records.append(record)
        meta = {"format": FORMAT, "step": step, "fingerprint": self.fingerprint, "metadata": user_meta,
                "leaves": records}
        items = {META: ocp.args.JsonSave(meta)}
        if arrays:
            items[STATE] = ocp.args.StandardSave(arrays)
        return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))

    def wait(self) -> None:
        """Block until the save in progress (if any) is complete on disk."""
        self._manager.wait_until_finished()

    # --- which -------------------------------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """The complete saved steps, ascending (a save still in progress is not listed before :meth:`wait`)."""
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete step, or None if there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def delete(self, step: int) -> None:
        """Delete a saved step."""
        self.wait()
        self._manager.delete(int(step))

    # --- restore -----------------------------------------------------------------------------------------------
    def read_metadata(self, step: int | None = None) -> dict:
        """The stored JSON of ``step`` (None: latest): {"format", "step", "fingerprint", "metadata", "leaves"};
        reads no arrays and checks nothing."""
        step = self._pick_step(step)
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
        except Exception as e:  # noqa: BLE001 - an unreadable step folder
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is unreadable: {e}") from e

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict]:
        """Restore ``step`` (None: the latest) as a tree like ``abstract_state``; returns (state, metadata).

        ``abstract_state``: the state's tree with every leaf a ``jax.ShapeDtypeStruct`` (e.g. from
        ``jax.eval_shape``) carrying the target ``.sharding`` (a NamedSharding on any mesh, or a
        SingleDeviceSharding), or concrete arrays (their shardings are used), numpy arrays (restored as numpy)
        or Python numbers. A ShapeDtypeStruct without a sharding goes to the first device (one process) or is
        replicated over all devices. Typed PRNG key leaves (dtype ``key<impl>``) come back as typed keys.

        Raises :class:`CheckpointError` when there is no checkpoint, when the stored fingerprint differs from this
        checkpointer's (naming the keys, stored and current values), and when the tree, a shape or a dtype differs
        (naming the first leaf that does).
        """
        step = self._pick_step(step)
        meta = self.read_metadata(step)
        where = f"checkpoint step {step} in {self.directory}"
        if self.fingerprint is not None:
            diffs = fingerprint_differences(meta.get("fingerprint"), self.fingerprint)
            if diffs:
                raise CheckpointError(
                    f"{where} was saved with other settings:\n  " + "\n  ".join(diffs)
                    + "\nresume with the same settings or start a new output dir")
        paths, leaves, treedef = _describe(abstract_state)
        records = meta.get("leaves", [])
        _check_tree(where, [r["path"] for r in records], paths)
        targets = {}
        for i, (path, x, r) in enumerate(zip(paths, leaves, records)):
            shape, dtype, kind = _leaf_spec(x)
            if tuple(r["shape"]) != shape or r["dtype"] != dtype:
                raise CheckpointError(
                    f"{where} does not fit the target state: leaf {path} is stored as {r['dtype']}{r['shape']}, "
                    f"the target is {dtype}{list(shape)}")
            targets[_leaf_name(i)] = _restore_target(x, kind, r)
        restored = {}
        if targets:
            try:
                restored = self._manager.restore(
                    step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(targets)}))[STATE]
            except Exception as e:  # noqa: BLE001 - corrupt files, a sharding that does not fit the shape, ...
                raise CheckpointError(f"{where} could not be read onto the target state: {e}") from e
        out = [_finish_leaf(restored[_leaf_name(i)], x, r) for i, (x, r) in enumerate(zip(leaves, records))]
        return jax.tree_util.tree_unflatten(treedef, out), meta.get("metadata") or {}

    def _pick_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint found in {self.directory} (looked for complete step folders; "
                                  f"{_TMP_HINT})")
        if step is None:
            return steps[-1]
        if int(step) not in steps:
            raise CheckpointError(f"no checkpoint of step {step} in {self.directory}: the complete steps are {steps}")
        return int(step)

    # --- lifetime ----------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Wait for the save in progress and release orbax's threads."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TrainCheckpointer({self.directory!r}, keep={self.keep}, save_every={self.save_every})"


def _keep_option(keep: int) -> dict:
    """The retention option: orbax's preservation policy where it exists (max_to_keep is deprecated there)."""
    policies = getattr(getattr(ocp, "checkpoint_managers", None), "LatestN", None)
    return dict(preservation_policy=policies(n=keep)) if policies is not None else dict(max_to_keep=keep)


def _check_tree(where: str, stored: Sequence[str], target: Sequence[str]) -> None:
    """CheckpointError naming the first leaf path where the stored and the target trees differ."""
    if list(stored) == list(target):
        return
    first = next((i for i, (a, b) in enumerate(zip(stored, target)) if a != b), min(len(stored), len(target)))
    a = stored[first] if first < len(stored) else "<no more leaves>"
    b = target[first] if first < len(target) else "<no more leaves>"
    missing = [p for p in target if p not in set(stored)]
    unexpected = [p for p in stored if p not in set(target)]
    extra = "".join(f"\n  {label} ({len(ps)}): {', '.join(ps[:5])}{' ...' if len(ps) > 5 else ''}"
                    for label, ps in (("not in the checkpoint", missing), ("not in the target", unexpected)) if ps)
    raise CheckpointError(
        f"{where} does not fit the target state's tree ({len(stored)} stored leaves, {len(target)} in the target): "
        f"first mismatching leaf #{first}: stored {a}, target {b}{extra}")


def _restore_target(x, kind: str, record: dict):
    """What orbax restores leaf ``x`` as: a ShapeDtypeStruct with a sharding (a jax.Array), or without (numpy)."""
    if kind != "jax":
        return jax.ShapeDtypeStruct(tuple(record["shape"]), np.dtype(record["dtype"]))
    sharding = getattr(x, "sharding", None) or _default_sharding()
    if "key_impl" in record:
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
        if not isinstance(sharding, (NamedSharding, SingleDeviceSharding)):
            sharding = _default_sharding()  # moved onto the key's own sharding after wrapping (_finish_leaf)
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)  # trailing key dims: unsplit
    return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=sharding)


def _finish_leaf(value, x, record: dict):
    """The restored array as the target leaf's kind: typed keys rewrapped, numpy scalars and Python numbers."""
    if "key_impl" in record:
        key = jax.random.wrap_key_data(value, impl=record["key_impl"])
        sharding = getattr(x, "sharding", None)
        if sharding is not None and key.sharding != sharding:
            key = jax.device_put(key, sharding)
        return key
    if isinstance(x, np.generic):
        return x.dtype.type(np.asarray(value)[()])
    if isinstance(x, (bool, int, float, complex)):
        return type(x)(np.asarray(value).item())
    return value
