"""The built-in demo data: scikit-learn's digits with the CIFAR loader's contract."""

import pytest
import torch
import torch.nn.functional as F

from teskd_fast.data.digits import TEST_SIZE, TRAIN_SIZE, DigitsLoader, digits_loaders, load_digits_split


def _all(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_split_shapes_and_contract():
    xtr, ytr, xte, yte = load_digits_split()
    assert xtr.shape == (TRAIN_SIZE, 1, 8, 8) and xte.shape == (TEST_SIZE, 1, 8, 8)
    assert set(ytr.tolist()) == set(range(10)) and set(yte.tolist()) == set(range(10))
    train, val = digits_loaders(batch_size=64, seed=3)
    assert len(train) == -(-TRAIN_SIZE // 64) and len(val) == -(-TEST_SIZE // 128)
    batches = _all(train)
    assert len(batches) == len(train)
    x, y = batches[0]
    assert x.shape == (64, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    # Every training image once per epoch; the test split in its stored order, unaugmented.
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == sorted(ytr.tolist())
    vx = torch.cat([b[0] for b in _all(val)])
    assert torch.equal(torch.cat([b[1] for b in _all(val)]), yte)
    mean, std = xtr.mean(), xtr.std()
    torch.testing.assert_close(vx[:, :1], (xte - mean) / std)
    assert digits_loaders(image_size=16)[0].images.shape[-1] == 16


def test_shift_augmentation_is_a_bounded_zero_filled_translation():
    xtr, ytr, _, _ = load_digits_split()
    loader = DigitsLoader(xtr, ytr, batch_size=64, shuffle=False, augment=True, pad=1, seed=0)
    plain = DigitsLoader(xtr, ytr, batch_size=64, shuffle=False, augment=False, seed=0)
    (xa, _), (xp, _) = next(iter(loader)), next(iter(plain))
    padded = F.pad(xp, (1, 1, 1, 1))
    shifts = []
    for a, p in zip(xa, padded, strict=True):
        found = [(dy, dx) for dy in range(3) for dx in range(3) if torch.equal(a, p[:, dy : dy + 8, dx : dx + 8])]
        assert found, "every augmented image is its original shifted by at most 1 pixel"
        shifts.append(found[0])
    assert len(set(shifts)) > 3


def test_seeded_order_and_exact_start_batch():
    train, _ = digits_loaders(batch_size=50, seed=5)
    train.set_epoch(2)
    epoch2 = _all(train)
    train.set_epoch(2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch2, _all(train), strict=True))
    train.set_epoch(3)
    assert not torch.equal(epoch2[0][1], _all(train)[0][1])
    # Starting at batch 7 gives exactly the rest of the epoch, augmentation included.
    train.set_epoch(2, start_batch=7)
    tail = _all(train)
    assert len(tail) == len(epoch2) - 7
    for (xa, ya), (xb, yb) in zip(tail, epoch2[7:], strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    state = train.state_dict()
    assert state["epoch"] == 3 and state["position"] == 0


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_split_every_global_batch(world_size):
    per = 16
    whole, _ = digits_loaders(batch_size=per * world_size, seed=1)
    shards = [digits_loaders(batch_size=per, seed=1, rank=r, world_size=world_size) for r in range(world_size)]
    full = _all(whole)
    parts = [_all(t) for t, _ in shards]
    assert all(len(p) == len(parts[0]) for p in parts)
    for k in range(len(parts[0])):
        x = torch.cat([p[k][0] for p in parts])
        y = torch.cat([p[k][1] for p in parts])
        assert torch.equal(x, full[k][0]) and torch.equal(y, full[k][1])
    # The test split: disjoint and complete over the ranks.
    seen = torch.cat([b[1] for _, v in shards for b in _all(v)])
    assert len(seen) == TEST_SIZE


def test_bad_arguments_are_named():
    xtr, ytr, _, _ = load_digits_split()
    with pytest.raises(ValueError, match="rank"):
        DigitsLoader(xtr, ytr, batch_size=8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="labels"):
        DigitsLoader(xtr, ytr[:5], batch_size=8)
    with pytest.raises(ValueError, match="image_size"):
        load_digits_split(4)
