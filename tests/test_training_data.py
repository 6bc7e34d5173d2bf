"""svd_jax.training.data: sources (folder, manifest), probing and skipping, clips (stride, start, resize + crop),
and ClipLoader (determinism, epochs, resume, the process split, the prefetch thread).

The videos are synthesised tiny (16 x 24 and the like) and near-lossless; each frame is flat, its red level
encoding the frame's index and its green level the video's, in steps big enough to survive the codecs, so a clip
says which frames of which video it holds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import types
import warnings

import imageio_ffmpeg
import numpy as np
import pytest

from svd_jax.training import data
from svd_jax.training.data import ClipLoader, DataError, DataWarning, VideoClipDataset, VideoInfo

# codec name -> write_frames arguments: lossless or close to it, so that flat levels come back within a few steps.
CODECS = {
    "h264": dict(codec="libx264", pix_fmt_out="yuv444p", quality=None, output_params=["-crf", "0"]),
    "vp9": dict(codec="libvpx-vp9", pix_fmt_out="yuv444p", quality=None, output_params=["-lossless", "1"]),
    "gif": dict(codec="gif", pix_fmt_out="rgb8", quality=None),
}
FRAME_STEP, VIDEO_STEP = 16, 32  # red = 8 + 16 * frame index, green = 8 + 32 * video id


def frame(i: int, video: int = 0, w: int = 24, h: int = 16) -> np.ndarray:
    f = np.empty((h, w, 3), np.uint8)
    f[..., 0] = 8 + FRAME_STEP * i
    f[..., 1] = 8 + VIDEO_STEP * video
    f[..., 2] = 128
    return f


def write_video(path, frames, fps: float = 10, codec: str = "h264") -> str:
    """Encode (N, h, w, 3) uint8 frames to ``path``; return it as a str."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    h, w = frames[0].shape[:2]
    gen = imageio_ffmpeg.write_frames(path, (w, h), fps=fps, macro_block_size=1, ffmpeg_log_level="error",
                                      **CODECS[codec])
    gen.send(None)
    for f in frames:
        gen.send(np.ascontiguousarray(f))
    gen.close()
    return path


def indexed_video(path, n: int, video: int = 0, fps: float = 10, codec: str = "h264", w: int = 24, h: int = 16):
    return write_video(path, [frame(i, video, w, h) for i in range(n)], fps, codec)


def levels(pixels: np.ndarray, channel: int, step: int) -> np.ndarray:
    """(..., F, H, W, 3) in [-1, 1] -> (..., F) the index each frame's flat level encodes."""
    v = (pixels[..., channel].mean(axis=(-1, -2)) + 1.0) * 127.5
    return np.rint((v - 8) / step).astype(int)


def frame_ids(pixels):
    return levels(pixels, 0, FRAME_STEP)


def video_ids(pixels):
    return levels(pixels, 1, VIDEO_STEP)


def quiet_dataset(*args, **kw) -> VideoClipDataset:
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds = VideoClipDataset(*args, **kw)
    assert not w, [str(x.message) for x in w]
    return ds


@pytest.fixture(scope="module")
def five(tmp_path_factory):
    """A folder of 5 videos (ids 0..4) of 6..10 frames: v0.mp4 .. v4.mp4."""
    root = tmp_path_factory.mktemp("five")
    for v in range(5):
        indexed_video(root / f"v{v}.mp4", 6 + v, video=v)
    return root


# ----------------------------------------------------------------------------------------------------------- sources


