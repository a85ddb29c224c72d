import numpy as np
import torch

from conftest import needs_fmnist
from onestep.metrics import ClassifierFeatures, FeatureExtractor, InceptionFeatures, extract_features, fid_kid, \
    reference_features


def test_fid_kid_on_known_gaussians():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 8))
    b = rng.standard_normal((400, 8))
    same = fid_kid(a, b, kid_subset_size=200)
    shifted = fid_kid(a, b + 1.0, kid_subset_size=200)
    assert same["fid"] < 0.5 and abs(same["kid"]) < 0.05 * shifted["kid"]
    # FID of N(0, I) vs N(1, I) in 8-d is |mu|^2 = 8 (plus finite-sample bias)
    assert 7.0 < shifted["fid"] < 9.5 and shifted["kid"] > 0.5


def test_passthrough_extractor_accepts_features():
    f = FeatureExtractor(4)
    x = torch.randn(3, 4)
    torch.testing.assert_close(f(x), x.double())


@needs_fmnist
def test_classifier_space_real_vs_real_small_noise_large():
    from onestep.data import load_fashion_mnist

    clf = ClassifierFeatures()
    real_test = reference_features(clf, "fashion-mnist", "test", 500)
    real_train = reference_features(clf, "fashion-mnist", "train", 500)
    noise = np.random.default_rng(0).integers(0, 256, (500, 1, 32, 32), dtype=np.uint8)
    rr = fid_kid(real_test, real_train, kid_subset_size=250)
    rn = fid_kid(real_test, extract_features(clf, noise), kid_subset_size=250)
    assert abs(rr["kid"]) < 0.02 * rn["kid"]
    assert rn["fid"] > 20 * rr["fid"]
    ds = load_fashion_mnist("test")
    assert (clf.predict(ds.images[:500]) == ds.labels[:500]).mean() > 0.75


@needs_fmnist
def test_inception_real_vs_real_small_noise_large():
    from onestep.data import load_fashion_mnist

    inc = InceptionFeatures()
    ds = load_fashion_mnist("test")
    a, b = ds.images[:40], ds.images[40:80]
    noise = np.random.default_rng(0).integers(0, 256, (40, 1, 32, 32), dtype=np.uint8)
    fa, fb, fn = (extract_features(inc, x, batch=20) for x in (a, b, noise))
    assert fa.shape == (40, 2048)
    rr, rn = fid_kid(fa, fb, kid_subset_size=20), fid_kid(fa, fn, kid_subset_size=20)
    assert rn["kid"] > 10 * max(rr["kid"], 1e-3)
    assert rn["fid"] > 2 * rr["fid"]
