import numpy as np
import pytest

from onestep.noise import parse_seeds, seeded_noise


def test_same_seed_same_noise_any_batch():
    alone = seeded_noise([7], (1, 4, 4))
    batched = seeded_noise([1, 7, 9], (1, 4, 4))
    np.testing.assert_array_equal(alone[0], batched[1])
    assert batched.dtype == np.float32 and batched.shape == (3, 1, 4, 4)
    assert not np.array_equal(batched[0], batched[1])


def test_recorded_values():
    """Golden values of the generator defined in onestep/noise.py, written down once: any change of the
    stream (numpy version, platform, refactoring) fails here. Exact float32 equality."""
    z = seeded_noise([0, 1, 2**63 - 1], (5,))
    golden = np.array([
        [-1.8444989919662476, -1.3789585828781128, 0.7618358731269836, 0.8877708911895752, 0.23716075718402863],
        [-0.17043150961399078, 1.054052710533142, 0.4956260025501251, 0.35478267073631287, 2.540283679962158],
        [0.5417929291725159, 1.2011003494262695, -1.3199217319488525, 1.19336998462677, -0.6157764792442322],
    ], dtype=np.float32)
    np.testing.assert_array_equal(z, golden)
    odd = seeded_noise([42], (1, 2, 3))
    np.testing.assert_array_equal(odd.reshape(-1), np.array(
        [-0.9273366928100586, 2.37738037109375, -0.18234416842460632, 0.2314203828573227, -0.12844011187553406,
         0.7018430829048157], dtype=np.float32))


def test_integer_stream_recorded():
    from onestep.noise import _words

    w = _words(np.array([0, 12345]), 2)
    assert [hex(int(x)) for x in w.ravel()] == ['0x120da1d2f63a477d', '0x9a27f6025fe78a7e',
                                                '0x1de296e9fd851334', '0x54a86a66ead999b8']


def test_not_numpy_generator_and_prefix_stable():
    """The stream is ours (not numpy's PCG64), and a larger shape extends a sample's stream, never reshuffles
    the first elements of the same flattened layout."""
    assert not np.allclose(seeded_noise([0], (3,))[0], np.random.default_rng(0).standard_normal(3, dtype=np.float32))
    np.testing.assert_array_equal(seeded_noise([5], (8,))[0], seeded_noise([5], (9,))[0, :8])


def test_looks_standard_normal():
    z = seeded_noise(range(256), (1, 32, 32)).ravel().astype(np.float64)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert abs(np.mean(np.abs(z) < 1.0) - 0.6827) < 0.005  # one-sigma mass
    corr = np.corrcoef(seeded_noise(range(2000), (2,))[:, 0], seeded_noise(range(1, 2001), (2,))[:, 0])[0, 1]
    assert abs(corr) < 0.06  # neighbouring seeds are independent


def test_seed_range_errors():
    with pytest.raises(ValueError):
        seeded_noise([-1], (2,))
    with pytest.raises(ValueError):
        seeded_noise([2**63], (2,))
    assert seeded_noise([], (2, 2)).shape == (0, 2, 2)


def test_parse_seeds():
    assert parse_seeds("0-3,10") == [0, 1, 2, 3, 10]
    assert parse_seeds("5") == [5]
    with pytest.raises(ValueError):
        parse_seeds("9-3")
    with pytest.raises(ValueError):
        parse_seeds(",")
