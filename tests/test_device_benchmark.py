"""benchmarks/device/run.py --tiny: the accelerator benchmark's code path on CPU with the tiny configs, so that it
runs on the first machine that has an accelerator (every row completes, the table is printed)."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device" / "run.py"


@pytest.mark.slow  # four tiny pipelines compiled, two diffusers pipelines: ~2 min on 2 cores
def test_device_benchmark_tiny_mode_runs(fast_xla_flags):
    import os

    env = dict(os.environ, XLA_FLAGS=fast_xla_flags(None), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--backends", "auto,blockwise,cudnn"],
                          capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    rows = [ln for ln in out.splitlines() if ln.startswith(("svd-jax ", "diffusers "))]
    assert len(rows) == 6, out  # auto euler + dpm, diffusers euler + dpm, blockwise, cudnn
    done = [ln for ln in rows if "failed" not in ln and "skipped" not in ln]
    # every row but cudnn attention (GPU only) measured; svd-jax rows carry the ratio to diffusers
    assert len(done) == 5 and all("cudnn" in ln for ln in rows if ln not in done), out
    assert sum(ln.rstrip().endswith("x") for ln in done if ln.startswith("svd-jax")) == 3, out
    assert "derived UNet step" in out and "total" in out
