"""A small Fashion-MNIST classifier that judges whether generated images follow their class prompts.

    python -m sedit.eval.classifier --out data/fmnist/classifier.safetensors

Trained on real training images, it labels images generated from "a photo of a {class}" prompts;
``prompt_following`` is the fraction labelled as the class their prompt asked for (chance: 10%). Its
penultimate layer (``features``) can stand in for Inception features in a proxy FID/KID.

Inputs are what ``sedit.sampling.sample_images`` and the VAE decode give: (N, C, H, W) in [-1, 1],
C = 3 (RGB, averaged to gray) or 1, any H = W (resized to 28 px, bilinear with antialiasing).

Network (LeNet-like): conv 3x3 (1 -> w) ReLU, max-pool 2 -> conv 3x3 (w -> 2w) ReLU, max-pool 2 ->
linear (2w * 7 * 7 -> ``feature_dim``) ReLU = features -> linear (-> 10) = logits. Training: Adam,
cross-entropy, batches drawn in a seeded order, weights initialised from the seed: deterministic on CPU
for a given thread count. Weights are saved as safetensors, with the network's sizes and the training
report in the metadata.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

INPUT_SIZE = 28
FORMAT = "sedit-classifier/1"


class Classifier(nn.Module):
    """Two conv blocks and two linear layers on 28 x 28 gray images."""

    def __init__(self, num_classes: int = 10, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.sizes = {"num_classes": num_classes, "width": width, "feature_dim": feature_dim}
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * (INPUT_SIZE // 4) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, feature_dim) of images (N, C, H, W) in [-1, 1]."""
        x = to_gray_28(images)  # (N, 1, 28, 28)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (N, w, 14, 14)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (N, 2w, 7, 7)
        return F.relu(self.fc(x.flatten(1)))  # (N, feature_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))  # (N, num_classes)


def to_gray_28(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1], C in {1, 3} -> (N, 1, 28, 28): channel mean, antialiased bilinear resize."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 1 or 3, H, W), got {tuple(images.shape)}")
    x = images.float().mean(dim=1, keepdim=True)  # (N, 1, H, W)
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = 3,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 2e-3,
    num_classes: int = 10,
    width: int = 32,
    feature_dim: int = 128,
) -> Classifier:
    """Train on images (N, C, H, W) in [-1, 1] with labels (N,) in 0..num_classes-1; return the model
    in eval mode."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(labels) == 0 or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be in 0..{num_classes - 1} (and there must be some)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Classifier(num_classes, width, feature_dim)
    order = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(images), generator=order).split(batch_size):
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def features(classifier: Classifier, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Penultimate-layer features (N, feature_dim), in batches, without gradients."""
    return torch.cat([classifier.features(chunk) for chunk in images.split(batch_size)])


@torch.no_grad()
def predict(classifier: Classifier, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted labels (N,)."""
    return torch.cat([classifier(chunk).argmax(dim=1) for chunk in images.split(batch_size)])


def accuracy(classifier: Classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images predicted as their label."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    return float((predict(classifier, images) == labels).float().mean())


def prompt_following(classifier: Classifier, images: torch.Tensor, intended_labels: torch.Tensor) -> float:
    """Fraction of generated images that the classifier puts in the class their prompt named.

    Chance is 1 / 10 for balanced prompts; an unconditional or prompt-blind generator scores about that
    (more only if its images favour the classes that were prompted most)."""
    return accuracy(classifier, images, intended_labels)


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def save_classifier(classifier: Classifier, path: str | Path, report: dict | None = None) -> Path:
    """Weights as safetensors; sizes and ``report`` (JSON) in its metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in classifier.state_dict().items()}
    meta = {"format": FORMAT, "sizes": json.dumps(classifier.sizes), "report": json.dumps(report or {})}
    save_file(state, str(path), metadata=meta)
    return path


def load_classifier(path: str | Path) -> Classifier:
    """A classifier written by ``save_classifier``, in eval mode."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except SafetensorError as err:
        raise ValueError(f"{path}: not a safetensors file ({err})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a sedit classifier (format {meta.get('format')!r}, expected {FORMAT!r})")
    model = Classifier(**json.loads(meta["sizes"]))
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def main(argv: list[str] | None = None) -> dict:
    from sedit.data import fashion_mnist

    parser = argparse.ArgumentParser(
        prog="python -m sedit.eval.classifier",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="data/fmnist/classifier.safetensors", help="weights file to write")
    parser.add_argument("--train-images", type=int, help="use the first N training images (default: all 60,000)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", default=fashion_mnist.DEFAULT_ROOT, help="folder of the four gzipped IDX files")
    args = parser.parse_args(argv)
    start = time.time()
    train_x, train_y = fashion_mnist.load_split("train", args.root)
    test_x, test_y = fashion_mnist.load_split("test", args.root)
    train_x, train_y = train_x[: args.train_images], train_y[: args.train_images]
    model = train_classifier(fashion_mnist.to_pixels(train_x), torch.from_numpy(train_y), args.epochs, args.seed)
    report = {
        "train_images": len(train_x),
        "epochs": args.epochs,
        "seed": args.seed,
        "seconds": round(time.time() - start, 1),
        "test_accuracy": round(accuracy(model, fashion_mnist.to_pixels(test_x), torch.from_numpy(test_y)), 4),
    }
    save_classifier(model, args.out, report)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
