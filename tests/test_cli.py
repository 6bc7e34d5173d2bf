"""The command line: --help is instant (no jax), every bad argument is refused before anything loads, in one
line naming the flag (exit 2), runtime failures in one line (exit 1), --debug shows the traceback."""

import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from svd_jax import cli


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "in.png"
    PIL.Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(path)
    return str(path)


@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to load weights fails the test: arguments must be refused before."""
    from svd_jax.pipeline import StableVideoDiffusionPipeline

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the arguments were checked")

    monkeypatch.setattr(StableVideoDiffusionPipeline, "from_pretrained", refuse)


def test_help_is_instant_and_lists_defaults():
    """--help imports neither jax nor numpy, and shows every option's default."""
    code = ("import sys\nfrom svd_jax.cli import main\n"
            "for cmd in ('generate', 'make-tiny', 'convert'):\n"
            "    try:\n        main([cmd, '--help'])\n    except SystemExit as e:\n        assert e.code == 0\n"
            "print('HEAVY', sorted(m for m in ('jax', 'numpy', 'flax', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         env=dict(os.environ, SVD_JAX_MODEL="")).stdout
    assert "HEAVY []" in out, out[-500:]
    assert "(default: 25)" in out and "(default: 576)" in out and "(default: video.mp4)" in out


def test_dtype_choices_are_the_weights_dtypes():
    from svd_jax.weights import FLAX_DTYPES

    assert tuple(FLAX_DTYPES) == cli.DTYPES


@pytest.mark.parametrize("extra,msg", [
    (["--steps", "0"], "--steps must be >= 1; got 0"),
    (["--height", "30"], "--height must be a multiple of 8; got 30"),
    (["--width", "0"], "--width must be >= 8; got 0"),
    (["--num-frames", "0"], "--num-frames must be >= 1"),
    (["--decode-chunk-size", "0"], "--decode-chunk-size must be >= 1"),
    (["--fps", "0"], "--fps must be >= 1; got 0"),
    (["--fps", "-3"], "--fps must be >= 1"),
    (["--noise-aug-strength", "nan"], "--noise-aug-strength must be a finite number"),
    (["--noise-aug-strength", "-0.1"], "--noise-aug-strength must be >= 0"),
    (["--max-guidance", "inf"], "--max-guidance must be a finite number"),
    (["--model", "/no/such/folder"], "--model /no/such/folder: no such folder"),
    (["--model", "./missing-model"], "no such folder"),
    (["--model", "/no/such/svd_xt.safetensors"], "--model /no/such/svd_xt.safetensors: no such file"),
    (["--configs", "/no/such/configs"], "--configs /no/such/configs: no such folder"),
    (["--lora", "/no/such/lora"], "--lora /no/such/lora: LoRA path /no/such/lora does not exist"),
    (["--lora", "my_lora:nan"], "--lora my_lora:nan: the scale must be a finite number"),
])
def test_bad_arguments_exit_2_in_one_line_before_loading(image, tmp_path, no_loading, capsys, extra, msg):
    argv = ["generate", "--image", image, "--output", str(tmp_path / "out.mp4"), *extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("svd-jax generate: error: ") and msg in err[0], err


def test_lora_flag_parsing():
    assert cli.parse_lora("loras/style:0.5") == ("loras/style", 0.5)
    assert cli.parse_lora("owner/repo") == ("owner/repo", 1.0)
    assert cli.parse_lora("a:b/c") == ("a:b/c", 1.0)  # a colon that does not end in a number is the path's
    assert cli.parse_lora("x.safetensors:-1") == ("x.safetensors", -1.0)


@pytest.mark.parametrize("bad_image,msg", [
    ("ftp://example.com/photo.png", "unsupported URL scheme 'ftp'"),
    ("no-such-photo.png", "--image no-such-photo.png: no such file"),
])
def test_bad_image_exit_2(tmp_path, no_loading, capsys, bad_image, msg):
    assert cli.main(["generate", "--image", bad_image, "--output", str(tmp_path / "o.mp4")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err


@pytest.mark.parametrize("output", ["missing-dir/out.mp4", "out.txt", "out", "."])
def test_bad_output_exit_2(image, tmp_path, no_loading, capsys, output):
    assert cli.main(["generate", "--image", image, "--output", str(tmp_path / output)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--output" in err[0], err


def test_runtime_failure_exit_1_and_debug_traceback(image, tmp_path, capsys):
    """A folder that is not a pipeline: one error line, exit 1; --debug raises the exception itself."""
    from svd_jax import CheckpointError

    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["generate", "--image", image, "--output", str(tmp_path / "o.mp4"), "--model", str(empty)]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no model_index.json" in err[0] and "--debug" in err[0], err
    with pytest.raises(CheckpointError, match="no model_index.json"):
        cli.main([*argv, "--debug"])


def test_offline_hub_model_says_what_to_do(image, tmp_path, capsys):
    """A repo id that is neither cached nor reachable (the tests run offline): one line saying so and how to
    point at a local folder."""
    argv = ["generate", "--image", image, "--output", str(tmp_path / "o.mp4"), "--model", "nobody/no-such-model"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not in the local hub cache" in err[0] and "--model /path" in err[0], err


def test_warnings_for_arguments_that_work_differently_than_meant(image, tmp_path, capsys):
    args = cli.build_parser().parse_args(["generate", "--image", image, "--output", str(tmp_path / "o.mp4"),
                                          "--min-guidance", "3", "--max-guidance", "1", "--motion-bucket-id", "300"])
    cli.check_generate_args(args)
    err = capsys.readouterr().err
    assert "CFG is off" in err and "--min-guidance 3.0 > --max-guidance 1.0" in err and "0..255" in err
    args.max_guidance = 2.0
    cli.check_generate_args(args)
    assert "decreases from the first frame to the last" in capsys.readouterr().err


def test_second_cli_run_is_warm_with_the_progress_bar(tmp_path, image):
    """The default CLI (progress bar on) writes every program to the persistent cache: a second process compiles
    nothing (jax reports each persistent-cache miss with JAX_EXPLAIN_CACHE_MISSES=1)."""
    from svd_jax.tiny import make_tiny_checkpoint

    tiny = make_tiny_checkpoint(tmp_path / "tiny")
    env = dict(os.environ, SVD_JAX_CACHE_DIR=str(tmp_path / "xla"), JAX_EXPLAIN_CACHE_MISSES="1",
               JAX_PLATFORMS="cpu")
    env.pop("SVD_JAX_COMPILE_CACHE", None)
    argv = [sys.executable, "-m", "svd_jax.cli", "generate", "--model", str(tiny), "--image", image, "--output",
            str(tmp_path / "out.mp4"), "--height", "64", "--width", "96", "--num-frames", "3", "--steps", "2"]
    runs = [subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=False) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
        assert "denoising" in r.stderr and "2/2" in r.stderr  # the bar was shown
    assert "PERSISTENT COMPILATION CACHE MISS" in runs[0].stderr  # the check sees misses where there are some
    assert "PERSISTENT COMPILATION CACHE MISS" not in runs[1].stderr, runs[1].stderr[-3000:]
