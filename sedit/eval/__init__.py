"""Evaluation: sample images (``generate``), FID/KID/precision-recall (``fid``), CLIP score
(``clip_score``), a combined report with plots (``report``) and local pretrained weights (``weights``).
Each is ``python -m sedit.eval.<tool> --help``; ``python -m sedit.eval <tool> ...`` does the same."""
