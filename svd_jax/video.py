"""Video and image I/O: export_to_video (H.264 through the ffmpeg that imageio-ffmpeg bundles), export_to_gif,
save_video (either, by the file's extension), the cheap up-front checks check_output_path / check_fps, and load_image.

What a caller can rely on:

* Checks first: ``check_output_path`` and ``check_fps`` encode nothing, so a CLI can run them before it loads
  weights; the writers run them again. Their failures are ``ValueError`` with a message naming the problem and
  what would be right.
* Failures raise: anything ffmpeg refuses raises ``VideoWriteError`` with ffmpeg's exit status and the tail of its
  log; a bad frame raises ``ValueError``.
* Atomic writes: the video goes to a hidden temporary file beside the output (``.NAME.partial-XXXXXXXX.EXT``) that
  replaces the output only once it is complete. A failed or interrupted write (an exception, KeyboardInterrupt)
  leaves the old file byte for byte, or no file, and no temporary file.
* No fork: ffmpeg is started with ``subprocess.Popen`` without a ``preexec_fn`` (CPython then starts it with
  vfork/posix_spawn and exec, and never runs the ``os.register_at_fork`` hooks), so JAX's
  ``RuntimeWarning: os.fork() was called ...`` is not triggered. imageio-ffmpeg's own writer passes
  ``preexec_fn=os.setpgrp``, which makes CPython fork the whole process and run those hooks; it is not used.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps

Frames = Sequence[PIL.Image.Image] | np.ndarray | Iterable[PIL.Image.Image | np.ndarray]

# Extensions export_to_video writes (H.264 in yuv420p; each container is told to ffmpeg explicitly) ...
VIDEO_SUFFIXES = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska"}
# ... and export_to_gif.
GIF_SUFFIXES = (".gif",)
SUPPORTED_SUFFIXES = (*VIDEO_SUFFIXES, *GIF_SUFFIXES)
_SUPPORTED_TEXT = ".mp4, .mov, .mkv (H.264 video) and .gif"

# H.264 quality: constant rate factor 10, what imageio-ffmpeg's quality=8 gave before (0 lossless .. 51 worst).
_CRF = 10


class VideoWriteError(RuntimeError):
    """The encoder (ffmpeg) failed or wrote nothing; the message carries its exit status and the tail of its log."""


# ---------------------------------------------------------------------------------------------------------- checks


def check_output_path(path: str | os.PathLike) -> Path:
    """Check, without encoding anything, that a video or GIF can be written at ``path``; return it as a Path.

    Checks, each failing with a ``ValueError`` that says what is wrong and what would be right:

    * the extension is one this module writes: .mp4, .mov, .mkv (H.264 video, ``export_to_video``) or .gif
      (``export_to_gif``), in any letter case; ``save_video`` picks the writer from it;
    * the path is not a folder, and if something already exists there it is a regular file (or a link to one)
      that may be written (it is replaced whole only once the new video is complete);
    * its folder exists, is a folder, and a file can be created in it (tried for real with an empty hidden file
      that is removed at once, so read-only file systems and permissions are caught as they are, even for root).

    ``~`` is expanded. Cheap enough to run before loading model weights, so that a typo costs nothing.
    """
    return _check_output_path(path, SUPPORTED_SUFFIXES)


def check_fps(fps: float, path: str | os.PathLike | None = None) -> float:
    """Check a frame rate and return it as a float.

    fps must be a real number (not a bool or a string), finite and greater than 0. With ``path`` ending in .gif
    it must also fit GIF frame delays, which are whole hundredths of a second from 2/100 s (players show shorter
    delays as 1/10 s) to 65535/100 s: 100/65535 <= fps <= 50 (export_to_gif rounds the delay to the nearest
    hundredth: 7 fps plays at 100/14). Raises ``ValueError`` naming the problem.
    """
    if isinstance(fps, (bool, np.bool_, str, bytes)) or not hasattr(fps, "__float__"):  # numbers, numpy/jax scalars
        raise ValueError(f"fps must be a number of frames per second (e.g. 7); got {fps!r}")
    try:
        value = float(fps)
    except (TypeError, ValueError) as e:
        raise ValueError(f"fps must be a number of frames per second (e.g. 7); got {fps!r}") from e
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"fps must be a finite number greater than 0 (e.g. 7); got {fps!r}")
    if path is not None and Path(path).suffix.lower() in GIF_SUFFIXES:
        _gif_delay_cs(value)
    return value


def _check_output_path(path, suffixes, writer: str | None = None) -> Path:
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"the output path must be a file name such as video.mp4; got {path!r}")
    p = Path(path).expanduser()
    try:
        return _check_path(p, suffixes, writer)
    except OSError as e:  # a stat refused on the way (a folder that cannot be searched, ...)
        raise ValueError(f"output {p}: {e.strerror or e}; choose a path in a folder you can write") from e


def _check_path(p: Path, suffixes, writer: str | None) -> Path:
    if p.is_dir():
        raise ValueError(f"output {p} is a folder; give a file name in it, e.g. {p / 'video.mp4'}")
    suffix = p.suffix.lower()
    if suffix not in suffixes:
        if suffix in SUPPORTED_SUFFIXES and writer:  # a supported extension, but for the other writer
            other = "export_to_gif" if suffix in GIF_SUFFIXES else "export_to_video"
            raise ValueError(f"output {p}: {writer} does not write {suffix} files; use {other} (or save_video, "
                             f"which picks the writer from the extension)")
        got = f"extension {p.suffix!r}" if p.suffix else "no extension"
        raise ValueError(f"output {p} has {got}; supported: {_SUPPORTED_TEXT}")
    target = _target(p)
    if target.exists():
        if not target.is_file():
            raise ValueError(f"output {p} exists and is not a regular file; choose another name")
        if not os.access(target, os.W_OK):
            raise ValueError(f"output {p} exists and is read-only; make it writable or choose another name")
    folder = target.parent
    if not folder.exists():
        raise ValueError(f"output {p}: the folder {folder} does not exist; create it first (mkdir -p {folder})")
    if not folder.is_dir():
        raise ValueError(f"output {p}: {folder} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".svd-jax-write-check-", dir=folder)
    except OSError as e:
        raise ValueError(f"output {p}: cannot create files in the folder {folder} ({e.strerror or e}); "
                         "choose a writable folder") from e
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return p


def _target(p: Path) -> Path:
    """The file that gets written: a link's target (the link itself stays), else the path."""
    return Path(os.path.realpath(p)) if p.is_symlink() else p


