"""Every code block of README.md runs, on the tiny random checkpoint instead of SVD-XT.

Blocks are taken from the README as it is; the only edits are the substitutions in ``SUBS`` (the hub id becomes
a tiny checkpoint, full-size sizes become small ones) and, for ``svd-jax generate`` lines that do not set a size,
small size flags. Every substitution must be used, so a README change cannot silently turn a block into
something this test does not run. ``pip install`` lines are not run: the test environment is that install.
Python blocks run each in a fresh namespace in one subprocess with 4 simulated CPU devices (the sharding
example builds a real 2 x 2 mesh); bash blocks run in ``bash -e`` with the test interpreter's bin first on PATH.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from test_training_data import write_video

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
HUB_ID = "stabilityai/stable-video-diffusion-img2vid-xt"
# (pattern, replacement), regular expressions applied in order to every block
SUBS = [
    (re.escape(HUB_ID), "{tiny}"),
    (r"/tmp/tiny-svd", "{work}/made-tiny"),
    (r"\b576\b", "64"),
    (r"\b1024\b", "96"),
    (r"num_inference_steps=25\b", "num_inference_steps=2"),
    # fine-tuning: tiny clips (the workdir's clips/ folder) and two steps
    (r"\b320\b", "32"),
    (r"--num-frames 14\b", "--num-frames 3"),
    (r"num_frames=14\b", "num_frames=3"),
    (r"--max-steps 1000\b", "--max-steps 2"),
    (r"max_steps=1000\b", "max_steps=2"),
    (r"--save-every 500\b", "--save-every 1"),
    (r"warmup_steps=100\b", "warmup_steps=1"),
    # LoRA: an adapter for the tiny UNet, written by the workdir fixture
    (r"\bmy_lora/", "{work}/my_lora/"),
    (r"\bout_lora/", "{work}/out_lora/"),
    # Stability's single file: the tiny checkpoint's networks in its names, with the tiny configs beside them
    (r'from_single_file\("svd_xt\.safetensors", ', 'from_single_file("{work}/svd_xt.safetensors", configs="{tiny}", '),
    (r'from_single_file\("svd_xt\.safetensors"\)', 'from_single_file("{work}/svd_xt.safetensors", '
                                                  'config="{tiny}/unet/config.json")'),
    (r"--model svd_xt\.safetensors ", "--model {work}/svd_xt.safetensors --configs {tiny} "),
    (r"convert svd_xt\.safetensors ", "convert {work}/svd_xt.safetensors --configs {tiny} "),
]
SMALL_CLI = " --height 64 --width 96 --steps 2"


def blocks(text: str) -> list[tuple[str, int, str]]:
    """(language, first line number, code) of every fenced block."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if m:
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            out.append((m.group(1), i + 2, "\n".join(lines[i + 1:j]) + "\n"))
            i = j
        i += 1
    return out


def substitute(code: str, used: set, **paths) -> str:
    for k, (pat, rep) in enumerate(SUBS):
        new = re.sub(pat, rep.format(**paths), code)
        if new != code:
            used.add(k)
        code = new
    return code


def test_readme_has_the_expected_blocks():
    kinds = [lang for lang, _, _ in blocks(README.read_text())]
    assert kinds.count("python") >= 3 and kinds.count("bash") >= 5, kinds
    assert set(kinds) <= {"python", "bash"}, f"a code block without a runnable language: {kinds}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from svd_jax.tiny import make_tiny_checkpoint

    work = tmp_path_factory.mktemp("readme")
    tiny = make_tiny_checkpoint(work / "tiny")
    rng = np.random.default_rng(0)
    PIL.Image.fromarray((rng.random((300, 400, 3)) * 255).astype(np.uint8)).save(work / "photo.png")
    for v in range(2):  # the fine-tuning examples' clips/
        write_video(work / "clips" / f"clip{v}.mp4", (rng.random((6, 40, 72, 3)) * 255).astype(np.uint8))
    _write_tiny_lora(tiny, work / "my_lora", rng)
    from sgm_helpers import tiny_checkpoint_as_single_file

    tiny_checkpoint_as_single_file(tiny, work / "svd_xt.safetensors")
    return work, tiny


