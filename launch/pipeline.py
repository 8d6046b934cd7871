"""Run the four training stages in order (see sedit/pipeline.py).

python launch/pipeline.py                      # tiny preset on the built-in data -> runs/tiny
python launch/pipeline.py --configs configs/xl/stage{1,2,3,4}.yaml --data data/coco --gpus 8 --out runs/xl
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sedit.pipeline import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