def _gif_delay_cs(fps: float) -> int:
    """The GIF frame delay in hundredths of a second for fps (rounded to the nearest whole one)."""
    cs = round(100 / fps)
    if fps > 50 or not 2 <= cs <= 65535:
        raise ValueError(f"fps {fps:g} does not fit a GIF: its frame delays are whole 1/100 s from 2/100 s (50 fps; "
                         "players show shorter ones as 1/10 s) to 65535/100 s, so fps must be between 0.0016 and 50; "
                         "write an .mp4 for other rates")
    return cs


def _fps_fraction(fps) -> Fraction:
    """A checked fps as the rational ffmpeg gets: a Fraction as it is, a float as the nearest with a denominator up
    to 1e6 (30000/1001 stays itself)."""
    value = check_fps(fps)
    frac = fps if isinstance(fps, Fraction) else Fraction(value).limit_denominator(1_000_000)
    if frac <= 0 or frac.denominator > 1_000_000 or frac.numerator > 1_000_000:
        raise ValueError(f"fps {value:g} is out of the range a video can carry (1e-6 to 1e6 frames per second)")
    return frac


# ---------------------------------------------------------------------------------------------------------- frames


def _array_to_uint8(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{what} have dtype {arr.dtype}; pass uint8 (0..255) or floats in [0, 1]")
    if not (np.issubdtype(arr.dtype, np.floating) and arr.dtype.itemsize >= 4):  # float16, bfloat16, ...
        try:
            arr = arr.astype(np.float32)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{what} have dtype {arr.dtype}; pass uint8 (0..255) or floats in [0, 1]") from e
    if arr.size and not (np.isfinite(arr.min()) and np.isfinite(arr.max())):  # min/max carry a NaN; no mask
        n = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"{what} hold {n} NaN or infinite values (of {arr.size}); frames must be finite "
                         "floats in [0, 1] or uint8")
    out = np.clip(arr, 0.0, 1.0)  # a fresh array: scaled and rounded in place (same values as before, fewer copies)
    out *= 255
    np.rint(out, out=out)
    return out.astype(np.uint8)


def _frame_to_uint8(frame, i: int) -> np.ndarray:
    if isinstance(frame, PIL.Image.Image):
        return np.asarray(frame.convert("RGB"))
    try:
        arr = np.asarray(frame)
    except (TypeError, ValueError) as e:
        raise ValueError(f"frame {i} is a {type(frame).__name__}, not a PIL image or an (H, W, 3) array") from e
    if arr.ndim == 4 or (arr.dtype == object and arr.ndim >= 1):
        raise ValueError(f"frame {i} is not one image (shape {arr.shape}): for a batch from the pipeline pass one "
                         "video, frames[0]")
    if arr.ndim != 3 or arr.shape[-1] != 3 or 0 in arr.shape:
        raise ValueError(f"frame {i} has shape {arr.shape}; a frame is a PIL image or an array (H, W, 3)")
    return _array_to_uint8(arr, f"frame {i}")


