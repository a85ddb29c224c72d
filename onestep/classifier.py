"""A small Fashion-MNIST classifier whose penultimate layer is a FAST feature space for sweeps and CI.

Distances in this space are reported as 'classifier KID/FD' and are never called FID. The classifier also
gives the class-agreement rate of class-conditional samples (does a 'sneaker' sample look like a sneaker?).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from onestep.checkpoint import register_model_kind


class FMNISTClassifier(nn.Module):
    def __init__(self, channels: int = 1, num_classes: int = 10, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width * 2, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width * 2, width * 2, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width * 2, feature_dim, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(feature_dim, num_classes)
        self.num_features = feature_dim

    def features(self, x_u8: torch.Tensor) -> torch.Tensor:
        x = x_u8.float() / 127.5 - 1 if x_u8.dtype == torch.uint8 else x_u8
        return self.body(x)

    def forward(self, x_u8: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x_u8))


@register_model_kind("fmnist-classifier")
def _build(spec: dict) -> nn.Module:
    return FMNISTClassifier(spec.get("channels", 1), spec.get("num_classes", 10), spec.get("width", 32),
                            spec.get("feature_dim", 128))


def train_classifier(out_path: str, epochs: int = 2, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                     limit: int | None = None) -> dict:
    """Train on Fashion-MNIST train (32x32 padded), report test accuracy, save safetensors + sidecar."""
    from onestep.checkpoint import save_model
    from onestep.data import load_fashion_mnist

    torch.manual_seed(seed)
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    xs, ys = train.images, train.labels
    if limit:
        xs, ys = xs[:limit], ys[:limit]
    model = FMNISTClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = np.random.default_rng(seed)
    t0 = time.time()
    steps = 0
    for ep in range(epochs):
        perm = gen.permutation(len(xs))
        for i in range(0, len(xs), batch_size):
            idx = perm[i:i + batch_size]
            x = torch.from_numpy(xs[idx])
            # light augmentation: random horizontal flip keeps the classes (clothing is left-right symmetric)
            flip = torch.from_numpy(gen.random(len(idx)) < 0.5)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(model(x), torch.from_numpy(ys[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(torch.from_numpy(test.images[i:i + 1000])).argmax(1).numpy()
                           == test.labels[i:i + 1000]).sum()) for i in range(0, len(test), 1000))
    acc = correct / len(test)
    spec = {"kind": "fmnist-classifier", "channels": 1, "num_classes": 10, "width": 32, "feature_dim": 128}
    save_model(out_path, model, spec, extra={"test_accuracy": acc, "epochs": epochs, "steps": steps,
                                             "train_seconds": time.time() - t0, "seed": seed})
    return {"test_accuracy": acc, "steps": steps, "seconds": time.time() - t0}
