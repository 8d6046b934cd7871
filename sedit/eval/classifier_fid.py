"""FID and KID in the Fashion-MNIST classifier's feature space: a proxy, not Inception FID.

torch-fidelity computes the statistics; the feature extractor it runs is our classifier
(``sedit.eval.classifier``), registered under ``FEATURE_EXTRACTOR`` and loaded from its safetensors
file, so FID = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)) and KID (cubic polynomial kernel,
unbiased MMD^2 over subsets) use its ``feature_dim``-d penultimate activations instead of Inception's
2048-d pool3 features. The numbers are comparable only with other numbers from the same classifier file.

Images travel as ``GrayImages``: uint8 (N, H, W) arrays, handed to torch-fidelity as (3, H, W) uint8
tensors (gray copied to three channels), which is what both this extractor and Inception take.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

FEATURE_EXTRACTOR = "sedit-fmnist-classifier"
FEATURE = "penultimate"


class GrayImages(Dataset):
    """uint8 gray images (N, H, W) as torch-fidelity inputs: uint8 (3, H, W) tensors."""

    def __init__(self, images: np.ndarray):
        images = np.asarray(images)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 gray images (N, H, W), got {images.shape} {images.dtype}")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.images[i]).unsqueeze(0).expand(3, -1, -1).contiguous()  # (3, H, W)


def uint8_to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float in [-1, 1], the range the classifier and the VAE use."""
    return images.float() / 127.5 - 1.0


def _extractor_class():
    """The torch-fidelity extractor class (built lazily: torch-fidelity is only needed for metrics)."""
    from torch_fidelity import FeatureExtractorBase

    from sedit.eval.classifier import load_classifier

    class ClassifierFeatures(FeatureExtractorBase):
        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            if feature_extractor_weights_path is None:
                raise ValueError(f"{FEATURE_EXTRACTOR}: pass feature_extractor_weights_path (the classifier file)")
            self.classifier = load_classifier(feature_extractor_weights_path)

        @staticmethod
        def get_provided_features_list():
            return (FEATURE,)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return FEATURE

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 28, 28, dtype=torch.uint8)

        def forward(self, x):
            return (self.classifier.features(uint8_to_unit(x)).double(),)  # (N, feature_dim)

    return ClassifierFeatures


def register() -> None:
    """Make ``FEATURE_EXTRACTOR`` known to torch-fidelity (once per process)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if FEATURE_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(FEATURE_EXTRACTOR, _extractor_class())


def reference_cache_name(reference: np.ndarray, weights_file: str | Path, extractor: str) -> str:
    """A torch-fidelity cache entry name that changes with the reference images and the network's file."""
    from sedit.eval.weights import file_digest

    h = hashlib.sha256(np.ascontiguousarray(reference).tobytes())
    h.update(f"|{reference.shape}|{extractor}|{file_digest(weights_file)}".encode())
    return f"sedit-gray-{len(reference)}-{h.hexdigest()[:20]}"


def classifier_metrics(
    generated: np.ndarray,
    reference: np.ndarray,
    classifier_file: str | Path,
    cache_dir: str | Path | None = None,
    kid_subsets: int = 100,
) -> dict[str, float]:
    """Proxy FID and KID (mean, std) of uint8 gray images against reference images, computed by
    torch-fidelity in the classifier's feature space, on the CPU (the network is small). With
    ``cache_dir`` the reference features are computed once and reused."""
    import torch_fidelity

    register()
    gen, ref = GrayImages(generated), GrayImages(reference)
    if len(gen) < 2 or len(ref) < 2:
        raise ValueError(f"need at least 2 images on each side, got {len(gen)} generated and {len(ref)} reference")
    cache = {"cache": False}
    if cache_dir is not None:
        name = reference_cache_name(reference, classifier_file, FEATURE_EXTRACTOR)
        cache = {"cache": True, "cache_root": str(cache_dir), "input2_cache_name": name}
    raw = torch_fidelity.calculate_metrics(
        input1=gen,
        input2=ref,
        fid=True,
        kid=True,
        kid_subsets=kid_subsets,
        kid_subset_size=min(1000, len(gen), len(ref)),
        feature_extractor=FEATURE_EXTRACTOR,
        feature_extractor_weights_path=str(classifier_file),
        cuda=False,
        save_cpu_ram=True,  # in-process loading: the images are already in memory
        verbose=False,
        **cache,
    )
    return {
        "fid": float(raw["frechet_inception_distance"]),
        "kid_mean": float(raw["kernel_inception_distance_mean"]),
        "kid_std": float(raw["kernel_inception_distance_std"]),
    }