def _iter_frames(frames: Frames) -> Iterator[np.ndarray]:
    """Validated uint8 (H, W, 3) frames, all of one size. Arrays and lists are checked whole before the first frame
    is given out (so a bad frame never starts an encoder); other iterables (generators) frame by frame."""
    if isinstance(frames, (str, bytes, PIL.Image.Image)) or not (
            isinstance(frames, (np.ndarray, Iterable)) or hasattr(frames, "__array__")):
        raise ValueError(f"frames must be a list of PIL images, an array (F, H, W, 3) or an iterable of frames; "
                         f"got {type(frames).__name__}")
    if isinstance(frames, np.ndarray) or (hasattr(frames, "__array__") and not isinstance(frames, (list, tuple))):
        arr = np.asarray(frames)
        if arr.ndim != 4 or arr.shape[-1] != 3 or 0 in arr.shape[1:]:
            hint = "; for a batch from the pipeline pass one video: frames[0]" if arr.ndim == 5 else ""
            raise ValueError(f"frames must be a list of PIL images or an array (F, H, W, 3); got shape {arr.shape}"
                             + hint)
        items: Iterable[np.ndarray] = _array_to_uint8(arr, "frames")
    elif isinstance(frames, (list, tuple)):
        items = [_frame_to_uint8(f, i) for i, f in enumerate(frames)]
        _same_size(items)
    else:
        items = (_frame_to_uint8(f, i) for i, f in enumerate(frames))
    return _checked_sizes(iter(items))


def _same_size(items: list[np.ndarray]) -> None:
    for i, f in enumerate(items):
        if f.shape != items[0].shape:
            raise ValueError(f"frame {i} is {f.shape[1]}x{f.shape[0]} but frame 0 is "
                             f"{items[0].shape[1]}x{items[0].shape[0]}; all frames must have one size")