def test_folder_is_searched_recursively_in_sorted_order(tmp_path):
    indexed_video(tmp_path / "b.mp4", 5, fps=7.5)
    indexed_video(tmp_path / "a" / "z.webm", 6, codec="vp9")
    indexed_video(tmp_path / "a" / "y.gif", 7, codec="gif")
    indexed_video(tmp_path / "C.MP4", 8)  # the extension in capitals
    (tmp_path / "notes.txt").write_text("not a video")
    (tmp_path / ".partial.mp4").write_bytes(b"garbage")  # hidden: not listed, so not warned about
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.mp4").write_bytes(b"garbage")
    ds = quiet_dataset(tmp_path, 2, 16, 24)
    rel = [os.path.relpath(v.path, tmp_path) for v in ds.videos]
    assert rel == ["C.MP4", os.path.join("a", "y.gif"), os.path.join("a", "z.webm"), "b.mp4"]
    assert [v.num_frames for v in ds.videos] == [8, 7, 6, 5]
    assert [v.fps for v in ds.videos] == [10.0, 10.0, 10.0, 7.5]
    assert all(v.motion_bucket_id is None for v in ds.videos)
    assert len(ds) == 4 and ds.skipped == []
    # The order does not depend on the order the files were made in.
    assert ds.videos == quiet_dataset(tmp_path, 2, 16, 24).videos


def test_manifest_relative_and_absolute_paths_fps_and_motion_bucket(tmp_path):
    rel = indexed_video(tmp_path / "m" / "clips" / "a.mp4", 6, fps=10)
    absolute = indexed_video(tmp_path / "elsewhere" / "b.mp4", 6, fps=10)
    lines = [json.dumps({"path": "clips/a.mp4", "fps": 24, "motion_bucket_id": 50, "caption": "ignored"}),
             "",  # blank lines are skipped
             json.dumps({"path": absolute})]
    (tmp_path / "m" / "list.jsonl").write_text("\n".join(lines) + "\n")
    ds = quiet_dataset(tmp_path / "m" / "list.jsonl", 2, 16, 24, frame_stride=2, default_motion_bucket_id=99)
    assert ds.videos == [VideoInfo(rel, 6, 24.0, 50.0), VideoInfo(absolute, 6, 10.0, None)]
    a, b = (ds.clip(i, np.random.default_rng(0)) for i in range(2))
    assert a["fps"] == np.float32(12.0) and a["motion_bucket_id"] == np.float32(50.0)  # 24 fps / stride 2
    assert b["fps"] == np.float32(5.0) and b["motion_bucket_id"] == np.float32(99.0)  # the file's fps; the default
    for c in (a, b):
        assert c["fps"].dtype == np.float32 and c["fps"].shape == () and c["motion_bucket_id"].dtype == np.float32


@pytest.mark.parametrize("bad, line, what", [
    ('{"path": "a.mp4"}\n{"path": "b.mp4"\n', 2, "not valid JSON"),
    ('{"path": "a.mp4"}\n\n{"fps": 7}\n', 3, 'missing "path"'),
    ('["a.mp4"]\n', 1, "expected a JSON object"),
    ('{"path": "a.mp4", "fps": 0}\n', 1, "'fps' must be a positive number"),
    ('{"path": "a.mp4", "motion_bucket_id": "high"}\n', 1, "'motion_bucket_id' must be a finite number"),
])
def test_bad_manifest_line_names_its_number(tmp_path, monkeypatch, bad, line, what):
    monkeypatch.setattr(data, "_run_ffmpeg", lambda args: pytest.fail("probed a video of a bad manifest"))
    (tmp_path / "list.jsonl").write_text(bad)
    with pytest.raises(DataError, match=f"line {line}: {what}"):
        VideoClipDataset(tmp_path / "list.jsonl", 2, 16, 24)


# ------------------------------------------------------------------------------------------- checks and skipping


@pytest.mark.parametrize("kw, what", [
    (dict(height=20), "height must be a positive multiple of 8 .* e.g. 16; got 20"),
    (dict(width=0), "width must be a positive multiple of 8"),
    (dict(width=36, vae_factor=16), "width must be a positive multiple of 16"),
    (dict(num_frames=0), "num_frames must be an integer >= 1"),
    (dict(frame_stride=0), "frame_stride must be an integer >= 1"),
])
def test_bad_sizes_are_refused_before_any_video_is_read(tmp_path, monkeypatch, kw, what):
    indexed_video(tmp_path / "a.mp4", 4)
    monkeypatch.setattr(data, "_run_ffmpeg", lambda args: pytest.fail("probed a video before checking the sizes"))
    args = dict(num_frames=2, height=16, width=24) | kw
    with pytest.raises(DataError, match=what):
        VideoClipDataset(tmp_path, **args)


