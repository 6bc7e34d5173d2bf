"""``svd-jax train`` end to end on the tiny pipeline and a few synthetic clips: the loss falls, a run resumed from
its checkpoint is bit-identical to an uninterrupted one, the export loads, bad input is refused early."""

import json

import jax
import numpy as np
import PIL.Image
import pytest
from safetensors.numpy import load_file
from test_training_data import write_video

from svd_jax.cli import main
from svd_jax.models import UNetSpatioTemporalConditionModel
from svd_jax.training import TrainConfig, TrainStep
from svd_jax.training.data import ClipLoader, VideoClipDataset
from svd_jax.training.step import flatten_params

F, H, W, STEPS = 3, 16, 24, 30


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    return stripe_videos(tmp_path_factory.mktemp("videos"))


def stripe_videos(root):
    """Four smoothly moving stripe videos (a learnable motion), an unreadable file and a too-short video."""
    y, x = np.mgrid[0:32, 0:48]
    for v in range(4):
        frames = [np.repeat((127 + 100 * np.sin((x + 2 * i * (v + 1)) / 6.0 + v + 0 * y))[..., None], 3, -1)
                  .astype(np.uint8) for i in range(12)]
        write_video(root / f"set{v % 2}" / f"v{v}.mp4", frames)
    (root / "broken.mp4").write_bytes(b"not a video at all")
    write_video(root / "short.mp4", [np.zeros((32, 48, 3), np.uint8)] * 2)
    return root


def _args(base, data, out, steps, *extra):
    return ["train", "--model", str(base), "--data", str(data), "--output", str(out), "--num-frames", str(F),
            "--height", str(H), "--width", str(W), "--max-steps", str(steps), "--learning-rate", "2e-3",
            "--batch-size", "2", "--seed", "3", "--trainable", "full", "--quiet", *extra]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _eval_loss(step, params, batches, encoders):
    """The objective averaged over fixed clips and fixed draws (a fair before/after comparison)."""
    flat = {k: v.astype(np.float32) for k, v in flatten_params(params).items()}
    loss = jax.jit(lambda p, b, key: step.loss(p, {}, step.conditioning(key, b, encoders)[0]))
    return float(np.mean([loss(flat, b, jax.random.PRNGKey(100 + i)) for i, b in enumerate(batches)]))


