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
    # pinned: numpy's PCG64 + standard_normal(float32) for seed 0
    z = seeded_noise([0], (3,))
    np.testing.assert_allclose(z[0], np.random.default_rng(0).standard_normal(3, dtype=np.float32))


def test_seed_range_errors():
    with pytest.raises(ValueError):
        seeded_noise([-1], (2,))
    assert seeded_noise([], (2, 2)).shape == (0, 2, 2)


def test_parse_seeds():
    assert parse_seeds("0-3,10") == [0, 1, 2, 3, 10]
    assert parse_seeds("5") == [5]
    with pytest.raises(ValueError):
        parse_seeds("9-3")
    with pytest.raises(ValueError):
        parse_seeds(",")
