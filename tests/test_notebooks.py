"""The notebooks in notebooks/ run top to bottom on the tiny random checkpoint (CPU, 4 simulated devices), and
are stored with their outputs cleared.

Each notebook runs in its own ipykernel started from THIS interpreter (a kernelspec written to a temp folder,
so neither a ``python`` on PATH nor a user-installed ``python3`` kernelspec can pick another environment), with
SVD_JAX_MODEL pointing at a tiny checkpoint made once per session and the session's compile cache.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ("01_quickstart", "02_sharded_generation", "03_memory_and_speed", "04_finetune")
KERNEL = "svd-jax-test-python"
DEVICES = 4
CELL_TIMEOUT_S = 600


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from svd_jax.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("notebook-tiny-svd"))


@pytest.fixture(scope="session")
def xla_flags(fast_xla_flags) -> str:
    """4 simulated CPU devices (the sharding notebook), compiled fast (conftest.py)."""
    return fast_xla_flags(DEVICES)


@pytest.fixture(scope="session")
def kernel_dir(tmp_path_factory) -> Path:
    """A folder holding one kernelspec that starts ipykernel with sys.executable."""
    root = tmp_path_factory.mktemp("kernels")
    spec = root / KERNEL
    spec.mkdir()
    spec.joinpath("kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "svd-jax tests", "language": "python"}))
    return root


def _kernel_env(model: Path, tmp: Path, xla_flags: str) -> dict:
    env = dict(os.environ)
    env.update(SVD_JAX_MODEL=str(model), XLA_FLAGS=xla_flags, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu",
               PYDEVD_DISABLE_FILE_VALIDATION="1", TMPDIR=str(tmp))  # the notebooks' temp files: pytest's tmp
    env.pop("SVD_JAX_COMPILE_CACHE", None)  # the notebooks show the cache at work
    # SVD_JAX_CACHE_DIR: the test session's (conftest.py), inherited, so the notebooks share compiled programs
    return env


def _run(path: Path, kernel_dir: Path, model: Path, cwd: Path, xla_flags: str):
    nb = nbformat.read(path, as_version=4)
    km = AsyncKernelManager(kernel_name=KERNEL,
                            kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)]))
    client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, allow_errors=False,
                            resources={"metadata": {"path": str(cwd)}})
    # raises CellExecutionError on the first failing cell; cleanup_kc: shut the kernel down (nbclient keeps a
    # kernel it did not create alive otherwise)
    client.execute(cleanup_kc=True, env=_kernel_env(model, cwd, xla_flags))
    return nb


def _outputs(nb, key: str) -> str:
    """All outputs of one kind, joined: "stream" (printed text), or a mime type ("text/html", "image/png")."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if key == "stream" and out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif key in out.get("data", {}):
                parts.append(str(out["data"][key]))
    return "\n".join(parts)


def _check_01(nb):
    html = _outputs(nb, "text/html")
    assert "<video" in html and "data:video/mp4;base64," in html, "no inline video"
    assert html.count("data:image/gif;base64,") == 9, "the micro-conditioning table should hold 3 x 3 GIFs"
    assert _outputs(nb, "image/png"), "the input image is not shown"
    text = _outputs(nb, "stream")
    for knob in ("motion_bucket_id", "fps", "noise_aug_strength"):
        assert f"{knob}=" in text


def _check_02(nb):
    text = _outputs(nb, "stream")
    assert f"{DEVICES} devices" in text
    assert f"mesh over {DEVICES} devices: {{'data': 2, 'space': 2}}" in text
    assert "4 videos (2 images x 2)" in text
    assert f"latents of one video on {DEVICES} devices" in text
    assert _outputs(nb, "image/png"), "no thumbnails of the batch"


