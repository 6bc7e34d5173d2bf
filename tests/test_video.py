"""svd_jax.video: checks before encoding, failures that raise, atomic writes, no JAX fork warning, frame checks."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import warnings
from fractions import Fraction
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import PIL.Image
import pytest

from svd_jax import video
from svd_jax.video import VideoWriteError, check_fps, check_output_path, export_to_gif, export_to_video, save_video

F, H, W = 5, 64, 96
SUPPORTED = ".mp4, .mov, .mkv (H.264 video) and .gif"


def make_frames(f: int = F, h: int = H, w: int = W) -> np.ndarray:
    """Smooth float frames in [0, 1], each a different brightness (so order and count show after decoding)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / w, y / h, (x + y) / (w + h)], -1) * 0.6
    return np.stack([base + 0.08 * t for t in range(f)]).clip(0, 1).astype(np.float32)


def read_video(path) -> np.ndarray:
    """Decode a video with the bundled ffmpeg into uint8 (F, H, W, 3)."""
    exe = imageio_ffmpeg.get_ffmpeg_exe()
    info = subprocess.run([exe, "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr
    w, h = map(int, re.search(r"Video:.*?, (\d+)x(\d+)", info).groups())
    raw = subprocess.run([exe, "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"],
                         capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, h, w, 3)


def assert_video_matches(path, frames: np.ndarray) -> None:
    got = read_video(path)
    assert got.shape == (len(frames), *frames.shape[1:3], 3)
    want = (frames * 255).round()
    err = np.abs(got.astype(np.float32) - want).mean(axis=(1, 2, 3))
    assert err.max() < 4, err  # H.264 at crf 10 in yuv420p: a few levels off, never a wrong frame


def no_encoder(*args, **kwargs):
    raise AssertionError("an encoder was started although the inputs were bad")


# ------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("name", ["video.mp4", "video.mov", "video.mkv", "VIDEO.MP4"])
def test_video_round_trip_returns_path(tmp_path, name):
    frames = make_frames()
    out = export_to_video(frames, tmp_path / name, fps=7)
    assert isinstance(out, Path) and out == tmp_path / name
    assert_video_matches(out, frames)
    assert os.listdir(tmp_path) == [name]


def test_accepted_frame_inputs(tmp_path):
    frames = make_frames()
    u8 = (frames * 255).round().astype(np.uint8)
    pil = [PIL.Image.fromarray(f) for f in u8]
    gen = (f for f in u8)
    import jax.numpy as jnp

    for i, inp in enumerate([frames, u8, pil, tuple(pil), list(u8), gen, jnp.asarray(frames)]):
        assert_video_matches(export_to_video(inp, tmp_path / f"v{i}.mp4", fps=7), frames)
    over = frames.copy()
    over[0, 0, 0] = [1.2, -0.3, 0.5]  # floats outside [0, 1] are clipped, as before
    assert_video_matches(export_to_video(over, tmp_path / "clipped.mp4"), frames.clip(0, 1))


# ------------------------------------------------------------------------------------------------ the fork warning


def test_no_fork_warning_after_jax_initialised(tmp_path):
    """A JAX process writing an mp4 prints nothing alarming: no RuntimeWarning recorded, nothing on stderr."""
    script = textwrap.dedent("""
        import sys, warnings
        import numpy as np
        import jax
        jax.numpy.ones(1).block_until_ready()  # backends up: JAX's at-fork warning is registered now
        from svd_jax.video import export_to_video
        frames = np.load(sys.argv[1])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            export_to_video(frames, sys.argv[2], fps=7)
            export_to_video(frames, sys.argv[2], fps=7)  # again, over the first
        print(sorted({w.category.__name__ for w in caught}))
    """)
    frames = make_frames()
    np.save(tmp_path / "frames.npy", frames)
    out = tmp_path / "video.mp4"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "frames.npy"), str(out)], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "fork" not in r.stderr and "RuntimeWarning" not in r.stderr, r.stderr
    assert r.stdout.strip() == "[]", r.stdout
    assert_video_matches(out, frames)


def test_no_runtime_warning_in_process(tmp_path):
    import jax

    jax.numpy.ones(1).block_until_ready()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_to_video(make_frames(), tmp_path / "v.mp4", fps=7)
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]


# ------------------------------------------------------------------------------------------------ output paths


