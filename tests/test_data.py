"""TileDataset and its loaders: normalisation, mask, augmentation from (seed, epoch, index) only,
and, through the trainer's own path (`ResumableLoader.endless`), worker-count invariance and
mid-epoch restore in a new process, batch by batch; the validation loader walks in index order."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from axs_lib.data import TileDataset, validation_loader
from axs_lib.ingest import encode_tile
from axs_lib.loader import ResumableLoader
from axs_lib.sampling import SampleIndex
from axs_lib.tiles import OPTICAL_RANGE, S1_KEYS, S2_KEYS, SAR_DB_RANGE, list_tiles, read_tile
from axs_lib.workers import init_worker

TENSORS = ("sar", "optical", "mask", "index", "epoch", "position")


def batches(paths, num_workers, n=6, batch_size=5, seed=11, consumed=None):
    """The first ``n`` training batches as the trainer draws them (endless, across epoch ends), and
    the loader's state after the first ``consumed`` of them."""
    dataset = TileDataset(paths, seed=seed, augment=True, speckle_std=0.3)
    with ResumableLoader(dataset, batch_size, seed=seed, num_workers=num_workers) as loader:
        stream, got, state = loader.endless(), [], None
        for _ in range(n):
            got.append(next(stream))
            if len(got) == consumed:
                state = loader.state_dict()
        stream.close()
    return got, state


def key(index, epoch, position=0):
    return SampleIndex(index, epoch, position)


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        for name in TENSORS:
            assert x[name].dtype == y[name].dtype and torch.equal(x[name], y[name]), f"batch {i}, {name}"


def dihedral(t):
    """All eight flips/rotations of a (C, H, W) tensor."""
    out = []
    for k in range(4):
        r = torch.rot90(t, k, dims=(-2, -1))
        out += [r, torch.flip(r, (-1,))]
    return out


def test_sample_is_normalised_with_a_mask(demo_tiles):
    paths = list_tiles(demo_tiles)
    sample = TileDataset(paths, seed=0, augment=False)[2]
    assert sample["sar"].shape == (2, 120, 120) and sample["optical"].shape == (4, 120, 120)
    assert sample["mask"].shape == (1, 120, 120) and bool((sample["mask"] == 1).all())
    for name in ("sar", "optical", "mask"):
        assert sample[name].dtype == torch.float32
    assert int(sample["index"]) == 2 and int(sample["epoch"]) == -1 and int(sample["position"]) == -1
    tile = read_tile(paths[2])
    lo, hi = SAR_DB_RANGE
    expected_sar = (np.clip(tile.sar, lo, hi) - lo) / (hi - lo)
    np.testing.assert_allclose(sample["sar"].numpy(), expected_sar, rtol=0, atol=1e-6)
    np.testing.assert_allclose(sample["optical"].numpy(), np.clip(tile.optical / OPTICAL_RANGE[1], 0, 1), rtol=0, atol=1e-6)
    assert 0.2 < float(sample["sar"].mean()) < 0.8  # real data lands mid-range, not clipped


