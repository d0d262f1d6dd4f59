"""Opening images (16-bit scaling, transparency on a stated background) and the policy for files
that cannot be read (``data.corrupt_images``), in every place that opens images: image folders,
caption tables, WebDataset shards, pictures, and CLIP training."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_CLIP_TRAINING
from dino_sparo.config import load_config
from dino_sparo.data.captions import CaptionTable, TarShardCaptions
from dino_sparo.data.datasets import ImageFolder, build_dataset
from dino_sparo.data.images import CorruptImageError, UnreadableImages, open_image, to_mode

TIMEOUT_S = 120


def sixteen_bit_ramp(path: Path) -> np.ndarray:
    """A 16-bit grey PNG covering the whole range; returns its values."""
    values = np.linspace(0, 65535, 32 * 32).round().astype(np.uint16).reshape(32, 32)
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")  # really stored as 16 bits
    return values


def test_sixteen_bit_png_is_scaled_to_eight_bits_not_clipped(tmp_path):
    values = sixteen_bit_ramp(tmp_path / "ramp.png")
    expected = np.rint(values / 257.0).astype(np.uint8)  # 65535 -> 255, 0 -> 0, linear between
    grey = np.asarray(open_image(tmp_path / "ramp.png", "L"))
    rgb = np.asarray(open_image(tmp_path / "ramp.png", "RGB"))
    assert np.array_equal(grey, expected)
    assert all(np.array_equal(rgb[..., c], expected) for c in range(3))
    assert (rgb == 255).mean() < 0.01  # PIL's own convert("RGB") makes 99.6 % of these pixels white


def test_float_image_is_taken_as_zero_to_one():
    values = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    grey = np.asarray(to_mode(Image.fromarray(values, "F"), "L"))
    assert np.array_equal(grey, np.rint(values * 255).astype(np.uint8))


def blend(colour: np.ndarray, alpha: np.ndarray, background: tuple) -> np.ndarray:
    """Straight alpha over an opaque background, in 8-bit arithmetic (the reference)."""
    a = alpha[..., None].astype(np.float64) / 255
    return colour.astype(np.float64) * a + np.asarray(background, dtype=np.float64) * (1 - a)


@pytest.mark.parametrize("background", [(255, 255, 255), (0, 0, 0), (10, 200, 30)])
def test_rgba_is_composited_on_the_background(tmp_path, background):
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255
    Image.fromarray(np.dstack([colour, alpha]), "RGBA").save(tmp_path / "a.png")
    got = np.asarray(open_image(tmp_path / "a.png", "RGB", background)).astype(np.float64)
    assert np.abs(got - blend(colour, alpha, background)).max() <= 1.0  # rounding of 8-bit compositing
    assert tuple(got[0, 0]) == background and np.array_equal(got[0, 1], colour[0, 1])


def test_grey_alpha_and_palette_transparency_are_composited(tmp_path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    alpha = np.where(np.arange(64).reshape(8, 8) % 2 == 0, 0, 255).astype(np.uint8)
    Image.fromarray(np.dstack([grey, alpha]), "LA").save(tmp_path / "la.png")
    got = np.asarray(open_image(tmp_path / "la.png", "L", (0, 0, 0)))
    assert np.array_equal(got, np.where(alpha == 0, 0, grey))

    palette = Image.new("P", (4, 4))
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black, index 1 red
    palette.putdata([0, 1] * 8)
    palette.save(tmp_path / "p.png", transparency=0)  # black marked transparent
    got = np.asarray(open_image(tmp_path / "p.png", "RGB", (0, 0, 255)))
    assert tuple(got[0, 0]) == (0, 0, 255) and tuple(got[0, 1]) == (255, 0, 0)


def test_every_dataset_opens_images_the_one_way(tmp_path):
    """Image folders (training and evaluation) and caption tables see the scaled 16-bit values and
    the composited transparency on ``data.alpha_background``."""
    (tmp_path / "folder" / "a").mkdir(parents=True)
    values = sixteen_bit_ramp(tmp_path / "folder" / "a" / "ramp.png")
    Image.fromarray(np.zeros((4, 4, 4), dtype=np.uint8), "RGBA").save(tmp_path / "folder" / "a" / "clear.png")
    (tmp_path / "pairs.csv").write_text("path,caption\nfolder/a/ramp.png,a ramp\nfolder/a/clear.png,nothing\n")
    expected = np.rint(values / 257.0).astype(np.uint8)

    cfg = load_config(None, ["data.dataset=imagefolder", f"data.path={tmp_path / 'folder'}",
                             "data.alpha_background=[0,128,255]"], validate=False)
    folder = build_dataset(cfg.data, "train")
    table = CaptionTable(tmp_path / "pairs.csv", background=(0, 128, 255))
    for images in ([folder[1][0], folder[0][0]], [table[0][0], table[1][0]]):
        ramp, clear = (np.asarray(image) for image in images)
        assert np.array_equal(ramp[..., 0], expected) and np.all(clear == (0, 128, 255))


def test_pictures_open_images_the_one_way(tmp_path):
    from dino_sparo.visualize import load_images

    values = sixteen_bit_ramp(tmp_path / "ramp.png")
    _, display = load_images([str(tmp_path / "ramp.png")], 32, (0.5,), (0.5,), grayscale=True)
    assert np.abs(display[0] * 255 - values / 257.0).max() <= 0.5 + 1e-4


# --------------------------------------------------------------------------- unreadable files


def test_skip_policy_serves_the_next_readable_item_and_counts_replacements():
    bad = {2, 3}

    def load(i):
        if i in bad:
            raise CorruptImageError(f"corrupt or unreadable image {i}.png")
        return i

    policy = UnreadableImages("skip", "five files")
    assert [policy.load(load, i, 5) for i in range(5)] == [0, 1, 4, 4, 4]
    assert policy.skipped == 2 and policy.bad == bad
    with pytest.raises(CorruptImageError, match="3.png"):
        UnreadableImages("error", "five files").load(load, 3, 5)
    with pytest.raises(CorruptImageError, match="every one of 2 files"):
        UnreadableImages("skip", "two files").load(lambda i: load(i + 2), 0, 2)


def caption_table_with_bad_rows(root: Path, rows: int = 65) -> tuple[Path, str, str]:
    """``rows`` images listed in a table, one of them missing (line 3) and one truncated; returns
    the table and the two bad files."""
    rng = np.random.default_rng(0)
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    for i in range(rows):
        Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(root / "imgs" / f"{i:03d}.png")
    missing, truncated = root / "imgs" / "001.png", root / "imgs" / f"{min(40, rows - 2):03d}.png"
    missing.unlink()
    truncated.write_bytes(truncated.read_bytes()[:100])
    table = root / "pairs.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "caption"])
        writer.writerows([[f"imgs/{i:03d}.png", f"a picture number {i}"] for i in range(rows)])
    return table, str(missing), str(truncated)


def test_caption_table_skip_leaves_out_missing_rows_and_replaces_undecodable_ones(tmp_path, caplog):
    table, missing, truncated = caption_table_with_bad_rows(tmp_path, rows=8)
    data = CaptionTable(table, corrupt_images="skip")
    assert len(data) == 7 and missing not in data.paths  # line 3 left out when read, with a warning
    assert any("1 of 8 rows list a missing image" in r.message and missing in r.message for r in caplog.records)
    bad = data.paths.index(truncated)
    image, caption = data[bad]
    assert caption == data.captions[bad + 1] and data.unreadable.skipped == 1
    strict = CaptionTable(_drop_line(table, 3), corrupt_images="error")
    with pytest.raises(CorruptImageError, match=rf"without_missing\.csv, line {bad + 2}: corrupt or unreadable "
                                                rf"image {truncated}"):
        strict[bad]


def _drop_line(table: Path, line: int) -> Path:
    """The table without one line, beside it (so its relative paths still resolve)."""
    lines = table.read_text().splitlines()
    out = table.with_name("without_missing.csv")
    out.write_text("\n".join(lines[: line - 1] + lines[line:]) + "\n")
    return out


def test_shard_skip_replaces_an_undecodable_image(tmp_path):
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "shard-00000.tar")) as sink:
        for i in range(4):
            image = Image.fromarray(np.full((6, 6, 3), 10 * i, dtype=np.uint8))
            sample = {"__key__": f"{i:04d}", "png": image, "txt": f"caption {i}"}
            if i == 1:
                sample = {"__key__": f"{i:04d}", "png": b"not a png at all", "txt": f"caption {i}"}
            sink.write(sample)
    spec = str(tmp_path / "shard-00000.tar")
    with pytest.raises(CorruptImageError, match=r"shard .*shard-00000\.tar, sample 1: corrupt or unreadable image"):
        TarShardCaptions(spec)[1]
    data = TarShardCaptions(spec, corrupt_images="skip")
    image, caption = data[1]
    assert caption == "caption 2" and image.getpixel((0, 0)) == (20, 20, 20) and data.unreadable.skipped == 1


def clip_on_table(table: Path, out: Path, policy: str, workers: int) -> list[str]:
    return [*TINY_CLIP_TRAINING, "clip.dataset=table", f"clip.train_data={table}", "data.limit=null",
            f"data.corrupt_images={policy}", "data.batch_size_per_gpu=16", f"data.num_workers={workers}",
            "optim.epochs=2", f"output_dir={out}"]


def test_clip_training_skips_unreadable_images_and_reports_them_each_epoch(tmp_path):
    from dino_sparo.train import train

    table, missing, truncated = caption_table_with_bad_rows(tmp_path)  # 64 readable rows: 4 full batches
    out = tmp_path / "run"
    train(load_config(None, clip_on_table(table, out, "skip", workers=2)))
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    reports = [r for r in rows if "skipped_images" in r]
    assert [(r["epoch"], r["step"], r["skipped_images"]) for r in reports] == [(0, 4, 1), (1, 8, 1)]
    log = (out / "train.log").read_text()
    assert missing in log and truncated in log and "epoch 1: 1 sample(s) had an unreadable image" in log


def test_clip_training_stops_on_an_unreadable_image_with_one_line_naming_table_line_and_file(tmp_path):
    table, _, truncated = caption_table_with_bad_rows(tmp_path)
    table = _drop_line(table, 3)  # the missing file's row: its error comes before training, tested above
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "dino_sparo.cli.train",
                           *clip_on_table(table, tmp_path / "run", "error", workers=1)],
                          env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("dino-sparo-train: error: ")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"caption table {table}, line 41: corrupt or unreadable image {truncated}" in errors[0]  # 040.png


def test_image_folder_skip_counts_replacements(tmp_path):
    for i in range(3):
        (tmp_path / "a").mkdir(exist_ok=True)
        Image.fromarray(np.full((4, 4, 3), 50 * i, dtype=np.uint8)).save(tmp_path / "a" / f"{i}.png")
    (tmp_path / "a" / "1.png").write_bytes(b"\x89PNG broken")
    folder = ImageFolder(tmp_path, corrupt_images="skip")
    assert [folder[i][0].getpixel((0, 0))[0] for i in range(3)] == [0, 100, 100]
    assert folder.unreadable.skipped == 1