def _write_tiny_lora(tiny: Path, folder: Path, rng) -> None:
    """A rank-2 peft adapter on every to_q of the tiny UNet (the README's my_lora/)."""
    from flax import traverse_util

    from svd_jax.lora import LoRA, save_lora
    from svd_jax.models import UNetSpatioTemporalConditionModel
    from svd_jax.weights.torch_layout import path_to_torch_name

    _, params = UNetSpatioTemporalConditionModel.from_pretrained(tiny, subfolder="unet")
    weights = {}
    for path, v in traverse_util.flatten_dict(params).items():
        if path[-2:] == ("to_q", "kernel"):
            name = path_to_torch_name(path, 2)[0].removesuffix(".weight")
            weights[name] = (rng.normal(size=(2, v.shape[0])).astype(np.float32) * 0.05,
                             rng.normal(size=(v.shape[1], 2)).astype(np.float32) * 0.05)
    save_lora(LoRA(weights, dict.fromkeys(weights, 4.0)), folder)


def _env(tiny: Path, xla_flags: str) -> dict:
    env = dict(os.environ, SVD_JAX_MODEL=str(tiny), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu",
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""), XLA_FLAGS=xla_flags)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")  # `python -m convert` runs in a clone
    return env


RUN_PYTHON = """
import json, sys, time, traceback
blocks = json.load(open(sys.argv[1]))
for line, code in blocks:
    t0 = time.perf_counter()
    try:
        exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
    except Exception:
        traceback.print_exc()
        sys.exit(f"README.md python block at line {line} failed")
    print(f"ok {line}", flush=True)
    print(f"README.md:{line} {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
"""


def lines_before(line: int) -> str:
    """The README line just above a block's fence (blocks() numbers the first code line)."""
    return README.read_text().splitlines()[line - 3]


@pytest.mark.slow
def test_readme_code_blocks_run(workdir, fast_xla_flags):
    work, tiny = workdir
    used: set = set()
    paths = dict(tiny=tiny, work=work)
    py, sh = [], []
    for lang, line, code in blocks(README.read_text()):
        code = substitute(code, used, **paths)
        if lang == "python":
            py.append((line, code))
        else:
            cmds = []
            if lines_before(line).rstrip().endswith("<!-- test-command -->"):
                continue  # the test command: it is what runs this test
            for cmd in code.splitlines():
                if cmd.startswith("pip install"):
                    continue
                if cmd.startswith("svd-jax generate") and "--height" not in cmd:
                    cmd = cmd.split("#")[0].rstrip() + SMALL_CLI
                cmds.append(cmd)
            sh.append((line, "\n".join(cmds)))
    assert used == set(range(len(SUBS))), f"unused substitutions: {[SUBS[k] for k in set(range(len(SUBS))) - used]}"
    env = _env(tiny, fast_xla_flags(4))  # 4 devices; compiled fast (conftest.py)

    (work / "blocks.json").write_text(json.dumps(py))
    r = subprocess.run([sys.executable, "-c", RUN_PYTHON, str(work / "blocks.json")], cwd=work, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert r.stdout.split() == [w for line, _ in py for w in ("ok", str(line))]

    for line, script in sh:
        r = subprocess.run(["bash", "-e", "-c", script], cwd=work, env=env, capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, (f"README.md bash block at line {line} failed:\n{script}\n"
                                   f"{r.stdout[-3000:]}{r.stderr[-6000:]}")

    # what the blocks promise to write
    for name in ("video.mp4", "tiny.mp4", "styled.mp4", "with_my_new_lora.mp4", "my_new_lora/adapter_config.json",
                 "my_new_lora/adapter_model.safetensors", "made-tiny/unet/diffusion_pytorch_model.fp16.safetensors",
                 "svd-xt-flax/unet/flax_manifest.json", "svd-xt-diffusers/unet/diffusion_pytorch_model.safetensors",
                 "svd-xt-from-file-flax/image_encoder/flax_manifest.json"):
        assert (work / name).is_file() and (work / name).stat().st_size > 0, name