BAD_PATHS = {  # name -> (path under tmp_path, words the message must hold)
    "missing folder": ("nowhere/video.mp4", ["does not exist", "nowhere"]),
    "a folder": ("adir", ["is a folder", "video.mp4"]),
    "txt": ("video.txt", ["'.txt'", SUPPORTED]),
    "no extension": ("video", ["no extension", SUPPORTED]),
    "png": ("out.png", ["'.png'", SUPPORTED]),
    "webm": ("out.webm", ["'.webm'", SUPPORTED]),
}


@pytest.mark.parametrize("case", BAD_PATHS)
def test_bad_output_path_raises_before_encoding(tmp_path, monkeypatch, case):
    rel, words = BAD_PATHS[case]
    (tmp_path / "adir").mkdir()
    before = sorted(os.listdir(tmp_path))
    monkeypatch.setattr(subprocess, "Popen", no_encoder)
    gif_rel = rel.replace(".mp4", ".gif")  # export_to_gif refuses a .mp4 name whatever its folder
    for call, r in ((check_output_path, rel), (lambda p: export_to_video(make_frames(), p, fps=7), rel),
                    (lambda p: export_to_gif(make_frames(), p, fps=7), gif_rel),
                    (lambda p: save_video(make_frames(), p), rel)):
        with pytest.raises(ValueError) as e:
            call(tmp_path / r)
        for word in words:
            assert word in str(e.value), (word, str(e.value))
    assert sorted(os.listdir(tmp_path)) == before
    assert os.listdir(tmp_path / "adir") == []


def test_check_output_path_accepts_and_returns_path(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "Popen", no_encoder)  # cheap: no encoder
    for name in ["v.mp4", "v.MOV", "v.mkv", "v.gif"]:
        assert check_output_path(str(tmp_path / name)) == tmp_path / name
    (tmp_path / "old.mp4").write_bytes(b"old")
    assert check_output_path(tmp_path / "old.mp4") == tmp_path / "old.mp4"  # overwriting is allowed
    monkeypatch.setenv("HOME", str(tmp_path))
    assert check_output_path("~/v.mp4") == tmp_path / "v.mp4"
    assert sorted(os.listdir(tmp_path)) == ["old.mp4"]  # the write probe left nothing behind


def test_writer_for_the_other_extension_says_which(tmp_path):
    with pytest.raises(ValueError, match="use export_to_gif"):
        export_to_video(make_frames(), tmp_path / "v.gif")
    with pytest.raises(ValueError, match="use export_to_video"):
        export_to_gif(make_frames(), tmp_path / "v.mp4")
    assert os.listdir(tmp_path) == []


def test_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    immutable = False
    try:
        probe = ro / "probe"
        try:  # root writes through mode bits: make the folder immutable instead, where the file system can
            probe.touch()
            probe.unlink()
            immutable = subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode == 0
        except OSError:
            pass
        else:
            if not immutable:
                pytest.skip("no way to make a read-only folder here (root, and chattr +i refused)")
        for call in (check_output_path, lambda p: export_to_video(make_frames(), p)):
            with pytest.raises(ValueError, match="cannot create files in the folder"):
                call(ro / "video.mp4")
        assert os.listdir(ro) == []
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(ro)], check=True)
        ro.chmod(0o755)


def test_existing_non_regular_file_refused(tmp_path):
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        check_output_path(fifo)


# ------------------------------------------------------------------------------------------------ writer failures


def test_ffmpeg_failure_raises_with_its_log(tmp_path):
    """Something ffmpeg itself refuses (a frame duration the mp4 muxer cannot store) raises with ffmpeg's words,
    and leaves the old file and nothing else."""
    out = tmp_path / "video.mp4"
    out.write_bytes(b"old video")
    with pytest.raises(VideoWriteError) as e:
        export_to_video(make_frames(), out, fps=1e-6)
    msg = str(e.value)
    assert str(out) in msg and "exit status" in msg and "Invalid argument" in msg, msg
    assert out.read_bytes() == b"old video"
    assert os.listdir(tmp_path) == ["video.mp4"]