def test_unreadable_and_too_short_videos_are_skipped_with_one_warning_each(tmp_path):
    (tmp_path / "a_garbage.mp4").write_bytes(os.urandom(2000))
    short = indexed_video(tmp_path / "b_short.mp4", 4)  # a clip of 3 frames, stride 2 needs 5
    good = indexed_video(tmp_path / "c_good.mp4", 5)
    with pytest.warns(DataWarning) as record:
        ds = VideoClipDataset(tmp_path, 3, 16, 24, frame_stride=2)
    messages = [str(w.message) for w in record if issubclass(w.category, DataWarning)]
    assert len(messages) == 2, messages
    assert "a_garbage.mp4" in messages[0] and "unreadable" in messages[0]
    assert "b_short.mp4" in messages[1] and "too short: 4 frames" in messages[1] and "needs 5" in messages[1]
    assert [v.path for v in ds.videos] == [good] and len(ds) == 1
    assert [(os.path.basename(p), r.split(":")[0]) for p, r in ds.skipped] == [("a_garbage.mp4", "unreadable"),
                                                                              ("b_short.mp4", "too short")]
    assert ds.skipped[1][0] == short
    # warn=False: the same record, no warnings.
    quiet = quiet_dataset(tmp_path, 3, 16, 24, frame_stride=2, warn=False)
    assert quiet.skipped == ds.skipped and quiet.videos == ds.videos


def test_missing_manifest_entry_is_skipped(tmp_path):
    indexed_video(tmp_path / "a.mp4", 3)
    (tmp_path / "list.jsonl").write_text('{"path": "gone.mp4"}\n{"path": "a.mp4"}\n')
    with pytest.warns(DataWarning, match="gone.mp4: file not found"):
        ds = VideoClipDataset(tmp_path / "list.jsonl", 2, 16, 24)
    assert len(ds) == 1 and ds.skipped == [(str(tmp_path / "gone.mp4"), "file not found")]


def test_nothing_usable_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("no videos here")
    with pytest.raises(DataError, match=r"no video files found in .*empty \(looked for \.mp4, \.webm, .*\.gif"):
        VideoClipDataset(empty, 2, 16, 24)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.mp4").write_bytes(b"\0" * 100)
    indexed_video(bad / "y.mp4", 2)
    with pytest.warns(DataWarning), pytest.raises(
            DataError, match=r"no usable videos in .*bad: 2 skipped \(x\.mp4: unreadable.*; y\.mp4: too short"):
        VideoClipDataset(bad, 4, 16, 24)

    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no video files found in .*empty.jsonl: the manifest lists none"):
        VideoClipDataset(tmp_path / "empty.jsonl", 2, 16, 24)
    with pytest.raises(DataError, match="does not exist"):
        VideoClipDataset(tmp_path / "nowhere", 2, 16, 24)
    with pytest.raises(DataError, match="a folder of videos or a .jsonl manifest"):
        VideoClipDataset(bad / "x.mp4", 2, 16, 24)


# ------------------------------------------------------------------------------------------------------------ clips


@pytest.mark.parametrize("codec", ["h264", "vp9", "gif"])
def test_clip_frames_follow_the_stride_from_a_uniform_start(tmp_path, codec):
    ext = {"h264": "mp4", "vp9": "webm", "gif": "gif"}[codec]
    indexed_video(tmp_path / f"v.{ext}", 14, codec=codec)
    ds = quiet_dataset(tmp_path, 4, 16, 24, frame_stride=3)  # spans 10 frames: starts 0..4
    starts = []
    for seed in range(25):
        ids = frame_ids(ds.clip(0, np.random.default_rng(seed))["pixels"])
        assert list(ids) == [ids[0] + 3 * j for j in range(4)], ids
        starts.append(ids[0])
    assert set(starts) == set(range(5)), starts  # every valid start, and no other


