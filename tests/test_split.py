"""The split: the guide's random_split, at least one validation tile, sidecar splits, the manifest."""

from __future__ import annotations

import json
import random
import shutil

import pytest
from torch.utils.data import random_split

from axs_lib.errors import InputError, UsageError
from axs_lib.reproducibility import create_reproducible_generator
from axs_lib.split import make_split, split_lengths
from axs_lib.tiles import list_tiles

# Pinned: changing the split algorithm silently changes what every run trains on.
DEMO_SPLIT_SEED_42 = {
    "train": [
        "S2A_MSIL2A_20171221T112501_56_35",
        "S2B_MSIL2A_20180204T94161_57_38",
        "S2B_MSIL2A_20170924T93020_69_24",
        "S2A_MSIL2A_20170617T113321_36_85",
    ],
    "val": ["S2A_MSIL2A_20170617T113321_4_55"],
}
DEMO_TEST_TILE = "S2A_MSIL2A_20170613T101031_87_48"  # in BigEarthNet's official test list


def fake_paths(tmp_path, n):
    return [tmp_path / f"tile_{i:03d}.npz" for i in range(n)]


def set_splits(directory, splits):
    for path, split in zip(list_tiles(directory), splits):
        meta = json.loads(path.with_suffix(".json").read_text())
        if split is None:
            meta.pop("split", None)
        else:
            meta["split"] = split
        path.with_suffix(".json").write_text(json.dumps(meta))


@pytest.fixture()
def synth_copy(synth_tiles, tmp_path):
    target = tmp_path / "tiles"
    shutil.copytree(synth_tiles, target)
    return target


def test_demo_split_is_pinned(demo_tiles):
    # One demo tile is in no official list, so "auto" falls back to the seeded random split,
    # over the tiles that are not held out for testing.
    split = make_split(list_tiles(demo_tiles), seed=42)
    manifest = split.manifest()
    assert split.source == "random"
    assert {"train": manifest["train"], "val": manifest["val"]} == DEMO_SPLIT_SEED_42
    assert manifest == {"source": "random", "seed": 42, "val_fraction": 0.1, "excluded": [DEMO_TEST_TILE],
                        **DEMO_SPLIT_SEED_42}


def test_auto_never_trains_on_a_sidecar_test_tile(demo_tiles):
    for seed in range(20):
        split = make_split(list_tiles(demo_tiles), seed=seed)
        assert DEMO_TEST_TILE not in {p.stem for p in split.train + split.val}
    explicit = make_split(list_tiles(demo_tiles), seed=42, source="random")  # the guide's split: every tile
    assert len(explicit.train) + len(explicit.val) == 6 and explicit.excluded == []


def test_ten_tiles_match_the_guides_random_split_exactly(tmp_path):
    paths = fake_paths(tmp_path, 10)
    for seed in (0, 42, 1234):
        guide_train, guide_val = random_split(paths, [0.9, 0.1], generator=create_reproducible_generator(seed))
        split = make_split(paths, seed)
        assert (len(split.train), len(split.val)) == (9, 1)
        assert split.train == [paths[i] for i in guide_train.indices]
        assert split.val == [paths[i] for i in guide_val.indices]


def test_lengths_give_validation_at_least_one_tile():
    assert split_lengths(1, 0.1) == (1, 0)
    assert [split_lengths(n, 0.1) for n in (2, 6, 9)] == [(1, 1), (5, 1), (8, 1)]
    assert split_lengths(20, 0.1) == (18, 2)
    assert split_lengths(37, 0.1) == (34, 3)  # torch: floor(3.7) = 3 to val, remainder to train
    assert split_lengths(10, 0.25) == (8, 2)


def test_single_tile_trains_with_empty_validation(tmp_path):
    split = make_split(fake_paths(tmp_path, 1), seed=0, source="random")
    assert split.train == fake_paths(tmp_path, 1) and split.val == []


def test_split_is_stable_and_depends_on_seed_not_input_order(tmp_path):
    paths = fake_paths(tmp_path, 50)
    shuffled = paths[:]
    random.Random(0).shuffle(shuffled)
    a = make_split(paths, seed=7, source="random")
    assert make_split(shuffled, seed=7, source="random").manifest() == a.manifest()
    assert make_split(paths, seed=8, source="random").manifest() != a.manifest()
    assert sorted(a.train + a.val) == paths and not set(a.train) & set(a.val)