def _check_03(nb):
    text = _outputs(nb, "stream")
    for header in ("decode chunk", "attention", "dtype"):
        assert re.search(rf"^\s*{header} \| peak MiB", text, re.MULTILINE), f"no {header} table"
    for row in ("xla", "blockwise", "float32", "bfloat16"):
        assert re.search(rf"^\s*{row} \|\s+\d+\.\d", text, re.MULTILINE), f"no measured {row} row"
    assert "not run" not in text and "does not compile" not in text
    assert re.search(r"blockwise vs xla: max diff \d", text)
    assert re.search(r"bfloat16 vs float32 frames: PSNR \d+\.\d dB", text)
    assert re.search(r"fresh pipeline, first call \| disk cache", text), "a fresh pipeline did not read the cache"
    assert re.search(r"repeat call \| in memory", text)
    # calls after pipe.compile run the kept program: the first one neither traces nor reads the cache
    assert len(re.findall(r"\|\s+\d+\.\d+ \(in memory\s*\) \|", text)) >= 4, "a call after pipe.compile compiled"


def _check_04(nb):
    import base64
    import io

    import PIL.Image

    text = _outputs(nb, "stream")
    clips = re.findall(r"^ball_(\d)\.mp4: 12 frames, fps 7, motion_bucket_id (\d+)$", text, re.MULTILINE)
    assert clips == [("0", "60"), ("1", "100"), ("2", "150"), ("3", "200")], "the manifest's clips and labels"
    assert "4 usable videos, 0 skipped" in text
    assert "os.fork()" not in text, "something forked the kernel (imageio_ffmpeg.write_frames does)"
    assert "checkpoints/: ['8', '16', '24']" in text, "the first run did not checkpoint every 8 steps"
    assert "resumed: ran steps 25..32" in text, "the resumed run did not continue from step 24"
    assert "checkpoints/: ['16', '24', '32']" in text, "not the newest 3 checkpoints kept"
    exported = re.search(r"^exported: \S+ \[(.*)\]$", text, re.MULTILINE)
    assert exported, "no export"
    for entry in ("'model_index.json'", "'unet'", "'vae'", "'image_encoder'", "'metrics.jsonl'", "'checkpoints'"):
        assert entry in exported.group(1), f"{entry} missing from the run folder"
    steps = [int(s) for s in re.findall(r"^\s*(\d+) \|\s+\d+\.\d{4} \|", text, re.MULTILINE)]
    assert steps == [*range(1, 32, 4), 32], "metrics.jsonl does not hold steps 1..32 once each"
    windows = [float(v) for v in re.findall(r"steps \d+-\d+: (\d+\.\d+)", text)]
    assert len(windows) == 4 and windows[0] > max(windows[1:]), f"the loss did not fall from its first steps: {windows}"
    change = re.search(r"mean abs difference after vs before: (\d+\.\d+)", text)
    assert change and float(change.group(1)) > 0.01, "the fine-tuned pipeline made the same video"
    html = _outputs(nb, "text/html")
    assert html.count("data:image/gif;base64,") == 7, "4 training clips, then before / after / a clip"
    assert "<br>before</td>" in html and "<br>after 32 steps</td>" in html
    pngs = [PIL.Image.open(io.BytesIO(base64.b64decode(out["data"]["image/png"]))).size
            for cell in nb.cells for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]
    assert (640, 300) in pngs and len(pngs) == 2, f"the input image and the loss plot: {pngs}"


CHECKS = {"01_quickstart": _check_01, "02_sharded_generation": _check_02, "03_memory_and_speed": _check_03,
          "04_finetune": _check_04}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, tiny_model, kernel_dir, xla_flags, tmp_path):
    t = time.perf_counter()
    nb = _run(NOTEBOOKS / f"{name}.ipynb", kernel_dir, tiny_model, tmp_path, xla_flags)
    print(f"{name}: {time.perf_counter() - t:.1f} s")
    CHECKS[name](nb)


def test_notebooks_stored_without_outputs():
    found = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
    assert found == sorted(NAMES), f"notebooks/ holds {found}; the tests know {sorted(NAMES)}"
    for name in NAMES:
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        nbformat.validate(nb)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{name} cell {i} has outputs"
                installs = re.search(r"^\s*[%!]\s*pip\b", cell.source, re.MULTILINE)
                assert not installs, f"{name} cell {i} installs packages"