def _checked_sizes(it: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    first = None
    for i, f in enumerate(it):
        if first is None:
            first = f.shape
        elif f.shape != first:
            raise ValueError(f"frame {i} is {f.shape[1]}x{f.shape[0]} but frame 0 is {first[1]}x{first[0]}; "
                             "all frames must have one size")
        yield f


def _first(it: Iterator[np.ndarray]) -> np.ndarray:
    first = next(it, None)
    if first is None:
        raise ValueError("frames is empty: a video needs at least one frame")
    return first


# ---------------------------------------------------------------------------------------------------------- output


@contextlib.contextmanager
def _atomic_output(p: Path) -> Iterator[Path]:
    """Yield a fresh hidden temporary file beside ``p`` (same extension); on success it replaces ``p`` (permission
    bits of an old ``p`` kept, a new file gets the umask's), on any failure or interrupt it is removed."""
    target = _target(p)
    stem = target.stem[:50]  # room for the rest within the 255-byte file-name limit, even in 4-byte UTF-8
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = target.with_name(f".{stem}.partial-{secrets.token_hex(4)}{target.suffix}")
        try:
            fd = os.open(tmp, flags, 0o666)  # 0o666 less the umask, like any new file
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - 100 random names taken
        raise FileExistsError(f"could not create a temporary file beside {target}")
    os.close(fd)
    try:
        yield tmp
        if tmp.stat().st_size == 0:
            raise VideoWriteError(f"writing {p}: the encoder wrote nothing")
        if target.exists():
            shutil.copymode(target, tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data is on disk before the name points at it
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()  # the bundled binary, or IMAGEIO_FFMPEG_EXE


def _encode_h264(first: np.ndarray, rest: Iterator[np.ndarray], out: Path, fps: Fraction, muxer: str,
                 shown: Path) -> None:
    """Pipe raw RGB frames into ffmpeg (libx264, yuv420p) writing ``out``; raise VideoWriteError if it fails."""
    h, w = first.shape[:2]
    cmd = [_ffmpeg_exe(), "-hide_banner", "-nostats", "-loglevel", "error",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-framerate", str(fps), "-i", "pipe:0",
           "-an", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", str(_CRF)]
    if muxer in ("mp4", "mov"):
        cmd += ["-movflags", "+faststart"]  # the index up front: plays while it downloads
    cmd += ["-f", muxer, "-y", "file:" + os.path.abspath(out)]  # file: so that no name is read as a protocol
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a chatty ffmpeg can never block on it
        # No preexec_fn, start_new_session or process_group: CPython starts ffmpeg with vfork/posix_spawn + exec and
        # runs no at-fork hooks (JAX's fork warning), and the child cannot deadlock on the parent's threads' locks.
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log)
        try:
            try:
                proc.stdin.write(first.data if first.flags.c_contiguous else first.tobytes())
                for frame in rest:
                    proc.stdin.write(frame.data if frame.flags.c_contiguous else frame.tobytes())
                proc.stdin.close()  # end of input: ffmpeg finishes the file and exits
            except BrokenPipeError:  # ffmpeg quit early: its exit status and log say why
                pass
            rc = proc.wait()
        except BaseException:  # a bad frame, KeyboardInterrupt, ...: stop ffmpeg now, the caller removes the file
            proc.kill()
            raise
        finally:
            with contextlib.suppress(OSError):  # closes the pipe even where flushing it fails
                proc.stdin.close()
            proc.wait()
        if rc != 0:
            log.seek(0)
            lines = log.read().decode("utf-8", "replace").strip().splitlines()
            tail = "\n".join(lines[-15:]) or "(no message)"
            status = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
            raise VideoWriteError(f"ffmpeg could not write {shown} ({status}):\n{tail}")


def export_to_video(frames: Frames, path: str | os.PathLike, fps: float = 7) -> Path:
    """Write one video as H.264 (yuv420p, plays everywhere) through the ffmpeg that imageio-ffmpeg bundles.

    Args:
      frames: a list of F PIL images, an array (F, H, W, 3) float in [0, 1] (clipped) or uint8, or an iterable
        (e.g. a generator) of such frames, encoded as they come. Sizes must be even (yuv420p).
      path: output file, .mp4, .mov or .mkv (checked first by check_output_path's rules).
      fps: frames per second (check_fps).

    Returns:
      the path written. An existing file there is replaced only once the new video is complete.

    Raises:
      ValueError: a bad path, fps or frames (nothing is written). VideoWriteError: ffmpeg failed (its log in the
      message). On any failure or interrupt the old file, if any, is left as it was and no temporary file remains.
    """
    p = _check_output_path(path, tuple(VIDEO_SUFFIXES), "export_to_video")
    rate = _fps_fraction(fps)
    it = _iter_frames(frames)
    first = _first(it)
    h, w = first.shape[:2]
    if h % 2 or w % 2:
        raise ValueError(f"H.264 (yuv420p) needs even frame sizes; got {w}x{h}")
    with _atomic_output(p) as tmp:
        _encode_h264(first, it, tmp, rate, VIDEO_SUFFIXES[p.suffix.lower()], p)
    return p


def export_to_gif(frames: Frames, path: str | os.PathLike, fps: float = 7) -> Path:
    """Write one video as a looping GIF; frames as for export_to_video (any size). Returns the path written.

    fps must fit GIF delays (check_fps with a .gif path: at most 50). Raises ValueError for a bad path, fps or
    frames; the write is atomic as for export_to_video.
    """
    p = _check_output_path(path, GIF_SUFFIXES, "export_to_gif")
    delay_cs = _gif_delay_cs(check_fps(fps))
    it = _iter_frames(frames)
    imgs = [PIL.Image.fromarray(_first(it))]
    imgs += [PIL.Image.fromarray(f) for f in it]
    with _atomic_output(p) as tmp:
        imgs[0].save(tmp, format="GIF", save_all=True, append_images=imgs[1:], duration=delay_cs * 10, loop=0)
    return p


def save_video(frames: Frames, path: str | os.PathLike, fps: float = 7) -> Path:
    """export_to_gif for a .gif path, export_to_video for .mp4/.mov/.mkv; returns the path written."""
    p = check_output_path(path)
    writer = export_to_gif if p.suffix.lower() in GIF_SUFFIXES else export_to_video
    return writer(frames, p, fps=fps)


def load_image(path_or_url: str | os.PathLike, timeout: float = 30.0) -> PIL.Image.Image:
    """Open a local file or an http(s) URL as an RGB PIL image (EXIF orientation applied)."""
    s = str(path_or_url)
    scheme = s.split("://", 1)[0].lower() if "://" in s else None
    if scheme is not None and scheme not in ("http", "https"):
        raise ValueError(f"image {s}: unsupported URL scheme {scheme!r}; use a local file or an http(s) URL")
    if scheme is not None:
        import urllib.request

        with urllib.request.urlopen(s, timeout=timeout) as r:  # noqa: S310 - user-given URL
            image = PIL.Image.open(io.BytesIO(r.read()))
    else:
        p = Path(s).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"no image file at {p}")
        image = PIL.Image.open(p)
    image = PIL.ImageOps.exif_transpose(image)
    return image.convert("RGB")