def test_decoding_stops_after_the_last_needed_frame(tmp_path, monkeypatch):
    indexed_video(tmp_path / "v.mp4", 12)
    ds = quiet_dataset(tmp_path, 3, 16, 24, frame_stride=2)
    calls = []
    run = data._run_ffmpeg
    monkeypatch.setattr(data, "_run_ffmpeg", lambda args: calls.append(args) or run(args))
    ids = frame_ids(ds.clip(0, np.random.default_rng(1))["pixels"])
    (args,) = calls
    assert args[args.index("-frames:v") + 1] == "3"  # ffmpeg stops once it has output the clip's 3 frames
    start = ids[0]
    assert f"select=gte(n\\,{start})*not(mod(n-{start}\\,2))" in args  # and outputs only those
    # The reader itself: exactly the frames asked for, the last possible start included; past the end is an error.
    got = data.read_clip_frames(tmp_path / "v.mp4", 7, 3, 2)
    assert got.shape == (3, 16, 24, 3) and got.dtype == np.uint8
    assert list(np.rint((got[..., 0].mean(axis=(1, 2)) - 8) / FRAME_STEP)) == [7, 9, 11]
    with pytest.raises(DataError, match="decoded 2 frames from frame 8 with stride 2, expected 3"):
        data.read_clip_frames(tmp_path / "v.mp4", 8, 3, 2)


def band_video(path, w: int, h: int, band: int) -> str:
    """4 frames, mid grey but for a white band over the ``band`` leftmost columns."""
    frames = []
    for _ in range(4):
        f = np.full((h, w, 3), 100, np.uint8)
        f[:, :band] = 255
        frames.append(f)
    return write_video(path, frames)


def test_frames_are_resized_to_cover_then_centre_cropped(tmp_path):
    band_video(tmp_path / "wide" / "v.mp4", w=40, h=16, band=8)
    grey, white = 100 / 127.5 - 1, 1.0

    # 16 x 16 from 40 x 16: the height already covers, the centre 16 columns (12..27) are kept: no band.
    c = quiet_dataset(tmp_path / "wide", 2, 16, 16).clip(0, np.random.default_rng(0))["pixels"]
    assert c.shape == (2, 16, 16, 3) and c.dtype == np.float32
    np.testing.assert_allclose(c, grey, atol=0.03)

    # 8 x 24 from 40 x 16: scaled by 0.6 to 24 x 9.6 (the width covers), then 8 of the 9.6 rows kept: the band,
    # 8 * 0.6 = 4.8 columns wide, stays on the left. (A plain stretch to 24 x 8 would make it 4.8 wide too, but
    # the 16 x 16 case above tells the two apart.)
    c = quiet_dataset(tmp_path / "wide", 2, 8, 24).clip(0, np.random.default_rng(0))["pixels"]
    assert c.shape == (2, 8, 24, 3)
    np.testing.assert_allclose(c[:, :, :4], white, atol=0.03)
    np.testing.assert_allclose(c[:, :, 6:], grey, atol=0.03)

    # 24 x 8 (tall) from 40 x 16: scaled by 1.5 to 60 x 24, the centre 8 columns kept: grey only, upscaled.
    c = quiet_dataset(tmp_path / "wide", 2, 24, 8).clip(0, np.random.default_rng(0))["pixels"]
    assert c.shape == (2, 24, 8, 3)
    np.testing.assert_allclose(c, grey, atol=0.03)


