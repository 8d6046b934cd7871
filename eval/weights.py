"""Entry point: same as `python -m sedit.eval.weights` (run from anywhere: `python eval/weights.py --help`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for `import sedit`

from sedit.eval.weights import main  # noqa: E402

if __name__ == "__main__":
    main()
