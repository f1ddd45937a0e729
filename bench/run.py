"""`make bench`: run FieldSync's benchmark (see bench/README.md and bench/main.py).

Run as a script (`.venv/bin/python bench/run.py`): it puts the repository on
the import path in place of bench/ itself (so the package's modules are
never imported as top-level ones), then hands over to `bench.main`.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
    from bench.main import main

    sys.exit(main())