def test_encoder_failure_message_is_the_stderr_tail(tmp_path, monkeypatch):
    fake = tmp_path / "fake-ffmpeg"
    fake.write_text("#!/bin/sh\ncat > /dev/null\necho 'line one' >&2\necho 'out.mp4: No space left on device' >&2\n"
                    "exit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(video, "_ffmpeg_exe", lambda: str(fake))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(VideoWriteError, match=r"(?s)exit status 3.*line one\nout.mp4: No space left on device"):
        export_to_video(make_frames(), out_dir / "v.mp4")
    assert os.listdir(out_dir) == []


def test_encoder_that_writes_nothing_raises(tmp_path, monkeypatch):
    fake = tmp_path / "fake-ffmpeg"
    fake.write_text("#!/bin/sh\ncat > /dev/null\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setattr(video, "_ffmpeg_exe", lambda: str(fake))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(VideoWriteError, match="wrote nothing"):
        export_to_video(make_frames(), out_dir / "v.mp4")
    assert os.listdir(out_dir) == []


# ------------------------------------------------------------------------------------------------ atomic writes


@pytest.mark.parametrize("name", ["video.mp4", "video.gif"])
@pytest.mark.parametrize("error", [KeyboardInterrupt, ValueError])
def test_interrupted_write_keeps_old_file(tmp_path, name, error):
    out = tmp_path / name
    old = b"the old video, byte for byte"
    out.write_bytes(old)
    frames = make_frames(8)

    def frames_then_interrupt():
        for i, f in enumerate(frames):
            if i == 5:
                raise error("interrupted midway")
            yield f

    with pytest.raises(error, match="interrupted midway"):
        save_video(frames_then_interrupt(), out, fps=7)
    assert out.read_bytes() == old
    assert os.listdir(tmp_path) == [name]


def test_interrupted_first_write_leaves_nothing(tmp_path):
    def gen():
        yield make_frames(1)[0]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_to_video(gen(), tmp_path / "video.mp4")
    assert os.listdir(tmp_path) == []


def test_bad_frame_midway_in_a_generator_keeps_old_file(tmp_path):
    out = tmp_path / "video.mp4"
    out.write_bytes(b"old")
    frames = make_frames()
    frames[3, 1, 2, 0] = np.nan
    with pytest.raises(ValueError, match="frame 3 hold 1 NaN or infinite"):
        export_to_video(iter(frames), out)
    assert out.read_bytes() == b"old" and os.listdir(tmp_path) == ["video.mp4"]


def test_overwrite_replaces_whole_keeps_mode_and_links(tmp_path):
    frames = make_frames()
    out = tmp_path / "video.mp4"
    out.write_bytes(b"x" * 10_000_000)  # longer than the new video: an in-place write would leave a tail
    out.chmod(0o640)
    assert export_to_video(frames, out, fps=7) == out
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert b"x" * 1000 not in out.read_bytes()
    assert_video_matches(out, frames)
    link = tmp_path / "link.mp4"
    link.symlink_to(out)
    export_to_video(frames[:3], link, fps=7)
    assert link.is_symlink() and len(read_video(out)) == 3
    assert sorted(os.listdir(tmp_path)) == ["link.mp4", "video.mp4"]
    umask = os.umask(0)
    os.umask(umask)
    new = export_to_gif(frames, tmp_path / "new.gif")
    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~umask  # a new file gets the usual mode, not mkstemp's 0600


# ------------------------------------------------------------------------------------------------ fps


@pytest.mark.parametrize("fps", [0, -1, -7.5, float("nan"), float("inf"), True, "7", None, [7]])
def test_bad_fps_raises_value_error(tmp_path, monkeypatch, fps):
    monkeypatch.setattr(subprocess, "Popen", no_encoder)
    for call in (lambda: check_fps(fps), lambda: export_to_video(make_frames(), tmp_path / "v.mp4", fps=fps),
                 lambda: export_to_gif(make_frames(), tmp_path / "v.gif", fps=fps)):
        with pytest.raises(ValueError, match="fps must be a"):
            call()
    assert os.listdir(tmp_path) == []


def test_good_fps():
    import jax.numpy as jnp

    for fps in [7, 7.0, 0.5, 29.97, Fraction(30000, 1001), np.float32(6), np.int64(25), jnp.float32(8)]:
        assert check_fps(fps) == float(fps) and isinstance(check_fps(fps), float)
    assert check_fps(50, "a.gif") == 50.0
    for fps in [60, 51, 0.001]:
        with pytest.raises(ValueError, match="does not fit a GIF"):
            check_fps(fps, "a.GIF")
    assert check_fps(60, "a.mp4") == 60.0


def test_fps_reaches_the_file(tmp_path):
    out = export_to_video(make_frames(), tmp_path / "v.mp4", fps=Fraction(30000, 1001))
    info = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(out)], capture_output=True,
                          text=True).stderr
    assert "29.97 fps" in info, info
    gif = export_to_gif(make_frames(), tmp_path / "v.gif", fps=25)
    with PIL.Image.open(gif) as im:
        assert im.n_frames == F and im.size == (W, H) and im.info["duration"] == 40 and im.info["loop"] == 0


