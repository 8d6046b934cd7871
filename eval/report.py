"""Entry point: same as `python -m sedit.eval.report` (run from anywhere: `python eval/report.py --help`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for `import sedit`

from sedit.eval.report import main  # noqa: E402

if __name__ == "__main__":
    main()
