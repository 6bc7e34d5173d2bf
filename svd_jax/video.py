"""Video and image I/O: export_to_video (H.264 mp4 through imageio-ffmpeg), export_to_gif, load_image."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps

Frames = Sequence[PIL.Image.Image] | np.ndarray


def _to_uint8(frames: Frames) -> np.ndarray:
    """PIL images, or an array (F, H, W, 3) float in [0, 1] or uint8 -> uint8 (F, H, W, 3)."""
    if isinstance(frames, (list, tuple)) and frames and isinstance(frames[0], PIL.Image.Image):
        return np.stack([np.asarray(f.convert("RGB")) for f in frames])
    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"frames must be a list of PIL images or an array (F, H, W, 3); got shape {arr.shape}. "
                         "For a batch from the pipeline pass one video: frames[0]")
    if arr.dtype == np.uint8:
        return arr
    return (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)


def export_to_video(frames: Frames, path: str | os.PathLike, fps: float = 7) -> str:
    """Write one video as H.264 mp4 (yuv420p, plays everywhere) through imageio-ffmpeg's bundled ffmpeg.

    Args:
      frames: a list of F PIL images, or an array (F, H, W, 3) float in [0, 1] or uint8.
      path: output file (.mp4).
      fps: frames per second.

    Returns:
      the path written, as a string.
    """
    import imageio_ffmpeg

    arr = _to_uint8(frames)
    f, h, w, _ = arr.shape
    if h % 2 or w % 2:  # yuv420p needs even sizes
        raise ValueError(f"H.264 needs even frame sizes; got {w}x{h}")
    path = str(path)
    writer = imageio_ffmpeg.write_frames(path, (w, h), fps=fps, codec="libx264", pix_fmt_in="rgb24",
                                         pix_fmt_out="yuv420p", macro_block_size=2, quality=8,
                                         ffmpeg_log_level="error")
    writer.send(None)
    for frame in arr:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    return path


def export_to_gif(frames: Frames, path: str | os.PathLike, fps: float = 7) -> str:
    """Write one video as a looping GIF. frames: F PIL images or (F, H, W, 3) in [0, 1] / uint8."""
    imgs = [PIL.Image.fromarray(f) for f in _to_uint8(frames)]
    imgs[0].save(str(path), save_all=True, append_images=imgs[1:], duration=int(round(1000 / fps)), loop=0)
    return str(path)


def load_image(path_or_url: str | os.PathLike, timeout: float = 30.0) -> PIL.Image.Image:
    """Open a local file or an http(s) URL as an RGB PIL image (EXIF orientation applied)."""
    s = str(path_or_url)
    if s.startswith(("http://", "https://")):
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
