"""The whole generation equals diffusers' StableVideoDiffusionPipeline on the same tiny weights (fp32, CPU)."""


import diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion as ref_mod
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import torch

from svd_jax import StableVideoDiffusionPipeline
from svd_jax.configs import CLIP_PROCESSOR_CONFIG
from svd_jax.weights import CheckpointError
from conftest import TINY_PIPE_CLIP, make_clip, rel_err

H, W, F = 32, 48, 3


@pytest.fixture(scope="module")
def pipes(tiny_pipeline):
    ref, folder = tiny_pipeline
    return ref, StableVideoDiffusionPipeline.from_pretrained(folder), folder


def _image(seed=0, size=(70, 50), mode="RGB"):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return PIL.Image.fromarray(arr).convert(mode)


def _reference(ref, image, seed, latents, **kw):
    """Run diffusers with the image noise our pipeline draws from ``seed`` and the given unit latents."""
    k_img, _ = jax.random.split(jax.random.PRNGKey(seed))
    n = 1 if isinstance(image, PIL.Image.Image) else len(image)
    noise = np.asarray(jax.random.normal(k_img, (n, H, W, 3), jnp.float32))
    orig = ref_mod.randn_tensor

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == (n, 3, H, W), shape  # only the image noise is drawn (latents are given)
        return torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())

    ref_mod.randn_tensor = fake_randn
    try:
        lat = torch.from_numpy(np.asarray(latents).transpose(0, 1, 4, 2, 3).copy())
        with torch.no_grad():
            return ref(image, height=H, width=W, num_frames=F, latents=lat, output_type="np", **kw).frames
    finally:
        ref_mod.randn_tensor = orig