# ------------------------------------------------------------------------------------------------ frames


def _bad_frames():
    fr = make_frames()
    nan = fr.copy()
    nan[2, 3, 4, 1] = np.nan
    inf = fr.copy()
    inf[0, 0, 0, 0] = np.inf
    pil = [PIL.Image.fromarray((f * 255).astype(np.uint8)) for f in fr]
    return {
        "nan": (nan, "1 NaN or infinite"),
        "inf": (inf, "1 NaN or infinite"),
        "nan in a list": (list(nan), "frame 2 hold 1 NaN"),
        "two channels": (fr[..., :2], r"\(F, H, W, 3\); got shape \(5, 64, 96, 2\)"),
        "one image": (fr[0], r"got shape \(64, 96, 3\)"),
        "a batch": (fr[None], r"pass one video: frames\[0\]"),
        "a list of batches": ([fr], r"pass one\s+video, frames\[0\]"),
        "int64": ((fr * 255).astype(np.int64), "dtype int64; pass uint8"),
        "empty list": ([], "at least one frame"),
        "empty array": (fr[:0], "at least one frame"),
        "empty generator": (iter([]), "at least one frame"),
        "mixed sizes": ([pil[0], pil[1].resize((W + 2, H))], "frame 1 is 98x64 but frame 0 is 96x64"),
        "odd size": (make_frames(h=63), "even frame sizes; got 96x63"),
        "one PIL image": (pil[0], "must be a list of PIL images"),
        "a string": ("frames.mp4", "must be a list of PIL images"),
    }


@pytest.mark.parametrize("case", list(_bad_frames()))
def test_bad_frames_raise_before_encoding(tmp_path, monkeypatch, case):
    frames, match = _bad_frames()[case]
    monkeypatch.setattr(subprocess, "Popen", no_encoder)
    with pytest.raises(ValueError, match=match):
        export_to_video(frames, tmp_path / "v.mp4")
    assert os.listdir(tmp_path) == []


def test_bad_frames_in_gif(tmp_path):
    fr = make_frames()
    fr[1, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        export_to_gif(fr, tmp_path / "v.gif")
    assert os.listdir(tmp_path) == []


def test_gif_round_trip(tmp_path):
    frames = make_frames(h=63)  # any size for a GIF
    out = export_to_gif([PIL.Image.fromarray(f) for f in (frames * 255).round().astype(np.uint8)], tmp_path / "a.gif",
                        fps=7)
    assert isinstance(out, Path)
    with PIL.Image.open(out) as im:
        assert (im.n_frames, im.size, im.info["duration"]) == (F, (W, 63), 140)
    assert save_video(frames, tmp_path / "b.GIF", fps=7) == tmp_path / "b.GIF"
    assert save_video(make_frames(), tmp_path / "c.mkv", fps=7) == tmp_path / "c.mkv"
    assert len(read_video(tmp_path / "c.mkv")) == F


def test_ctrl_c_during_encode_keeps_old_file(tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it (ffmpeg gets it too), mid-encode."""
    script = textwrap.dedent("""
        import signal, sys, time
        import numpy as np
        from svd_jax.video import export_to_video
        # as in a terminal: a test runner started in the background (a non-interactive shell's `cmd &`) passes
        # SIGINT down ignored, and Python then leaves it ignored
        signal.signal(signal.SIGINT, signal.default_int_handler)
        frame = np.full((64, 96, 3), 0.5, np.float32)
        def slow():
            for i in range(200):
                if i == 3:
                    print("encoding", flush=True)
                time.sleep(0.05)
                yield frame
        export_to_video(slow(), sys.argv[1], fps=7)
        print("finished", flush=True)
    """)
    out = tmp_path / "video.mp4"
    out.write_bytes(b"old video")
    proc = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "encoding"
        assert len(os.listdir(tmp_path)) == 2  # the old file and the hidden partial one
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "KeyboardInterrupt" in stderr and "finished" not in stdout, stderr
    assert out.read_bytes() == b"old video"
    assert os.listdir(tmp_path) == ["video.mp4"]


def test_load_image_refuses_other_url_schemes():
    from svd_jax.video import load_image

    with pytest.raises(ValueError, match="unsupported URL scheme 'ftp'"):
        load_image("ftp://example.com/photo.png")
