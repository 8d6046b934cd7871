"""Evaluation: sample images (``generate``), FID/KID/precision-recall (``fid``), CLIP score
(``clip_score``), a combined report with plots (``report``), local pretrained weights (``weights``) and
a Fashion-MNIST classifier that scores prompt following (``classifier``).
Each is ``python -m sedit.eval.<tool> --help``; ``python -m sedit.eval <tool> ...`` does the same."""