@pytest.mark.parametrize("kw", [
    dict(num_inference_steps=3),  # defaults: CFG 1 -> 3, fps 7, motion 127, aug 0.02, one decode chunk
    dict(num_inference_steps=2, min_guidance_scale=1.5, max_guidance_scale=2.5, fps=12, motion_bucket_id=30,
         noise_aug_strength=0.3, decode_chunk_size=2),  # uneven chunks (2 + 1)
    dict(num_inference_steps=2, max_guidance_scale=1.0),  # CFG off
    dict(num_inference_steps=3, noise_aug_strength=0.0, decode_chunk_size=1),
    dict(sigmas=[300.0, 20.0, 1.5, 0.0]),
])
def test_single_video_equals_diffusers(pipes, kw):
    ref, pipe, _ = pipes
    image = _image()
    latents = np.asarray(jax.random.normal(jax.random.PRNGKey(7), (1, F, H // 8, W // 8, 4)))
    out = pipe(image, height=H, width=W, num_frames=F, seed=5, latents=latents, output_type="np", **kw).frames
    expected = _reference(ref, image, 5, latents, **kw)
    assert out.shape == expected.shape == (1, F, H, W, 3)
    print(f"max abs diff vs diffusers {np.abs(out - expected).max():.2e} for {kw}")
    assert rel_err(out, expected) <= 1e-4


def test_latent_output_and_no_recompile(pipes):
    _, pipe, _ = pipes
    image = _image(1)
    a = pipe(image, height=H, width=W, num_frames=F, num_inference_steps=2, seed=0, output_type="latent").frames
    assert isinstance(a, jax.Array) and a.shape == (1, F, H // 8, W // 8, 4)
    count = pipe.trace_count
    b = pipe(_image(2), height=H, width=W, num_frames=F, num_inference_steps=2, seed=1, fps=9,
             motion_bucket_id=3, min_guidance_scale=1.2, output_type="latent").frames
    assert pipe.trace_count == count  # same shapes and static options: the compiled program is reused
    assert float(jnp.abs(a - b).max()) > 1e-3


def test_batch_semantics(pipes):
    """2 images x 2 videos each: videos of one image share its conditioning, and each video equals the
    single-image run with the same latents (so decode chunks never mix videos)."""
    _, pipe, _ = pipes
    imgs = [_image(3), _image(4)]
    lat = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (4, F, H // 8, W // 8, 4)))
    kw = dict(height=H, width=W, num_frames=F, num_inference_steps=2, noise_aug_strength=0.0, output_type="np",
              decode_chunk_size=2)
    both = pipe(imgs, num_videos_per_prompt=2, latents=lat, **kw).frames
    assert both.shape == (4, F, H, W, 3)
    for v, img in enumerate([0, 0, 1, 1]):
        single = pipe(imgs[img], latents=lat[v:v + 1], **kw).frames
        assert rel_err(both[v], single[0]) <= 1e-4  # fp32 rounding of other batch shapes only
        other = pipe(imgs[1 - img], latents=lat[v:v + 1], **kw).frames
        assert rel_err(both[v], other[0]) > 1e-2  # the conditioning image really differs


def test_output_types(pipes):
    _, pipe, _ = pipes
    kw = dict(height=H, width=W, num_frames=F, num_inference_steps=1, seed=0)
    pil = pipe(_image(5, mode="RGBA"), **kw).frames
    arr = pipe(_image(5, mode="RGBA"), output_type="np", **kw).frames
    assert len(pil) == 1 and len(pil[0]) == F and pil[0][0].size == (W, H) and pil[0][0].mode == "RGB"
    np.testing.assert_array_equal(np.asarray(pil[0][1]), (arr[0, 1] * 255).round().astype(np.uint8))
    grey = pipe(_image(6, mode="L"), output_type="np", **kw).frames
    assert grey.shape == (1, F, H, W, 3)
    as_array = pipe(np.asarray(_image(5)).astype(np.float32)[None] / 255, output_type="np", **kw).frames
    from_pil = pipe(_image(5), output_type="np", **kw).frames
    assert as_array.shape == from_pil.shape


@pytest.mark.parametrize("kw,msg", [
    (dict(height=30), "height must be a multiple of 8"),
    (dict(width=50), "width must be a multiple of 8"),
    (dict(num_frames=0), "num_frames must be a positive integer"),
    (dict(decode_chunk_size=0), "decode_chunk_size must be a positive integer"),
    (dict(num_inference_steps=-1), "num_inference_steps must be a positive integer"),
    (dict(output_type="pt"), "output_type must be one of"),
    (dict(latents=np.zeros((1, 2, 4, 6, 4))), r"latents must have shape \(1, 3, 4, 6, 4\)"),
])
def test_bad_input(pipes, kw, msg):
    _, pipe, _ = pipes
    args = dict(height=H, width=W, num_frames=F, num_inference_steps=1)
    args.update(kw)
    count = pipe.trace_count
    with pytest.raises(ValueError, match=msg):
        pipe(_image(), **args)
    assert pipe.trace_count == count  # rejected before any compile


def test_motion_bucket_warning(pipes):
    _, pipe, _ = pipes
    with pytest.warns(UserWarning, match="outside the trained range"):
        pipe(_image(), height=H, width=W, num_frames=F, num_inference_steps=1, motion_bucket_id=300,
             output_type="latent")


def test_missing_component(pipes, tmp_path):
    import shutil

    _, _, folder = pipes
    shutil.copytree(folder, tmp_path / "p")
    shutil.rmtree(tmp_path / "p" / "vae")
    with pytest.raises(CheckpointError, match=r"missing component folder\(s\) \['vae'\]"):
        StableVideoDiffusionPipeline.from_pretrained(tmp_path / "p")


def test_seed_determinism(pipes):
    _, pipe, _ = pipes
    kw = dict(height=H, width=W, num_frames=F, num_inference_steps=2, output_type="np")
    a = pipe(_image(), seed=3, **kw).frames
    b = pipe(_image(), seed=3, **kw).frames
    c = pipe(_image(), seed=4, **kw).frames
    d = pipe(_image(), rng=jax.random.PRNGKey(3), **kw).frames
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, d)
    assert np.abs(a - c).max() > 1e-2


def test_progress_bar(pipes, capsys):
    """progress=True runs the same generation step by step from the host (no callback inside a program, which
    would keep it out of the persistent cache): a bar, and bit for bit the same result."""
    _, pipe, _ = pipes
    for output_type in ("np",):  # decoded in the last program ("latent" skips that decode)
        kw = dict(height=H, width=W, num_frames=F, num_inference_steps=3, output_type=output_type, seed=0)
        with_bar = pipe(_image(), progress=True, **kw).frames
        err = capsys.readouterr().err
        assert "3/3" in err and err.count("denoising") >= 1
        plain = pipe(_image(), **kw).frames
        assert "denoising" not in capsys.readouterr().err
        np.testing.assert_array_equal(np.asarray(with_bar), np.asarray(plain))


def test_cli_generate_and_make_tiny(tmp_path):
    """svd-jax make-tiny + generate offline: an mp4 that reads back with the right frame count and size,
    and the tiny checkpoint is a real diffusers checkpoint."""
    import imageio_ffmpeg
    from diffusers import StableVideoDiffusionPipeline as RefPipeline

    from svd_jax.cli import main

    tiny = tmp_path / "tiny"
    assert main(["make-tiny", str(tiny)]) == 0
    RefPipeline.from_pretrained(tiny)  # diffusers loads it: names and layouts are the hub ones
    img = tmp_path / "in.png"
    _image(size=(90, 60)).save(img)
    out = tmp_path / "out.mp4"
    assert main(["generate", "--model", str(tiny), "--image", str(img), "--output", str(out), "--height", "64",
                 "--width", "96", "--num-frames", "5", "--steps", "2", "--quiet"]) == 0
    reader = imageio_ffmpeg.read_frames(str(out))
    meta = next(reader)
    frames = list(reader)
    assert meta["size"] == (96, 64) and len(frames) == 5
    gif = tmp_path / "out.gif"  # the same program (read back from the compile cache), another container
    assert main(["generate", "--model", str(tiny), "--image", str(img), "--output", str(gif), "--height", "64",
                 "--width", "96", "--num-frames", "5", "--steps", "2", "--quiet"]) == 0
    with PIL.Image.open(gif) as g:
        assert g.n_frames == 5 and g.size == (96, 64)


def test_from_pretrained_hub_snapshot_offline(pipes, tmp_path):
    """A repo id resolves through huggingface_hub's cache layout (snapshot folder), offline."""
    import shutil

    _, pipe, folder = pipes
    sha = "fedcba9876543210fedcba9876543210fedcba98"
    repo = tmp_path / "models--svd-test--tiny-pipe"
    shutil.copytree(folder, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    hub = StableVideoDiffusionPipeline.from_pretrained("svd-test/tiny-pipe", cache_dir=tmp_path, local_files_only=True)
    for name in ("unet", "vae", "image_encoder"):
        for a, b in zip(jax.tree_util.tree_leaves(hub.params[name]), jax.tree_util.tree_leaves(pipe.params[name])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_lower_is_the_program_a_call_runs(pipes):
    """pipe.lower(...) on abstract inputs gives the program a call with the same configuration runs: compiled, it
    returns exactly the call's output on the call's inputs; it reports memory and FLOPs."""
    _, pipe, _ = pipes
    kw = dict(height=H, width=W, num_frames=F, num_inference_steps=2, decode_chunk_size=2)
    compiled = pipe.lower(image_size=(50, 70), **kw).compile()
    seen, real = {}, pipe._jitted

    def spy(params, inputs, config):
        seen["inputs"], seen["out"] = inputs, real(params, inputs, config=config)
        return seen["out"]

    pipe._jitted = spy
    try:
        pipe(_image(3), output_type="np", seed=5, **kw)
    finally:
        pipe._jitted = real
    np.testing.assert_array_equal(np.asarray(compiled(pipe.params, seen["inputs"])), np.asarray(seen["out"]))
    assert compiled.memory_analysis().temp_size_in_bytes > 0
    assert compiled.cost_analysis()["flops"] > 1e6
    with pytest.raises(ValueError, match="num_frames must be a positive integer"):
        pipe.lower(height=H, width=W, num_frames=0)


def test_dtype_auto_and_bad_dtype(pipes, monkeypatch):
    """dtype="auto" (the default): float32 on CPU, bfloat16 on TPU/GPU; names work; anything else is refused."""
    from svd_jax.pipeline import resolve_dtype

    _, pipe, folder = pipes
    assert pipe.dtype == jnp.float32 and jax.default_backend() == "cpu"  # the default, here
    assert resolve_dtype("bfloat16") == jnp.bfloat16 and resolve_dtype(jnp.float16) == jnp.float16
    for platform in ("tpu", "gpu"):
        monkeypatch.setattr(jax, "default_backend", lambda: platform)
        assert resolve_dtype("auto") == jnp.bfloat16
    monkeypatch.undo()
    for bad in ("float64", jnp.int32, "half-precision"):
        with pytest.raises(ValueError, match="dtype must be one of"):
            StableVideoDiffusionPipeline.from_pretrained(folder, dtype=bad)


def test_streamed_decode_gives_the_same_video(pipes, monkeypatch):
    """Past pipe.stream_decode_bytes a decode chunk is decoded streamed (frame chunks, row tiles): the same
    frames; the threshold is part of the compiled configuration; a bad one is refused before tracing."""
    import svd_jax.pipeline.stages as S

    _, pipe, folder = pipes
    kw = dict(height=H, width=W, num_frames=F, num_inference_steps=2, seed=3, output_type="np")
    ref = pipe(_image(4), **kw).frames
    calls, real = [], S.decode_streamed
    monkeypatch.setattr(S, "decode_streamed", lambda *a, **k: calls.append(1) or real(*a, **k))  # a spy
    streamed = StableVideoDiffusionPipeline.from_pretrained(folder)
    streamed.stream_decode_bytes = 0  # every chunk streamed
    got = streamed(_image(4), **kw).frames
    assert calls  # the streamed decoder was traced into the program
    assert np.abs(got - ref).max() <= 1e-5, np.abs(got - ref).max()
    streamed.stream_decode_bytes = None  # never: retraced, the plain decode
    del calls[:]
    np.testing.assert_array_equal(streamed(_image(4), **kw).frames, ref)
    assert not calls and streamed.trace_count == 2
    streamed.stream_decode_bytes = -1
    with pytest.raises(ValueError, match="stream_decode_bytes must be"):
        streamed(_image(4), **kw)
    assert streamed.trace_count == 2


def test_forward_chunk_bytes_slices_feed_forwards_same_video(pipes, monkeypatch):
    """pipe.forward_chunk_bytes is part of the compiled configuration: a small budget slices every feed-forward
    (traced anew, the same frames); a bad value is rejected before tracing."""
    import svd_jax.models.xla_ops as X
    from svd_jax.options import DEFAULT_OPTIONS

    _, pipe, _ = pipes
    kw = dict(height=H, width=W, num_frames=F, num_inference_steps=2, seed=3, output_type="np")
    ref = pipe(_image(5), **kw).frames
    sliced, real = [], X.map_chunks
    monkeypatch.setattr(X, "map_chunks", lambda fn, x, *a: sliced.append(x.shape) or real(fn, x, *a))  # a spy
    count = pipe.trace_count
    try:
        pipe.forward_chunk_bytes = 4096
        got = pipe(_image(5), **kw).frames
        assert pipe.trace_count == count + 1 and sliced  # retraced, with sliced feed-forwards
        # float32 rounding of the differently blocked matmuls (2e-6 on the UNet's output, test_unet), grown by
        # CFG and the decoder to ~1.4e-5 here; the parity tolerance against diffusers. Misplaced rows: O(1).
        assert rel_err(got, ref) <= 1e-4, rel_err(got, ref)
        for bad in (0, -5, 1.5, "1GB"):
            with pytest.raises(ValueError, match="forward chunk budget must be a positive number of bytes"):
                pipe.forward_chunk_bytes = bad
            assert pipe.forward_chunk_bytes == 4096  # refused: the setting stands
        assert pipe.trace_count == count + 1
    finally:
        pipe.forward_chunk_bytes = DEFAULT_OPTIONS.forward_chunk_bytes


def test_compile_ahead_serves_calls(pipes):
    """pipe.compile(...) builds one configuration's program (memory analysis available) and keeps it: a call
    with that configuration runs it without tracing, with the frames a jitted call gives; another
    configuration still traces."""
    _, pipe, folder = pipes
    fresh = StableVideoDiffusionPipeline.from_pretrained(folder)
    kw = dict(height=H, width=W, num_frames=F, num_inference_steps=2)
    compiled = fresh.compile(image_size=(50, 70), **kw)
    assert compiled.memory_analysis().temp_size_in_bytes > 0
    assert fresh.trace_count == 1
    got = fresh(_image(6), seed=4, fps=9, output_type="np", **kw).frames  # any values, same configuration
    assert fresh.trace_count == 1  # served by the compiled program
    np.testing.assert_array_equal(got, pipe(_image(6), seed=4, fps=9, output_type="np", **kw).frames)
    fresh(_image(6), seed=4, output_type="np", decode_chunk_size=1, **kw)
    assert fresh.trace_count == 2  # another configuration: traced


def test_call_lower_and_compile_share_one_argument_list(pipes):
    """pipe(...), pipe.lower(...) and pipe.compile(...) take the fields of GenerationRequest (shown in their
    signatures); an unknown keyword is refused by name before anything is traced."""
    import dataclasses
    import inspect

    from svd_jax.pipeline import GenerationRequest

    _, pipe, _ = pipes
    fields = [f.name for f in dataclasses.fields(GenerationRequest)]
    for method in (pipe.__call__, pipe.lower, pipe.compile):
        assert set(fields) <= set(inspect.signature(method).parameters), method
    assert inspect.signature(pipe.lower).parameters["output_type"].default == "np"
    count = pipe.trace_count
    with pytest.raises(TypeError, match=r"unexpected argument\(s\) \['steps'\].*num_inference_steps"):
        pipe(_image(), steps=3)
    with pytest.raises(TypeError, match=r"\['bogus'\]"):
        pipe.lower(bogus=1)
    assert pipe.trace_count == count


@pytest.mark.parametrize("kw,msg", [
    (dict(noise_aug_strength=float("nan")), "noise_aug_strength must be a finite number"),
    (dict(max_guidance_scale=float("inf")), "max_guidance_scale must be a finite number"),
    (dict(fps=0), r"fps must be > 0"),
    (dict(noise_aug_strength=-0.5), "noise_aug_strength must be >= 0"),
    (dict(sigmas=[300.0, float("nan"), 0.0]), "sigmas must be finite"),
])
def test_non_finite_arguments_refused_before_tracing(pipes, kw, msg):
    _, pipe, _ = pipes
    count = pipe.trace_count
    with pytest.raises(ValueError, match=msg):
        pipe(_image(), height=H, width=W, num_frames=F, num_inference_steps=1, **kw)
    bad = np.full((1, 20, 30, 3), 0.5, np.float32)
    bad[0, 3, 4, 1] = np.nan
    with pytest.raises(ValueError, match="finite values"):
        pipe(bad, height=H, width=W, num_frames=F, num_inference_steps=1)
    assert pipe.trace_count == count


def test_min_guidance_above_max_warns(pipes):
    _, pipe, _ = pipes
    with pytest.warns(UserWarning, match="CFG is off"):
        pipe.lower(height=H, width=W, num_frames=F, num_inference_steps=1, min_guidance_scale=2.0,
                   max_guidance_scale=1.0)


def test_non_finite_weights_raise_instead_of_a_black_video(pipes):
    """A NaN in the weights (safetensors has no checksum) makes the frames NaN: the call raises, saying why."""
    _, pipe, _ = pipes
    params = jax.tree_util.tree_map(lambda a: a, pipe.params)
    params["unet"]["conv_out"]["bias"] = params["unet"]["conv_out"]["bias"].at[0].set(jnp.nan)
    broken = StableVideoDiffusionPipeline(pipe.unet, pipe.vae, pipe.image_encoder, pipe.scheduler, params)
    for output_type in ("np", "latent"):
        with pytest.raises(RuntimeError, match="non-finite values.*weights may be corrupt"):
            broken(_image(), height=H, width=W, num_frames=F, num_inference_steps=1, output_type=output_type)


CLIP_SIZE_30 = 30  # an image encoder smaller than SVD's 224 (patches of 6: 5 x 5 + 1 positions)


@pytest.fixture(scope="module")
def small_clip_pipes(tiny_pipeline, tmp_path_factory):
    """The tiny pipeline with a CLIP of image_size 30 and a feature extractor of that size: (diffusers pipeline,
    ours, folder)."""
    from diffusers import EulerDiscreteScheduler
    from diffusers import StableVideoDiffusionPipeline as TorchPipeline
    from transformers import CLIPImageProcessor

    base, _ = tiny_pipeline
    clip = make_clip({**TINY_PIPE_CLIP, "image_size": CLIP_SIZE_30, "patch_size": 6}, seed=5)
    square = {"height": CLIP_SIZE_30, "width": CLIP_SIZE_30}
    fe = CLIPImageProcessor(**{**CLIP_PROCESSOR_CONFIG, "crop_size": square,
                               "size": {"shortest_edge": CLIP_SIZE_30}})
    ref = TorchPipeline(vae=base.vae, image_encoder=clip, unet=base.unet, feature_extractor=fe,
                        scheduler=EulerDiscreteScheduler.from_config(base.scheduler.config))
    ref.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("tiny_svd_clip30")
    ref.save_pretrained(folder)
    return ref, StableVideoDiffusionPipeline.from_pretrained(folder), folder


def test_clip_input_size_is_the_image_encoders(small_clip_pipes, monkeypatch):
    """CLIP images are resized to the image encoder's image_size. diffusers resizes to 224 whatever the encoder
    (hard-coded in `_encode_image`), which an encoder of another size refuses; with that 224 replaced by the
    encoder's size, diffusers' frames are ours, and the embedding is transformers' CLIP on the image resized so."""
    from svd_jax.pipeline import stages

    ref, pipe, _ = small_clip_pipes
    assert pipe.image_encoder.image_size == CLIP_SIZE_30
    image = _image()
    latents = np.asarray(jax.random.normal(jax.random.PRNGKey(7), (1, F, H // 8, W // 8, 4)))
    kw = dict(num_inference_steps=2)
    with pytest.raises(ValueError, match="doesn't match model"):  # transformers' CLIP refuses 224 x 224
        _reference(ref, image, 5, latents, **kw)

    resize, asked = ref_mod._resize_with_antialiasing, []

    def resize_to_encoder(x, size, *args, **kwargs):
        asked.append(tuple(size))
        return resize(x, (CLIP_SIZE_30, CLIP_SIZE_30), *args, **kwargs)

    monkeypatch.setattr(ref_mod, "_resize_with_antialiasing", resize_to_encoder)
    expected = _reference(ref, image, 5, latents, **kw)
    assert asked == [(224, 224)]
    out = pipe(image, height=H, width=W, num_frames=F, seed=5, latents=latents, output_type="np", **kw).frames
    assert out.shape == expected.shape == (1, F, H, W, 3)
    print(f"CLIP {CLIP_SIZE_30}: max abs diff vs diffusers {np.abs(out - expected).max():.2e}")
    assert rel_err(out, expected) <= 1e-4

    x = torch.from_numpy(np.asarray(image, np.float32).transpose(2, 0, 1)[None] / 255)
    x = (resize(x * 2 - 1, (CLIP_SIZE_30, CLIP_SIZE_30)) + 1) / 2
    pixels = ref.feature_extractor(images=x, do_normalize=True, do_center_crop=False, do_resize=False,
                                   do_rescale=False, return_tensors="pt").pixel_values
    with torch.no_grad():
        want = ref.image_encoder(pixels).image_embeds.numpy()
    clip_images = np.asarray(image, np.float32)[None] / 255
    got = stages.image_embeddings(pipe.image_encoder, pipe.params["image_encoder"], clip_images, pipe.image_mean,
                                  pipe.image_std, jnp.float32)
    assert rel_err(got, want) <= 1e-5


def test_feature_extractor_size_other_than_the_encoders_warns(small_clip_pipes, tmp_path):
    import json
    import shutil

    *_, folder = small_clip_pipes
    shutil.copytree(folder, tmp_path / "p")
    fe = tmp_path / "p" / "feature_extractor" / "preprocessor_config.json"
    cfg = json.loads(fe.read_text())
    assert cfg["crop_size"] == {"height": CLIP_SIZE_30, "width": CLIP_SIZE_30}
    fe.write_text(json.dumps({**cfg, "crop_size": {"height": 224, "width": 224}}))
    with pytest.warns(UserWarning, match=r"size 224x224 is not the image encoder's image_size 30; CLIP images are "
                                         r"resized to 30x30"):
        pipe = StableVideoDiffusionPipeline.from_pretrained(tmp_path / "p")
    assert pipe.image_encoder.image_size == CLIP_SIZE_30
