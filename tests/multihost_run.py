"""One process of a 2-process x 4-CPU-device run (jax.distributed over localhost, gloo collectives).

    python tests/multihost_run.py PIPELINE_FOLDER PORT PROCESS_ID OUT_DIR
Every process passes the same inputs; each writes the frames it got back to OUT_DIR/frames_<id>.npy.
"""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main():
    folder, port, pid, out_dir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import numpy as np
    import PIL.Image

    from svd_jax import StableVideoDiffusionPipeline
    from svd_jax.sharding import make_mesh

    assert jax.process_count() == 2 and len(jax.devices()) == 8 and len(jax.local_devices()) == 4
    img = PIL.Image.fromarray(np.random.default_rng(3).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    pipe = StableVideoDiffusionPipeline.from_pretrained(folder, mesh=make_mesh(data=2, space=4))
    frames = pipe(img, height=64, width=48, num_frames=3, num_inference_steps=2, decode_chunk_size=2, seed=0,
                  num_videos_per_prompt=2, output_type="np").frames
    np.save(os.path.join(out_dir, f"frames_{pid}.npy"), frames)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
