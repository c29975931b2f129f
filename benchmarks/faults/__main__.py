"""`python -m benchmarks.faults ARGS` from the repository root, or `python benchmarks/faults ARGS`
from anywhere (the folder run as a script, as `benchmarks/faults.py` once was)."""

import sys
from pathlib import Path

if __package__:
    from .cli import main
else:  # the folder itself was run: its parent's parent is the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[2])
    from benchmarks.faults.cli import main

sys.exit(main())
