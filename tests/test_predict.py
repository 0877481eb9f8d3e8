"""``axs predict`` and ``axs evaluate``: a trained checkpoint used on tiles, with every input
checked first and outputs that are byte-identical from run to run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from axs_lib.checkpoint import load_checkpoint, save_checkpoint
from axs_lib.cli import main
from axs_lib.stage1.metrics import BANDS
from axs_lib.stage1.model import UNet
from axs_lib.stage1.predict import evaluate_checkpoint, load_model, predict_tiles
from axs_lib.tiles import S2_KEYS, list_tiles, read_sidecar


@pytest.fixture(scope="module")
def ckpt(stage1_reference) -> Path:
    return stage1_reference / "checkpoints" / "checkpoint_step_10.pt"


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str, *words: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("axs: error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_predict_writes_geotiffs_with_the_sidecars_crs_and_transform(ckpt, demo_tiles, tmp_path, capsys):
    out = tmp_path / "pred"
    code, stdout, _ = _run(capsys, "predict", str(ckpt), "--data-dir", str(demo_tiles), "--output-dir", str(out))
    assert code == 0 and "wrote 6 predictions (.tif)" in stdout
    model, _ = load_model(ckpt)
    for tile in list_tiles(demo_tiles):
        meta = read_sidecar(tile)
        with rasterio.open(out / f"{tile.stem}.tif") as src:
            assert src.count == 4 and src.dtypes == ("float32",) * 4 and src.descriptions == BANDS
            assert src.crs == rasterio.crs.CRS.from_user_input(meta["crs"])
            assert tuple(src.bounds) == pytest.approx(meta["bounds"])
            assert (src.transform.a, -src.transform.e) == pytest.approx((10.0, 10.0))  # 120 px over 1200 m
            bands = src.read()
        from axs_lib.stage1.predict import predict_array

        assert np.array_equal(bands, predict_array(model, tile), equal_nan=True)


def test_predict_falls_back_to_npz_without_georeference_and_is_byte_identical_twice(ckpt, demo_tiles, tmp_path, capsys):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for tile in list_tiles(demo_tiles)[:2]:
        shutil.copy(tile, tiles / tile.name)  # no sidecar: no CRS, no bounds
    a = predict_tiles(ckpt, tiles, tmp_path / "a")
    b = predict_tiles(ckpt, tiles, tmp_path / "b")
    assert [p.name for p in a] == [p.name for p in b] == [f"{t.stem}.npz" for t in sorted(tiles.glob("*.npz"))]
    for x, y in zip(a, b):
        assert x.read_bytes() == y.read_bytes()
    with np.load(a[0]) as z:
        assert sorted(z.files) == sorted(S2_KEYS) and z["s2_b2"].dtype == np.float32 and z["s2_b2"].shape == (120, 120)


def test_geotiffs_are_byte_identical_across_two_predictions(ckpt, demo_tiles, tmp_path):
    a = predict_tiles(ckpt, demo_tiles, tmp_path / "a")
    b = predict_tiles(ckpt, demo_tiles, tmp_path / "b")
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))


def test_existing_outputs_are_refused_and_kept_and_overwrite_replaces_only_ours(ckpt, demo_tiles, tmp_path, capsys):
    out = tmp_path / "pred"
    out.mkdir()
    first = list_tiles(demo_tiles)[0]
    (out / f"{first.stem}.tif").write_bytes(b"keep me")
    (out / "notes.txt").write_text("not ours")
    code, _, err = _run(capsys, "predict", str(ckpt), "--data-dir", str(demo_tiles), "--output-dir", str(out))
    assert code == 2
    _one_error_line(err, f"{first.stem}.tif", "already exists", "--overwrite")
    assert (out / f"{first.stem}.tif").read_bytes() == b"keep me" and sorted(p.name for p in out.iterdir()) == [f"{first.stem}.tif", "notes.txt"]
    code, _, _ = _run(capsys, "predict", str(ckpt), "--data-dir", str(demo_tiles), "--output-dir", str(out), "--overwrite")
    assert code == 0 and (out / f"{first.stem}.tif").read_bytes() != b"keep me"
    assert (out / "notes.txt").read_text() == "not ours" and len(list(out.iterdir())) == 7


@pytest.mark.parametrize("case", ["missing-checkpoint", "not-a-checkpoint", "no-tiles", "bad-tile", "output-is-a-file",
                                  "bad-crs"])
def test_bad_input_is_one_line_exit_2_and_creates_nothing(case, ckpt, demo_tiles, tmp_path, capsys):
    tiles, checkpoint, out = tmp_path / "tiles", ckpt, tmp_path / "out"
    shutil.copytree(demo_tiles, tiles)
    expected = []
    if case == "missing-checkpoint":
        checkpoint, expected = tmp_path / "nope.pt", ["nope.pt"]
    elif case == "not-a-checkpoint":
        checkpoint = tmp_path / "x.pt"
        save_checkpoint({"step": 1}, checkpoint)
        expected = ["x.pt", "not a Stage-1 checkpoint"]
    elif case == "no-tiles":
        tiles, expected = tmp_path / "empty", ["empty", "no .npz tiles"]
        tiles.mkdir()
    elif case == "bad-tile":
        victim = sorted(tiles.glob("*.npz"))[-1]
        victim.write_bytes(b"not a zip")
        expected = [victim.name]
    elif case == "output-is-a-file":
        out.write_text("a file")
        expected = ["out", "not a directory"]
    elif case == "bad-crs":
        sidecar = sorted(tiles.glob("*.json"))[0]
        meta = json.loads(sidecar.read_text())
        sidecar.write_text(json.dumps({**meta, "crs": "EPSG:999999"}))
        expected = [sidecar.name, "EPSG:999999"]
    code, _, err = _run(capsys, "predict", str(checkpoint), "--data-dir", str(tiles), "--output-dir", str(out))
    assert code == 2
    _one_error_line(err, *expected)
    assert (not out.exists()) or out.is_file()


def test_evaluate_prints_every_band_and_json_that_matches_the_library(ckpt, demo_tiles, capsys):
    code, stdout, _ = _run(capsys, "evaluate", str(ckpt), "--data-dir", str(demo_tiles), "--split", "test")
    assert code == 0 and "on 1 tiles" in stdout
    for row in (*BANDS, "all"):
        assert f"| {row} |" in stdout
    code, stdout, _ = _run(capsys, "evaluate", str(ckpt), "--data-dir", str(demo_tiles), "--json")
    assert code == 0
    result = json.loads(stdout)
    expected = evaluate_checkpoint(ckpt, list_tiles(demo_tiles))
    assert result["tiles"] == 6 and set(result["bands"]) == set(BANDS)
    assert result["overall"] == pytest.approx(expected["overall"])


def test_evaluate_split_without_such_tiles_is_one_line(ckpt, synth_tiles, capsys):
    code, _, err = _run(capsys, "evaluate", str(ckpt), "--data-dir", str(synth_tiles), "--split", "val")
    assert code == 2
    _one_error_line(err, "no tile has split 'val'")


def test_a_checkpoint_of_the_earlier_sigmoid_model_still_loads_and_predicts(ckpt, demo_tiles, tmp_path):
    old = load_checkpoint(ckpt)
    torch.manual_seed(0)
    sigmoid = UNet(width=8, dropout=0.1, head="sigmoid", output_bias=(0.05, 0.08, 0.07, 0.3), block="groupnorm")
    old["model_state_dict"] = sigmoid.state_dict()
    old["config"] = {k: v for k, v in old["config"].items() if k not in ("head", "clear_sky", "block")}  # as written before
    save_checkpoint(old, tmp_path / "old.pt")
    model, _ = load_model(tmp_path / "old.pt")
    assert model.head_kind == "sigmoid"
    assert not any(".shortcut." in name for name in model.state_dict())  # the GroupNorm blocks it was trained with
    result = evaluate_checkpoint(tmp_path / "old.pt", list_tiles(demo_tiles)[:1])
    assert 0 < result["overall"]["mae"] < 10000


def test_weights_that_do_not_fit_the_config_are_refused_by_name(ckpt, tmp_path, capsys):
    old = load_checkpoint(ckpt)
    old["config"] = {**old["config"], "width": 16}
    save_checkpoint(old, tmp_path / "wrong.pt")
    code, _, err = _run(capsys, "evaluate", str(tmp_path / "wrong.pt"), "--data-dir", str(tmp_path))
    assert code == 2
    _one_error_line(err, "wrong.pt", "width 16")


def test_predicting_into_the_tile_folder_is_refused_even_with_overwrite_and_keeps_the_tiles(ckpt, demo_tiles, tmp_path, capsys):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for tile in list_tiles(demo_tiles)[:2]:
        shutil.copy(tile, tiles / tile.name)  # no sidecar: the prediction of <stem>.npz would be <stem>.npz
    before = {p.name: p.read_bytes() for p in tiles.iterdir()}
    code, _, err = _run(capsys, "predict", str(ckpt), "--data-dir", str(tiles), "--output-dir", str(tiles), "--overwrite")
    assert code == 2
    _one_error_line(err, "is an input tile")
    assert {p.name: p.read_bytes() for p in tiles.iterdir()} == before


def test_a_prediction_is_never_written_through_a_planted_link(ckpt, demo_tiles, tmp_path):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    tile = list_tiles(demo_tiles)[0]
    shutil.copy(tile, tiles / tile.name)
    out = tmp_path / "out"
    out.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text("not yours")
    (out / f".{tile.stem}.npz.tmp").symlink_to(outside)  # the fixed temp name an earlier version used
    predict_tiles(ckpt, tiles, out)
    assert outside.read_text() == "not yours" and not (out / f"{tile.stem}.npz").is_symlink()


@pytest.fixture(scope="module")
def other_ckpt(stage1_reference, ckpt) -> Path:
    """A second checkpoint of the same run (other weights): stands in for a run of another seed."""
    return next(p for p in sorted((stage1_reference / "checkpoints").glob("checkpoint_step_*.pt")) if p != ckpt)


def test_several_checkpoints_predict_the_mean_of_their_predictions(ckpt, other_ckpt, demo_tiles, tmp_path):
    from axs_lib.stage1.predict import predict_array

    tile = list_tiles(demo_tiles)[0]
    a, b = (predict_array(load_model(p)[0], tile) for p in (ckpt, other_ckpt))
    assert not np.allclose(a, b)  # the control: the members do differ
    written = predict_tiles([ckpt, other_ckpt], demo_tiles, tmp_path / "mean")
    with rasterio.open(written[0]) as src:
        assert np.allclose(src.read(), (a + b) / 2, rtol=1e-5, atol=1e-2)
    again = predict_tiles([ckpt, other_ckpt], demo_tiles, tmp_path / "again")
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(written, again))


def test_evaluate_several_checkpoints_names_them_and_matches_the_library(ckpt, other_ckpt, demo_tiles, capsys):
    code, stdout, _ = _run(capsys, "evaluate", str(ckpt), str(other_ckpt), "--data-dir", str(demo_tiles))
    assert code == 0 and "the mean of 2 checkpoints on 6 tiles" in stdout
    code, stdout, _ = _run(capsys, "evaluate", str(ckpt), str(other_ckpt), "--data-dir", str(demo_tiles), "--json")
    result = json.loads(stdout)
    assert result["checkpoints"] == [str(ckpt), str(other_ckpt)] and "checkpoint" not in result
    mean = evaluate_checkpoint([ckpt, other_ckpt], list_tiles(demo_tiles))
    assert result["overall"] == pytest.approx(mean["overall"])
    assert mean["overall"]["mae"] != pytest.approx(evaluate_checkpoint(ckpt, list_tiles(demo_tiles))["overall"]["mae"])


def test_the_same_checkpoint_twice_is_one_line_and_writes_nothing(ckpt, demo_tiles, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = _run(capsys, "predict", str(ckpt), str(ckpt), "--data-dir", str(demo_tiles), "--output-dir", str(out))
    assert code == 2
    _one_error_line(err, ckpt.name, "the same file as")
    assert not out.exists()


def test_a_bad_second_checkpoint_is_refused_by_name_before_any_output(ckpt, demo_tiles, tmp_path, capsys):
    bad, out = tmp_path / "bad.pt", tmp_path / "out"
    save_checkpoint({"step": 1}, bad)
    code, _, err = _run(capsys, "predict", str(ckpt), str(bad), "--data-dir", str(demo_tiles), "--output-dir", str(out))
    assert code == 2
    _one_error_line(err, "bad.pt", "not a Stage-1 checkpoint")
    assert not out.exists()


def test_one_file_under_two_names_is_refused_like_the_same_name_twice(ckpt, demo_tiles, tmp_path, capsys):
    """best.pt is a hard link to a step checkpoint: averaging the two would count one model twice."""
    import os

    linked = tmp_path / "best.pt"
    os.link(ckpt, linked)
    code, _, err = _run(capsys, "evaluate", str(ckpt), str(linked), "--data-dir", str(demo_tiles))
    assert code == 2
    _one_error_line(err, "best.pt", "the same file as", ckpt.name)


def test_a_latest_pointer_is_read_as_the_checkpoint_it_names(ckpt, demo_tiles, tmp_path, capsys):
    """``checkpoints/latest`` is a one-line text file; evaluating it used to fail as 'not a PyTorch checkpoint'."""
    import os

    from axs_lib.checkpoint import write_latest

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    os.link(ckpt, folder / ckpt.name)
    write_latest(folder, ckpt.name)
    code, stdout, _ = _run(capsys, "evaluate", str(folder / "latest"), "--data-dir", str(demo_tiles), "--json")
    assert code == 0
    assert json.loads(stdout)["overall"] == pytest.approx(evaluate_checkpoint(ckpt, list_tiles(demo_tiles))["overall"])
    code, _, err = _run(capsys, "evaluate", str(folder / "latest"), str(folder / ckpt.name), "--data-dir", str(demo_tiles))
    assert code == 2
    _one_error_line(err, ckpt.name, "the same file as", "latest")


def test_a_latest_pointer_to_a_missing_file_is_one_line_naming_the_pointer(demo_tiles, tmp_path, capsys):
    from axs_lib.checkpoint import write_latest

    write_latest(tmp_path, "checkpoint_step_99.pt")
    out = tmp_path / "out"
    code, _, err = _run(capsys, "predict", str(tmp_path / "latest"), "--data-dir", str(demo_tiles), "--output-dir", str(out))
    assert code == 2
    _one_error_line(err, str(tmp_path / "latest"), "checkpoint_step_99.pt", "does not exist")
    assert not out.exists()


def test_a_members_checkpoint_predicts_the_mean_of_its_members(demo_tiles, tmp_path, capsys):
    from axs_lib.stage1.model import UNetMembers
    from axs_lib.stage1.predict import predict_array

    out = tmp_path / "run"
    code, _, _ = _run(capsys, "train", "stage1", "--data-dir", str(demo_tiles), "--output-dir", str(out), "--seed", "3",
                      "--steps", "2", "--width", "4", "--members", "2", "--no-plots", "--quiet")
    assert code == 0
    model, config = load_model(out / "checkpoints" / "latest")
    assert isinstance(model, UNetMembers) and config["members"] == 2
    tile = list_tiles(demo_tiles)[0]
    first, second = (predict_array(member, tile) for member in model.members)
    assert not np.array_equal(first, second)
    assert np.allclose(predict_array(model, tile), (first + second) / 2, atol=1e-3, equal_nan=True)  # reflectance x 10000


def test_a_checkpoint_whose_config_names_impossible_members_is_refused_by_name(ckpt, tmp_path):
    from axs_lib.errors import CheckpointError

    bad = tmp_path / "bad.pt"
    state = load_checkpoint(ckpt)
    state["config"] = {**state["config"], "members": 10**6}
    save_checkpoint(state, bad)
    with pytest.raises(CheckpointError, match="members 1000000"):
        load_model(bad)


@pytest.mark.parametrize("kind", ["symlink", "copy"])
def test_a_checkpoint_named_latest_is_read_as_itself_not_as_a_pointer(ckpt, demo_tiles, tmp_path, kind):
    """A link called ``latest`` to the newest checkpoint, or a checkpoint copied to that name, is a
    checkpoint: only a small text file is followed as a pointer."""
    named = tmp_path / "latest"
    if kind == "symlink":
        named.symlink_to(ckpt)
    else:
        shutil.copyfile(ckpt, named)
    assert evaluate_checkpoint(named, list_tiles(demo_tiles))["overall"] == pytest.approx(
        evaluate_checkpoint(ckpt, list_tiles(demo_tiles))["overall"])


def test_a_config_asking_for_a_huge_model_is_refused_before_it_is_built(ckpt, tmp_path, monkeypatch):
    """16 members of width 256 would be 2 G parameters (8 GiB): the shapes are compared on the meta
    device first, so the refusal allocates nothing."""
    import axs_lib.stage1.model as model_module
    from axs_lib.errors import CheckpointError

    build = model_module.build_unet

    def shapes_only(*args, **kwargs):
        assert torch.get_default_device().type == "meta", "a model was built in memory"
        return build(*args, **kwargs)
    monkeypatch.setattr(model_module, "build_unet", shapes_only)
    bad = tmp_path / "huge.pt"
    state = load_checkpoint(ckpt)
    state["config"] = {**state["config"], "members": 16, "width": 256}
    save_checkpoint(state, bad)
    with pytest.raises(CheckpointError, match="do not fit 16 U-Nets of width 256"):
        load_model(bad)