def test_pixels_span_minus_one_to_one(tmp_path):
    write_video(tmp_path / "v.mp4", [np.zeros((16, 24, 3), np.uint8), np.full((16, 24, 3), 255, np.uint8)])
    ds = quiet_dataset(tmp_path, 2, 16, 24)
    c = ds.clip(0, np.random.default_rng(0))["pixels"]
    assert c.min() >= -1.0 and c.max() <= 1.0
    np.testing.assert_allclose(c[0], -1.0, atol=0.02)
    np.testing.assert_allclose(c[1], 1.0, atol=0.02)
    with pytest.raises(IndexError):
        ds.clip(1, np.random.default_rng(0))


# ----------------------------------------------------------------------------------------------------------- loader


def take(loader, n):
    return [next(loader) for _ in range(n)]


def assert_same_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys() == {"pixels", "fps", "motion_bucket_id"}
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_batches_follow_the_epoch_permutations_and_per_clip_rngs(five):
    ds = quiet_dataset(five, 3, 16, 24)
    with ClipLoader(ds, 3, seed=7, process_index=0, process_count=1) as loader:
        batches = take(loader, 4)  # 12 clips: epochs 0, 1 and the first 2 of epoch 2, batches crossing them
    stream = np.concatenate([np.random.default_rng([7, e]).permutation(5) for e in range(3)])
    for k, b in enumerate(batches):
        assert b["pixels"].shape == (3, 3, 16, 24, 3) and b["pixels"].dtype == np.float32
        assert b["fps"].shape == b["motion_bucket_id"].shape == (3,)
        assert b["fps"].dtype == b["motion_bucket_id"].dtype == np.float32
        np.testing.assert_array_equal(video_ids(b["pixels"]), np.broadcast_to(stream[3 * k:3 * k + 3, None], (3, 3)))
        np.testing.assert_array_equal(loader.batch_indices(k), stream[3 * k:3 * k + 3])
        for i in range(3):  # clip i of batch k: the dataset's clip with rng [seed, k, i]
            ref = ds.clip(int(stream[3 * k + i]), np.random.default_rng([7, k, i]))
            np.testing.assert_array_equal(b["pixels"][i], ref["pixels"])
    assert loader.position == 4


def test_same_seed_same_batches_other_seed_other_batches(five):
    ds = quiet_dataset(five, 3, 16, 24)
    kw = dict(process_index=0, process_count=1)
    with ClipLoader(ds, 2, seed=3, **kw) as a, ClipLoader(ds, 2, seed=3, prefetch=0, workers=1, **kw) as b, \
            ClipLoader(ds, 2, seed=4, **kw) as c:
        xs, ys, zs = take(a, 3), take(b, 3), take(c, 3)
    assert_same_batches(xs, ys)  # prefetching and decoding threads change nothing
    assert not all(np.array_equal(x["pixels"], z["pixels"]) for x, z in zip(xs, zs))


def test_resume_from_position_gives_the_uninterrupted_batches(five):
    ds = quiet_dataset(five, 3, 16, 24)
    kw = dict(seed=11, process_index=0, process_count=1)
    with ClipLoader(ds, 2, **kw) as full:
        batches = take(full, 5)
    with ClipLoader(ds, 2, position=3, **kw) as resumed:
        assert resumed.position == 3
        later = take(resumed, 2)
        assert resumed.position == 5
    assert_same_batches(later, batches[3:])


def test_each_process_builds_its_half_of_the_global_batch(five):
    ds = quiet_dataset(five, 2, 16, 24)
    with ClipLoader(ds, 4, seed=5, process_index=0, process_count=1) as whole, \
            ClipLoader(ds, 4, seed=5, process_index=0, process_count=2) as p0, \
            ClipLoader(ds, 4, seed=5, process_index=1, process_count=2) as p1:
        for _ in range(2):
            w, a, b = next(whole), next(p0), next(p1)
            assert a["pixels"].shape == (2, 2, 16, 24, 3)
            for k in w:
                np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), w[k])
    with pytest.raises(DataError, match="batch_size 3 .* multiple of the process count 2, e.g. 4"):
        ClipLoader(ds, 3, process_index=0, process_count=2)
    with pytest.raises(DataError, match="process_index < process_count"):
        ClipLoader(ds, 4, process_index=2, process_count=2)


