"""Video clips for fine-tuning SVD: a dataset of videos probed once, and a deterministic, prefetching batch loader.

``VideoClipDataset(source, num_frames, height, width)`` lists the videos of a folder (recursively) or of a
``.jsonl`` manifest, probes each once (frame count and fps) and keeps those long enough for one clip;
``dataset.clip(index, rng)`` decodes one clip: ``num_frames`` frames ``frame_stride`` apart from a start drawn
with ``rng``, each resized to cover ``height x width`` (keeping its aspect) and centre-cropped to it, as float32
in [-1, 1]. ``ClipLoader(dataset, batch_size, seed=...)`` is an endless iterator of batches built by a background
thread.

Design:

* Checks first. Sizes and counts are checked before any file is read; a bad manifest line is named by its line
  number. Everything wrong with the data is a ``DataError`` (a ``ValueError``) that says what is wrong and what
  would be right. Videos that cannot be used (unreadable, too short) are not fatal: each is skipped with one
  ``DataWarning`` and recorded in ``dataset.skipped``; only a dataset with nothing left is an error.
* Determinism from the seed alone. Epoch ``e`` visits the videos in the order
  ``numpy.random.default_rng([seed, e]).permutation(len(dataset))``; global batch ``k`` takes the next
  ``batch_size`` entries of that endless stream, and its clip ``i`` draws its start frame from
  ``numpy.random.default_rng([seed, k, i])``. A batch is thus a pure function of ``(seed, k)``: prefetching,
  the number of decoding threads, the process split and resuming (``position=k``) cannot change it.
* Multi-process. ``batch_size`` is global; process ``p`` of ``P`` builds only its rows
  ``[p b / P, (p + 1) b / P)``, so the processes' local batches put together are the one-process batch.
* Decode only what is needed. Each clip is one ffmpeg run whose ``select`` filter passes only the clip's frames
  and which stops (``-frames:v``) after the last of them; frames come back as PPM images, whose headers carry the
  size ffmpeg produced (after the rotation it applies from the file's metadata).
* No fork. ffmpeg (the binary imageio-ffmpeg bundles, or ``IMAGEIO_FFMPEG_EXE``) is started with
  ``subprocess`` without a ``preexec_fn``, so CPython uses vfork/posix_spawn and never runs the at-fork hooks:
  no JAX ``os.fork()`` warning and none of fork's risks in a process full of threads. (imageio-ffmpeg's own
  ``read_frames`` passes ``preexec_fn=os.setpgrp``; it is not used.) ``start_new_session`` keeps a Ctrl-C in the
  terminal from killing the decoders under a trainer that handles it.
* Probing counts frames the way decoding does: both decode the first video stream with ``-fps_mode passthrough``
  (no frames duplicated or dropped to a constant rate), so a probed count is a count that decoding can reach.
  ``-fps_mode`` needs ffmpeg 5.1 or newer, which imageio-ffmpeg bundles.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import queue
import re
import subprocess
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps

# What a folder source is searched for (compared case-insensitively).
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".avi", ".mkv", ".gif", ".m4v")


class DataError(ValueError):
    """Data that cannot be used as given (empty dataset, bad manifest, bad sizes); the message says what is right."""


class DataWarning(UserWarning):
    """One video was skipped (unreadable, too short); the message names the file and the reason."""


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """One usable video.

    path: the file (absolute, or as the folder / manifest gave it joined to its folder).
    num_frames: frames decodable from its first video stream (probed).
    fps: the manifest's fps if it gives one, else the file's (``default_fps`` where the file has none).
    motion_bucket_id: the manifest's value, or None (the dataset's default is used).
    """

    path: str
    num_frames: int
    fps: float
    motion_bucket_id: float | None


# ------------------------------------------------------------------------------------------------------------- ffmpeg


def _ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()  # the bundled binary, or IMAGEIO_FFMPEG_EXE


def _run_ffmpeg(args: list[str]) -> subprocess.CompletedProcess:
    # No preexec_fn: see the module docstring (no fork). stdin closed so ffmpeg never waits on a terminal.
    return subprocess.run([_ffmpeg_exe(), "-hide_banner", "-nostdin", *args], stdin=subprocess.DEVNULL,
                          capture_output=True, start_new_session=True, check=False)


def _last_log_line(stderr: bytes) -> str:
    lines = [ln.strip() for ln in stderr.decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


_STREAM_RE = re.compile(r"^\s*Stream #0:\d+.*?: Video: (.*)$")
_RATE_RE = r"(\d+(?:\.\d+)?)(k?) {}"


def _parse_fps(log: str) -> float | None:
    """The frame rate ffmpeg reports for the first video stream of input 0 ("N fps", else "N tbr"); None if none."""
    for line in log.splitlines():
        if line.startswith(("Output #", "Stream mapping")):
            break  # past the input's description
        m = _STREAM_RE.match(line)
        if not m:
            continue
        for unit in ("fps", "tbr"):
            r = re.search(_RATE_RE.format(unit), m.group(1))
            if r:
                fps = float(r.group(1)) * (1000.0 if r.group(2) else 1.0)
                if math.isfinite(fps) and fps > 0:
                    return fps
        return None
    return None


def probe_video(path: str | os.PathLike) -> tuple[int, float | None]:
    """(frame count, fps or None) of the first video stream of ``path``, by decoding it once.

    Raises ``OSError`` with ffmpeg's last log line when ffmpeg cannot decode the file.
    """
    r = _run_ffmpeg(["-i", os.fspath(path), "-map", "0:v:0", "-fps_mode", "passthrough",
                     "-progress", "pipe:1", "-nostats", "-f", "null", "-"])
    if r.returncode != 0:
        raise OSError(f"ffmpeg could not decode it (exit status {r.returncode}: {_last_log_line(r.stderr)})")
    counts = re.findall(rb"^frame=\s*(\d+)\s*$", r.stdout, re.MULTILINE)  # -progress: the last block is the total
    if not counts:
        raise OSError(f"ffmpeg reported no frame count ({_last_log_line(r.stderr)})")
    return int(counts[-1]), _parse_fps(r.stderr.decode(errors="replace"))


def _split_ppms(data: bytes) -> list[np.ndarray]:
    # ffmpeg's PPM encoder writes "P6\n<w> <h>\n255\n" then h*w*3 bytes of RGB, per frame.
    frames, pos, view = [], 0, memoryview(data)
    while pos < len(data):
        header = []
        for _ in range(3):
            end = data.find(b"\n", pos)
            if end < 0:
                raise OSError("ffmpeg's output ended inside a frame header")
            header.append(data[pos:end])
            pos = end + 1
        if header[0] != b"P6" or header[2] != b"255":
            raise OSError(f"unexpected frame header from ffmpeg: {b' '.join(header)[:40]!r}")
        w, h = (int(v) for v in header[1].split())
        size = w * h * 3
        if pos + size > len(data):
            raise OSError("ffmpeg's output ended inside a frame")
        frames.append(np.frombuffer(view[pos:pos + size], np.uint8).reshape(h, w, 3))
        pos += size
    return frames


def read_clip_frames(path: str | os.PathLike, start: int, num_frames: int, frame_stride: int = 1) -> np.ndarray:
    """Frames ``start, start + frame_stride, ...`` (``num_frames`` of them) of ``path``: (F, h, w, 3) uint8 RGB.

    Only these frames leave ffmpeg, and it stops decoding after the last of them. Raises ``OSError`` when ffmpeg
    fails and ``DataError`` when the video has fewer frames than asked for.
    """
    if start < 0 or num_frames < 1 or frame_stride < 1:
        raise DataError(f"need start >= 0, num_frames >= 1, frame_stride >= 1; got {start}, {num_frames}, "
                        f"{frame_stride}")
    # n: the index of each decoded frame; the commas are escaped for the filtergraph parser.
    select = f"select=gte(n\\,{start})*not(mod(n-{start}\\,{frame_stride}))"
    r = _run_ffmpeg(["-v", "error", "-i", os.fspath(path), "-map", "0:v:0", "-vf", select,
                     "-fps_mode", "passthrough", "-frames:v", str(num_frames), "-f", "image2pipe", "-c:v", "ppm",
                     "-"])
    if r.returncode != 0:
        raise OSError(f"{path}: ffmpeg could not decode it (exit status {r.returncode}: "
                      f"{_last_log_line(r.stderr)})")
    frames = _split_ppms(r.stdout)
    if len(frames) != num_frames:
        raise DataError(f"{path}: decoded {len(frames)} frames from frame {start} with stride {frame_stride}, "
                        f"expected {num_frames} (did the file change since it was probed?)")
    if any(f.shape != frames[0].shape for f in frames):
        raise DataError(f"{path}: the frame size changes within the clip ({sorted({f.shape for f in frames})})")
    return np.stack(frames)


def fit_frame(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """(h, w, 3) uint8 -> (height, width, 3) float32 in [-1, 1]: resized to cover height x width keeping its
    aspect (PIL bicubic, antialiased when shrinking), then centre-cropped."""
    img = PIL.Image.fromarray(frame)
    if img.size != (width, height):
        # ImageOps.fit resizes just the centred crop box: the same as resize-to-cover then crop, in one pass.
        img = PIL.ImageOps.fit(img, (width, height), method=PIL.Image.Resampling.BICUBIC)
    return np.asarray(img, np.float32) * np.float32(1 / 127.5) - np.float32(1.0)


# ------------------------------------------------------------------------------------------------------------ sources


def _number(value, what: str, where: str, positive: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        kind = "a positive number" if positive else "a finite number"
        raise DataError(f"{where}: {what!r} must be {kind}; got {value!r}")
    return float(value)


def read_manifest(path: str | os.PathLike) -> list[tuple[str, float | None, float | None]]:
    """The entries of a JSONL manifest: [(path, fps or None, motion_bucket_id or None)], in file order.

    One JSON object per line with "path" (relative to the manifest's folder, or absolute) and optional "fps"
    (> 0) and "motion_bucket_id"; other keys are ignored, blank lines skipped. A bad line raises ``DataError``
    naming its line number.
    """
    path = Path(path)
    base = path.parent
    entries = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object such as "
                                '{"path": "clips/a.mp4", "fps": 7}') from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object with a \"path\", got {type(obj).__name__}")
            p = obj.get("path")
            if not isinstance(p, str) or not p:
                raise DataError(f"{where}: missing \"path\" (a non-empty string: the video, relative to "
                                f"{base} or absolute)")
            fps = obj.get("fps")
            mb = obj.get("motion_bucket_id")
            entries.append((os.fspath(base / p),  # an absolute p replaces base
                            None if fps is None else _number(fps, "fps", where, positive=True),
                            None if mb is None else _number(mb, "motion_bucket_id", where)))
    return entries


def find_videos(folder: str | os.PathLike) -> list[str]:
    """Video files under ``folder`` (recursively, by ``VIDEO_EXTENSIONS``), sorted by their path in it.

    Hidden files and folders (names starting with ".": .git, macOS "._" files, partial writes) are left out.
    """
    folder = Path(folder)
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and name.lower().endswith(VIDEO_EXTENSIONS):
                found.append(Path(root, name))
    # Sort on the path inside the folder, part by part, so the order is the same wherever the folder lives.
    return [os.fspath(p) for p in sorted(found, key=lambda p: p.relative_to(folder).parts)]


# ------------------------------------------------------------------------------------------------------------ dataset


class VideoClipDataset:
    """The usable videos of a folder or a JSONL manifest, and clips of them.

    Args:
      source: a folder (searched recursively for ``VIDEO_EXTENSIONS``, sorted) or a ``.jsonl`` manifest
        (see ``read_manifest``).
      num_frames: F, frames per clip (>= 1).
      height, width: H, W of the clips: positive multiples of ``vae_factor``.
      frame_stride: clips take every ``frame_stride``-th frame (>= 1); the clip's fps is the video's / stride.
      default_fps: the fps of a video whose file reports none and whose manifest entry gives none.
      default_motion_bucket_id: for videos whose manifest entry gives none (and every video of a folder).
      vae_factor: the VAE's downsampling factor, which H and W must be multiples of.
      warn: warn (``DataWarning``) once for each skipped video; they are recorded in ``skipped`` either way.
      probe_workers: videos probed at once (each probe is one ffmpeg run); the result does not depend on it.

    Attributes:
      videos: list[VideoInfo], the usable videos in source order.
      skipped: list[(path, reason)], the videos left out.

    Raises ``DataError`` for bad arguments (before any video is read), a bad source or manifest, and a dataset
    with no usable video.
    """

    def __init__(self, source, num_frames: int, height: int, width: int, *, frame_stride: int = 1,
                 default_fps: float = 7.0, default_motion_bucket_id: float = 127.0, vae_factor: int = 8,
                 warn: bool = True, probe_workers: int | None = None):
        if not isinstance(vae_factor, int) or vae_factor < 1:
            raise DataError(f"vae_factor must be a positive integer; got {vae_factor!r}")
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v % vae_factor:
                finite = isinstance(v, (int, float)) and math.isfinite(v)
                near = max(1, round(v / vae_factor)) * vae_factor if finite else 64 * vae_factor
                raise DataError(f"{name} must be a positive multiple of {vae_factor} (the VAE's downsampling "
                                f"factor), e.g. {near}; got {v!r}")
        if not isinstance(num_frames, int) or num_frames < 1:
            raise DataError(f"num_frames must be an integer >= 1; got {num_frames!r}")
        if not isinstance(frame_stride, int) or frame_stride < 1:
            raise DataError(f"frame_stride must be an integer >= 1; got {frame_stride!r}")
        self.default_fps = _number(default_fps, "default_fps", "VideoClipDataset", positive=True)
        self.default_motion_bucket_id = _number(default_motion_bucket_id, "default_motion_bucket_id",
                                                "VideoClipDataset")
        self.num_frames, self.height, self.width, self.frame_stride = num_frames, height, width, frame_stride
        self.source = os.fspath(source)
        # A clip spans (F - 1) * stride + 1 frames of its video.
        self.span = (num_frames - 1) * frame_stride + 1

        src = Path(self.source)
        if src.is_dir():
            entries = [(p, None, None) for p in find_videos(src)]
            if not entries:
                raise DataError(f"no video files found in {src} (looked for {', '.join(VIDEO_EXTENSIONS)}, "
                                "recursively)")
        elif src.is_file() and src.suffix.lower() == ".jsonl":
            entries = read_manifest(src)
            if not entries:
                raise DataError(f"no video files found in {src}: the manifest lists none (expected one JSON "
                                'object per line such as {"path": "clips/a.mp4"})')
        elif src.exists():
            raise DataError(f"source must be a folder of videos or a .jsonl manifest; got the file {src}")
        else:
            raise DataError(f"source {src} does not exist (expected a folder of videos or a .jsonl manifest)")

        workers = probe_workers if probe_workers is not None else min(4, os.cpu_count() or 1)
        with ThreadPoolExecutor(max(1, workers)) as pool:  # map keeps the order: results do not depend on it
            probes = list(pool.map(self._probe, [p for p, _, _ in entries]))

        self.videos: list[VideoInfo] = []
        self.skipped: list[tuple[str, str]] = []
        for (path, fps, mb), (count, file_fps, reason) in zip(entries, probes):
            if reason is None and count < self.span:
                reason = (f"too short: {count} frames, a clip of {num_frames} frames with stride {frame_stride} "
                          f"needs {self.span}")
            if reason is not None:
                self.skipped.append((path, reason))
                if warn:
                    warnings.warn(f"skipping {path}: {reason}", DataWarning, stacklevel=2)
                continue
            fps = fps if fps is not None else (file_fps if file_fps is not None else self.default_fps)
            self.videos.append(VideoInfo(path, count, fps, mb))
        if not self.videos:
            first = "; ".join(f"{Path(p).name}: {r}" for p, r in self.skipped[:3])
            more = "; ..." if len(self.skipped) > 3 else ""
            raise DataError(f"no usable videos in {src}: {len(self.skipped)} skipped ({first}{more})")

    @staticmethod
    def _probe(path: str) -> tuple[int, float | None, str | None]:
        if not os.path.isfile(path):
            return 0, None, "file not found"
        try:
            count, fps = probe_video(path)
        except OSError as e:
            return 0, None, f"unreadable: {e}"
        return count, fps, None

    def __len__(self) -> int:
        """The number of usable videos."""
        return len(self.videos)

    def clip(self, index: int, rng: np.random.Generator) -> dict:
        """One clip of video ``index``, its start frame drawn uniformly among the valid starts with ``rng``.

        Returns {"pixels": (F, H, W, 3) float32 in [-1, 1], "fps": float32 scalar (the video's fps / frame_stride,
        the clip's own rate), "motion_bucket_id": float32 scalar}.
        """
        if not 0 <= index < len(self.videos):
            raise IndexError(f"video index {index} out of range for {len(self.videos)} videos")
        info = self.videos[index]
        start = int(rng.integers(info.num_frames - self.span + 1))
        frames = read_clip_frames(info.path, start, self.num_frames, self.frame_stride)
        pixels = np.empty((self.num_frames, self.height, self.width, 3), np.float32)
        for j, frame in enumerate(frames):
            pixels[j] = fit_frame(frame, self.height, self.width)
        mb = info.motion_bucket_id if info.motion_bucket_id is not None else self.default_motion_bucket_id
        return {"pixels": pixels, "fps": np.float32(info.fps / self.frame_stride), "motion_bucket_id": np.float32(mb)}


# ------------------------------------------------------------------------------------------------------------- loader


class _Failure:
    """An exception raised while building a batch, carried through the queue to next()."""

    def __init__(self, exc: BaseException):
        self.exc = exc


class ClipLoader:
    """An endless iterator of batches of clips, deterministic from ``seed``, built ahead by a background thread.

    Args:
      dataset: the VideoClipDataset (or anything with ``len()`` and ``clip(index, rng) -> dict of arrays``, such
        as svd_jax/training/trainer.py's latent cache; a batch stacks every field).
      batch_size: b, the GLOBAL batch size (over all processes); a multiple of the process count.
      seed: a non-negative integer; the batches depend only on (seed, batch number).
      position: global batches already consumed (to resume): the first batch yielded is batch ``position``.
      prefetch: batches kept ready by the background thread; 0 builds each batch in next() (no thread).
      process_index, process_count: this process's p of P (default ``jax.process_index()`` /
        ``jax.process_count()``); it builds the rows [p b / P, (p + 1) b / P) of each global batch.
      workers: clips of a batch decoded at once (threads, each running ffmpeg); the batches do not depend on it.

    Each ``next(loader)`` returns {"pixels": (b_local, F, H, W, 3) float32 in [-1, 1], "fps": (b_local,) float32,
    "motion_bucket_id": (b_local,) float32}. ``loader.position`` counts the batches handed out (resume from it);
    ``loader.last_wait`` is the seconds the last next() waited for its batch. An exception raised while building
    a batch is raised by next() (and again by every later call). ``close()`` (or leaving a ``with`` block) stops
    the thread.
    """

    def __init__(self, dataset: VideoClipDataset, batch_size: int, *, seed: int = 0, position: int = 0,
                 prefetch: int = 2, process_index: int | None = None, process_count: int | None = None,
                 workers: int = 4):
        if len(dataset) < 1:
            raise DataError("the dataset has no videos")
        for name, v, low in (("batch_size", batch_size, 1), ("seed", seed, 0), ("position", position, 0),
                             ("prefetch", prefetch, 0), ("workers", workers, 1)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < low:
                raise DataError(f"{name} must be an integer >= {low}; got {v!r}")
        if process_index is None or process_count is None:
            import jax  # only here: the loader itself needs no JAX

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if process_count < 1 or not 0 <= process_index < process_count:
            raise DataError(f"need 0 <= process_index < process_count; got {process_index} of {process_count}")
        if batch_size % process_count:
            raise DataError(f"batch_size {batch_size} (global) must be a multiple of the process count "
                            f"{process_count}, e.g. {-(-batch_size // process_count) * process_count}")
        self.dataset = dataset
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.process_index, self.process_count = int(process_index), int(process_count)
        local = self.batch_size // self.process_count
        self.rows = range(self.process_index * local, (self.process_index + 1) * local)  # this process's rows
        self.position = int(position)
        self.last_wait = 0.0
        self._perms: dict[int, np.ndarray] = {}
        self._perms_lock = threading.Lock()
        self._error: BaseException | None = None
        self._closed = False
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="ClipLoader-decode") if workers > 1 else None
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        if prefetch > 0:
            self._queue = queue.Queue(maxsize=prefetch)
            self._thread = threading.Thread(target=self._produce, args=(self.position,), daemon=True,
                                            name="ClipLoader-prefetch")
            self._thread.start()

    # -- the stream of indices

    def _permutation(self, epoch: int) -> np.ndarray:
        with self._perms_lock:
            perm = self._perms.get(epoch)
            if perm is None:
                perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
                self._perms[epoch] = perm
                for old in [e for e in self._perms if e < epoch - 1]:  # batches only move forward
                    del self._perms[old]
            return perm

    def batch_indices(self, k: int) -> np.ndarray:
        """(batch_size,) int64: the dataset indices of global batch ``k`` (all processes' rows)."""
        n = len(self.dataset)
        g = np.arange(k * self.batch_size, (k + 1) * self.batch_size)  # positions in the endless stream
        out = np.empty(self.batch_size, np.int64)
        for epoch in np.unique(g // n):
            sel = g // n == epoch
            out[sel] = self._permutation(int(epoch))[g[sel] % n]
        return out

    def build(self, k: int) -> dict:
        """This process's part of global batch ``k`` (what the ``k``-th next() of a fresh loader returns)."""
        indices = self.batch_indices(k)
        one = lambda i: self.dataset.clip(int(indices[i]), np.random.default_rng([self.seed, k, i]))
        clips = list(self._pool.map(one, self.rows)) if self._pool is not None else [one(i) for i in self.rows]
        # every field of the clips stacked (the dataset's: pixels, fps, motion_bucket_id; a latent cache's too)
        return {k: np.stack([np.asarray(c[k]) for c in clips]) for k in clips[0]}

    # -- the background thread

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)  # a timeout, so that close() is seen while the queue is full
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, k: int) -> None:
        try:
            while not self._stop.is_set():
                if not self._put(self.build(k)):
                    return
                k += 1
        except BaseException as e:  # everything, so that next() never waits for a batch that will not come
            if not self._stop.is_set():
                self._put(_Failure(e))

    # -- the iterator

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._closed:
            raise RuntimeError("this ClipLoader is closed")
        if self._error is not None:
            raise self._error
        t0 = time.perf_counter()
        if self._queue is None:
            try:
                item = self.build(self.position)
            except BaseException as e:
                item = _Failure(e)
        else:
            while True:
                try:
                    item = self._queue.get(timeout=0.5)
                    break
                except queue.Empty:
                    if not self._thread.is_alive() and self._queue.empty():
                        item = _Failure(RuntimeError("the ClipLoader's prefetch thread ended unexpectedly"))
                        break
        self.last_wait = time.perf_counter() - t0
        if isinstance(item, _Failure):
            self._error = item.exc
            raise item.exc
        self.position += 1
        return item

    def close(self) -> None:
        """Stop the background thread and the decoders (idempotent); next() then raises RuntimeError."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._thread is not None:
            self._thread.join(timeout=30)  # a clip being decoded finishes first

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
