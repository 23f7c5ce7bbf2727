"""`python -m pipeline_dsl.engine.native [--force] [--optional]`: build the native kernels (make native)."""
import sys

from . import build

try:
    build(force="--force" in sys.argv, quiet=False)
except RuntimeError as e:
    print(f"native kernels not built: {e}", file=sys.stderr)
    sys.exit(0 if "--optional" in sys.argv else 1)
