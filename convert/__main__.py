"""``python -m convert SRC DST [--variant fp16] [--dtype bfloat16]``: see :mod:`svd_jax.convert`."""

import sys

from svd_jax.convert import main

if __name__ == "__main__":
    sys.exit(main())