def test_nan_pixels_are_zero_and_masked(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {k: rng.uniform(-20, -5, (6, 6)).astype(np.float32) for k in S1_KEYS}
    arrays |= {k: rng.uniform(100, 3000, (6, 6)).astype(np.float32) for k in S2_KEYS}
    arrays["s1_vh"][0, 0] = np.nan
    arrays["s2_b8"][5, 4] = np.nan
    path = tmp_path / "n.npz"
    path.write_bytes(encode_tile(arrays))
    sample = TileDataset([path], seed=0, augment=False)[0]
    expected = np.ones((1, 6, 6), np.float32)
    expected[0, 0, 0] = expected[0, 5, 4] = 0
    np.testing.assert_array_equal(sample["mask"].numpy(), expected)
    assert float(sample["sar"][1, 0, 0]) == 0.0 and float(sample["optical"][3, 5, 4]) == 0.0
    assert not any(torch.isnan(sample[n]).any() for n in ("sar", "optical"))


def test_validation_keys_are_never_augmented(synth_tiles):
    paths = list_tiles(synth_tiles)
    plain = TileDataset(paths, seed=3, augment=False)
    augmenting = TileDataset(paths, seed=3, augment=True, speckle_std=0.5)
    for i in range(len(paths)):
        base = plain[i]
        for name in ("sar", "optical", "mask"):
            assert torch.equal(augmenting[i][name], base[name])  # int key: no augmentation
            assert torch.equal(plain[key(i, 7)][name], base[name])  # augment=False: none either


def test_augmentation_varies_and_is_a_pure_function_of_seed_epoch_index(synth_tiles):
    paths = list_tiles(synth_tiles)
    dataset = TileDataset(paths, seed=3, augment=True)
    base = TileDataset(paths, seed=3, augment=False)
    for i in range(4):
        variants = [dataset[key(i, e)]["optical"] for e in range(8)]
        candidates = dihedral(base[i]["optical"])
        for v in variants:  # every augmented sample is a flip/rotation of the tile...
            assert any(torch.equal(v, c) for c in candidates)
        assert len({v.numpy().tobytes() for v in variants}) >= 3  # ...and they vary across epochs
    across_samples = {bytes(dataset[key(i, 0)]["optical"].numpy().tobytes()) != bytes(base[i]["optical"].numpy().tobytes()) for i in range(12)}
    assert across_samples == {True, False}  # some samples of one epoch are transformed, some not
    fresh = TileDataset(paths, seed=3, augment=True)
    assert torch.equal(fresh[key(2, 5, position=9)]["sar"], dataset[key(2, 5)]["sar"])  # position does not matter
    other_seed = TileDataset(paths, seed=4, augment=True)
    assert any(not torch.equal(other_seed[key(i, 0)]["sar"], dataset[key(i, 0)]["sar"]) for i in range(6))


def test_speckle_changes_sar_only(synth_tiles):
    paths = list_tiles(synth_tiles)
    geometric = TileDataset(paths, seed=3, augment=True)
    speckled = TileDataset(paths, seed=3, augment=True, speckle_std=0.3)
    a, b = geometric[key(0, 1)], speckled[key(0, 1)]
    assert torch.equal(a["optical"], b["optical"]) and torch.equal(a["mask"], b["mask"])
    assert not torch.equal(a["sar"], b["sar"])
    assert 0.0 < float((a["sar"] - b["sar"]).abs().mean()) < 0.1


def test_non_square_tiles_keep_their_shape(tmp_path):
    arrays = {k: np.full((4, 7), -10.0, np.float32) for k in S1_KEYS} | {k: np.full((4, 7), 500, np.uint16) for k in S2_KEYS}
    (tmp_path / "r.npz").write_bytes(encode_tile(arrays))
    dataset = TileDataset([tmp_path / "r.npz"], seed=0, augment=True)
    assert {tuple(dataset[key(0, e)]["sar"].shape) for e in range(16)} == {(2, 4, 7)}


@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")  # 2-core CI machines
def test_batches_do_not_depend_on_worker_count(synth_tiles):
    paths = list_tiles(synth_tiles)
    reference, _ = batches(paths, num_workers=0)  # 6 batches of 5 over 12 tiles: crosses two epoch ends
    assert [int(b["epoch"][-1]) for b in reference] == [0, 0, 1, 1, 2, 2]
    for workers in (1, 2, 4):
        assert_same_batches(batches(paths, num_workers=workers)[0], reference)


RESUME_SCRIPT = textwrap.dedent(
    """
    import itertools, sys, torch
    from axs_lib.data import TileDataset
    from axs_lib.loader import ResumableLoader
    from axs_lib.tiles import list_tiles
    directory, epoch, position, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    paths = list_tiles(directory)
    dataset = TileDataset(paths, seed=11, augment=True, speckle_std=0.3)
    with ResumableLoader(dataset, 5, seed=11, num_workers=2) as loader:
        loader.load_state_dict({"epoch": epoch, "position": position})
        torch.save(list(itertools.islice(loader.endless(), 4)), out)
    """
)


def test_mid_epoch_restore_in_a_new_process_gives_the_same_batches(synth_tiles, tmp_path):
    paths = list_tiles(synth_tiles)
    uninterrupted, state = batches(paths, num_workers=2, n=6, consumed=2)  # workers read ahead of the loop
    assert (state["epoch"], state["position"]) == (0, 10)  # after 10 of 12 samples: mid-epoch
    out = tmp_path / "resumed.pt"
    subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(synth_tiles), str(state["epoch"]), str(state["position"]), str(out)],
                   check=True, timeout=120)
    assert_same_batches(torch.load(out, weights_only=True), uninterrupted[2:6])


def test_validation_loader_walks_in_order_without_augmentation(synth_tiles):
    paths = list_tiles(synth_tiles)
    dataset = TileDataset(paths, seed=0, augment=True)
    loader = validation_loader(dataset, batch_size=5, num_workers=0, seed=0)
    got = list(loader)
    assert torch.equal(torch.cat([b["index"] for b in got]), torch.arange(12))
    assert bool((torch.cat([b["epoch"] for b in got]) == -1).all())
    assert torch.equal(got[0]["sar"][1], dataset[1]["sar"])


def test_validation_loader_settings():
    loader = validation_loader(TileDataset([], seed=0, augment=False), batch_size=2, num_workers=2, seed=5, pin_memory=True)
    assert loader.persistent_workers and loader.num_workers == 2
    assert loader.worker_init_fn is init_worker  # every loader's: seed_worker, then the stop signals ignored
    assert loader.pin_memory == torch.cuda.is_available()
    assert torch.equal(loader.generator.get_state(), torch.Generator().manual_seed(5).get_state())


@pytest.mark.parametrize("index", [12, SampleIndex(12, 0, 0), -1])
def test_out_of_range_keys_raise_index_error(synth_tiles, index):
    with pytest.raises(IndexError):
        TileDataset(list_tiles(synth_tiles), seed=0, augment=False)[index]


def test_a_tuple_key_is_refused_naming_sample_index(synth_tiles):
    with pytest.raises(TypeError, match=r"got the tuple \(0, 0, 1\).*SampleIndex\(index, epoch, position\)"):
        TileDataset(list_tiles(synth_tiles), seed=0, augment=True)[(0, 0, 1)]
