"""`python -m kaleido_s2v ...` (also under `torchrun -m kaleido_s2v ...`)."""

import sys

from kaleido_s2v.cli import main

if __name__ == "__main__":
    sys.exit(main())