def test_sidecar_split_wins_and_excludes_test_tiles(synth_copy):
    set_splits(synth_copy, ["train"] * 8 + ["validation", "val", "test", "test"])
    paths = list_tiles(synth_copy)
    for source in ("auto", "sidecar"):
        split = make_split(paths, seed=0, source=source)
        assert split.source == "sidecar"
        assert split.train == paths[:8] and split.val == paths[8:10] and split.excluded == paths[10:]
    assert make_split(paths, seed=0, source="random").source == "random"


def test_auto_falls_back_to_random_when_sidecars_cannot_split(synth_copy):
    paths = list_tiles(synth_copy)
    set_splits(synth_copy, ["train"] * 12)  # no validation tile
    assert make_split(paths, seed=0).source == "random"
    set_splits(synth_copy, ["train"] * 11 + [None])  # one tile lacks the field
    assert make_split(paths, seed=0).source == "random"
    with pytest.raises(InputError) as err:
        make_split(paths, seed=0, source="sidecar")
    assert err.value.path == str(paths[-1].with_suffix(".json")) and "no 'split' field" in err.value.problem
    set_splits(synth_copy, ["test"] * 12)
    with pytest.raises(UsageError, match="nothing to train on"):
        make_split(paths, seed=0, source="sidecar")


def test_manifest_holds_stems_only_and_is_written_atomically(demo_tiles, tmp_path):
    split = make_split(list_tiles(demo_tiles), seed=42)
    split.write(tmp_path / "split.json")
    text = (tmp_path / "split.json").read_text()
    assert json.loads(text) == split.manifest()
    assert str(demo_tiles) not in text and ".npz" not in text
    assert [p.name for p in tmp_path.iterdir()] == ["split.json"]


@pytest.mark.parametrize("kwargs,phrase", [(dict(val_fraction=0.0), "between 0 and 1"), (dict(val_fraction=1.0), "between 0 and 1"), (dict(source="sidecars"), "--split-source")])
def test_bad_arguments_are_usage_errors(tmp_path, kwargs, phrase):
    with pytest.raises(UsageError, match=phrase):
        make_split(fake_paths(tmp_path, 4), seed=0, **kwargs)
    with pytest.raises(UsageError, match="no tiles"):
        make_split([], seed=0)


def test_sidecar_splits_are_cached_until_a_sidecar_changes(tmp_path, monkeypatch):
    from axs_lib import split as split_module
    from axs_lib import tiles as tiles_module
    from axs_lib.ingest import write_synthetic_tiles

    monkeypatch.setattr(tiles_module, "RACY_SECONDS", -1.0)
    paths = write_synthetic_tiles(tmp_path / "t", count=4, size=8, seed=0)
    for path, split in zip(paths, ["train", "train", "val", "test"]):
        path.with_suffix(".json").write_text(json.dumps({"split": split}))
    reads = []
    original = split_module.read_sidecar
    monkeypatch.setattr(split_module, "read_sidecar", lambda p: reads.append(p.name) or original(p))
    first = make_split(paths, seed=0, cache_dir=tmp_path / "c")
    assert len(reads) == 4 and [p.name for p in first.excluded] == [paths[3].name]
    reads.clear()
    assert make_split(paths, seed=0, cache_dir=tmp_path / "c").manifest() == first.manifest()
    assert reads == []
    paths[2].with_suffix(".json").write_text(json.dumps({"split": "train"}))
    again = make_split(paths, seed=0, cache_dir=tmp_path / "c")
    assert reads == [paths[2].name] and again.source == "random"  # no val sidecar left: auto falls back


def test_tiles_flagged_cloudy_or_snowy_are_left_out_of_train_and_val_and_recorded(demo_tiles):
    from axs_lib.split import leave_out_flagged
    from axs_lib.tiles import read_sidecar

    paths = list_tiles(demo_tiles)
    snowy = [p for p in paths if "seasonal_snow" in (read_sidecar(p).get("quality_flags") or [])]
    assert len(snowy) == 1
    split = make_split(paths, 0, 0.1, "random")
    assert snowy[0] in split.train + split.val
    kept = leave_out_flagged(split)
    assert snowy[0] not in kept.train + kept.val and kept.flagged == snowy
    assert kept.manifest()["flagged"] == [snowy[0].stem]


def test_a_split_without_flagged_tiles_keeps_the_manifest_it_had(synth_tiles):
    from axs_lib.split import leave_out_flagged

    split = make_split(list_tiles(synth_tiles), 0, 0.1, "random")
    before = split.manifest()
    assert leave_out_flagged(split).manifest() == before and "flagged" not in before