@pytest.mark.slow  # three runs of the CLI, an exported pipeline and a sample video: minutes on 2 cores
def test_train_resume_is_bit_identical_and_the_loss_falls(tiny_pipeline, videos, tmp_path, capsys):
    base = tiny_pipeline[1]
    image = tmp_path / "first.png"
    PIL.Image.new("RGB", (W, H), (120, 30, 200)).save(image)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(_args(base, videos, straight, STEPS, "--save-every", "10", "--sample-image", str(image),
                      "--sample-every", str(STEPS))) == 0
    err = capsys.readouterr().err
    assert "skipped" in err and "broken.mp4" in err and "short.mp4" in err  # counted, reported, not fatal
    assert main(_args(base, videos, split, STEPS // 2, "--save-every", "5")) == 0
    assert main(_args(base, videos, split, STEPS, "--save-every", "5", "--resume")) == 0

    m_straight, m_split = _metrics(straight), _metrics(split)
    assert [m["step"] for m in m_straight] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in m_split] == [m["loss"] for m in m_straight]  # the resumed run repeats every step
    a = load_file(straight / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(split / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (split / "checkpoints").iterdir()) == ["20", "25", "30"]  # keep 3
    assert (straight / "samples" / f"step_{STEPS:06d}.gif").stat().st_size > 0

    # the loss on fixed clips and draws, base weights vs trained
    unet, before = UNetSpatioTemporalConditionModel.from_pretrained(base, subfolder="unet")
    _, after = UNetSpatioTemporalConditionModel.from_pretrained(straight, subfolder="unet")
    from svd_jax import StableVideoDiffusionPipeline

    pipe = StableVideoDiffusionPipeline.from_pretrained(base, dtype="float32")
    step = TrainStep(unet, pipe.vae, pipe.image_encoder, TrainConfig(num_frames=F, height=H, width=W, batch_size=4))
    ds = VideoClipDataset(videos, F, H, W, warn=False)
    with ClipLoader(ds, 4, seed=99, prefetch=0) as loader:
        batches = [next(loader) for _ in range(4)]
    enc = {k: pipe.params[k] for k in ("vae", "image_encoder")}
    l0, l1 = _eval_loss(step, before, batches, enc), _eval_loss(step, after, batches, enc)
    print(f"eval loss before {l0:.4f} after {l1:.4f} ({l1 / l0:.2f}x)")
    assert l1 < 0.8 * l0, (l0, l1)


def test_train_refuses_bad_input_before_loading(tiny_pipeline, videos, tmp_path, capsys):
    base = tiny_pipeline[1]
    assert main(_args(base, videos, tmp_path / "o", 2)[:-1] + ["--height", "20"]) == 2
    assert "--height=20 is not a multiple of the VAE's factor 8" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(_args(base, empty, tmp_path / "o", 2)) == 1
    assert "no video files found" in capsys.readouterr().err
    assert main(_args(base, tmp_path / "nothing", tmp_path / "o", 2)) == 2
    assert "--data" in capsys.readouterr().err
    # every video too short for 13-frame clips: counted, then an error naming why
    assert main(_args(base, videos, tmp_path / "o", 2)[:-1] + ["--num-frames", "13"]) == 1
    assert "no usable videos" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written


@pytest.mark.slow  # > 1 min on 2 cores; CI runs it after the README command
def test_resume_with_other_settings_is_refused(tiny_pipeline, videos, tmp_path, capsys):
    base, out = tiny_pipeline[1], tmp_path / "run"
    assert main(_args(base, videos, out, 2, "--no-export")) == 0
    capsys.readouterr()
    assert main(_args(base, videos, out, 4, "--no-export")) == 1  # checkpoints there and no --resume
    assert "pass resume=True (--resume)" in capsys.readouterr().err
    args = _args(base, videos, out, 4, "--no-export", "--resume")
    args[args.index("--learning-rate") + 1] = "1e-4"
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "learning_rate" in err and "0.002" in err and "0.0001" in err
    assert [m["step"] for m in _metrics(out)] == [1, 2]  # the first run's log is intact


@pytest.mark.slow  # another compiled step (the pre-encoded batch form)
def test_cached_latents_train_the_unet_on_encoded_clips(tiny_pipeline, videos, tmp_path):
    """cache_latents=True: one clip per video encoded once (its latents equal the step's own VAE encode of the same
    clip), the steps get pre-encoded batches, the run trains and exports."""
    from svd_jax import StableVideoDiffusionPipeline
    from svd_jax.training import train
    from svd_jax.training.trainer import LatentCache

    base = tiny_pipeline[1]
    config = TrainConfig(num_frames=F, height=H, width=W, batch_size=2, max_steps=3, learning_rate=1e-3, seed=1)
    calls = []
    original = TrainStep.__call__

    def spy(self, state, batch, enc):
        calls.append(sorted(batch))
        return original(self, state, batch, enc)

    TrainStep.__call__ = spy
    try:
        result = train(base, videos, tmp_path / "run", config, cache_latents=True, progress=False, export=False)
    finally:
        TrainStep.__call__ = original
    assert result.step == 3 and np.isfinite(result.losses).all()
    assert calls == [["first_frame", "fps", "image_embeds", "latents", "motion_bucket_id"]] * 3
    pipe = StableVideoDiffusionPipeline.from_pretrained(base, dtype="float32")
    step = TrainStep(pipe.unet, pipe.vae, pipe.image_encoder, config)
    enc = {k: pipe.params[k] for k in ("vae", "image_encoder")}
    ds = VideoClipDataset(videos, F, H, W, warn=False)
    cache = LatentCache(step, ds, enc, seed=1, progress=False)
    clip = ds.clip(2, np.random.default_rng([1, 2**31, 2]))
    np.testing.assert_allclose(cache.clip(2)["latents"], step.encode_latents(clip["pixels"][None], enc)[0],
                               rtol=1e-6, atol=1e-6)
    assert np.array_equal(cache.clip(2)["first_frame"], clip["pixels"][0]) and len(cache) == len(ds) == 4