def test_process_defaults_come_from_jax(five, monkeypatch):
    fake = types.SimpleNamespace(process_index=lambda: 1, process_count=lambda: 2)
    monkeypatch.setitem(sys.modules, "jax", fake)
    ds = quiet_dataset(five, 2, 16, 24)
    with ClipLoader(ds, 4, seed=5, prefetch=0) as loader:
        assert (loader.process_index, loader.process_count, loader.rows) == (1, 2, range(2, 4))


def test_an_error_in_the_prefetch_thread_is_raised_by_next(tmp_path):
    indexed_video(tmp_path / "v.mp4", 6)
    ds = quiet_dataset(tmp_path, 2, 16, 24)
    (tmp_path / "v.mp4").write_bytes(b"no longer a video")  # after probing: decoding it fails in the thread
    for prefetch in (2, 0):
        loader = ClipLoader(ds, 2, process_index=0, process_count=1, prefetch=prefetch)
        with pytest.raises(OSError, match="v.mp4: ffmpeg could not decode it"):
            next(loader)
        with pytest.raises(OSError, match="v.mp4"):  # and again: the loader does not skip a batch
            next(loader)
        assert loader.position == 0
        loader.close()


def test_last_wait_position_prefetch_bound_and_close(five, monkeypatch):
    ds = quiet_dataset(five, 2, 16, 24)
    built = []
    monkeypatch.setattr(ClipLoader, "build", lambda self, k: built.append(k) or {"k": k})
    loader = ClipLoader(ds, 2, process_index=0, process_count=1, prefetch=2)
    assert isinstance(loader.last_wait, float)
    deadline = time.monotonic() + 5
    while len(built) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    assert built == [0, 1, 2]  # 2 queued and 1 waiting for room: no further
    assert [next(loader)["k"] for _ in range(3)] == [0, 1, 2]
    assert isinstance(loader.last_wait, float) and loader.last_wait >= 0 and loader.position == 3
    thread = loader._thread
    with loader:
        pass  # leaving the block closes it
    assert not thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        next(loader)
    loader.close()  # again: nothing


def test_last_wait_measures_the_wait_for_data(five, monkeypatch):
    ds = quiet_dataset(five, 2, 16, 24)
    monkeypatch.setattr(ClipLoader, "build", lambda self, k: time.sleep(0.2) or {"k": k})
    with ClipLoader(ds, 2, process_index=0, process_count=1) as loader:
        next(loader)
        assert loader.last_wait >= 0.15  # the thread needed 0.2 s for the first batch
        time.sleep(0.5)  # the next ones get ready meanwhile
        next(loader)
        assert 0 <= loader.last_wait < 0.1


def test_loader_checks_its_arguments(five):
    ds = quiet_dataset(five, 2, 16, 24)
    for kw, what in ((dict(batch_size=0), "batch_size"), (dict(seed=-1), "seed"), (dict(position=-2), "position"),
                     (dict(prefetch=-1), "prefetch"), (dict(workers=0), "workers")):
        args = dict(batch_size=2, process_index=0, process_count=1) | kw
        with pytest.raises(DataError, match=f"{what} must be an integer >= "):
            ClipLoader(ds, **args)


def test_no_fork_warning_with_jax_initialised(five):
    # imageio-ffmpeg's read_frames forks (preexec_fn); with JAX's backends up that warns. Ours must not.
    script = textwrap.dedent(f"""
        import warnings, numpy as np, jax
        jax.numpy.ones(1).block_until_ready()
        from svd_jax.training.data import VideoClipDataset, ClipLoader
        warnings.simplefilter("error")
        ds = VideoClipDataset({str(five)!r}, 2, 16, 24)
        with ClipLoader(ds, 2, prefetch=1) as loader:
            print(next(loader)["pixels"].shape)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr
    assert "(2, 2, 16, 24, 3)" in r.stdout
    assert "fork" not in r.stderr and "Warning" not in r.stderr, r.stderr
