"""Entry point: same as `python -m sedit.eval.prompt_following` (from anywhere: `python eval/prompt_following.py`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for `import sedit`

from sedit.eval.prompt_following import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
