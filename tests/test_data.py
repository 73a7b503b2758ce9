"""Tests of data.py: Grand Central protocol, frame folders, sprite ground truth, errors, bench data."""
import colorsys
import dataclasses
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from common import small_config
from data import (SPMOT_COLORS, DataError, FrameFolder, GrandCentral, MovingSprites, SpriteSpec, bench_batches,
                  build_dataset, data_notices, load_rgb, make_loader, make_scene, make_sprites, write_to_disk)

CORNERS_720 = [(120, 0), (360, 0), (0, 240), (240, 240), (480, 240), (0, 120), (240, 120), (480, 120)]


# ---- helpers ------------------------------------------------------------------------------------

def gradient_frame(width, height, value):
    """RGB frame: R = value (identifies the frame), G and B = horizontal and vertical gradients."""
    xs = np.arange(width) * 255 // max(width - 1, 1)
    ys = np.arange(height) * 255 // max(height - 1, 1)
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = value
    pixels[..., 1] = xs[None, :]
    pixels[..., 2] = ys[:, None]
    return Image.fromarray(pixels)


def write_frames(folder, names, width=30, height=20):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        gradient_frame(width, height, (i * 7) % 256).save(folder / name, compress_level=1)
    return folder


def expected_frame(path, box, img_h, img_w):
    """(3, img_h, img_w) float32: the frame cropped by PIL directly and resized bilinearly."""
    image = Image.open(path).convert("RGB")
    if box is not None:
        image = image.crop(box)
    image = image.resize((img_w, img_h), resample=Image.BILINEAR)
    return torch.from_numpy((np.asarray(image) / 255.0).astype(np.float32)).permute(2, 0, 1)


def expected_sequence(paths, box, img_h, img_w):
    return torch.stack([expected_frame(p, box, img_h, img_w) for p in paths])


@pytest.fixture(scope="module")
def gc_folder(tmp_path_factory):
    """120 numbered 720x480 PNG frames, the frame number in the red channel."""
    folder = tmp_path_factory.mktemp("grand_central")
    for number in range(120):
        gradient_frame(720, 480, 2 * number).save(folder / f"{number}.png", compress_level=1)
    return folder


# ---- Grand Central ---------------------------------------------------------------------------------

def test_grand_central_train_items_match_reference_crops(gc_folder):
    dataset = GrandCentral(gc_folder)
    assert [int(p.stem) for p in dataset.paths] == list(range(108))  # numeric sort, last 12 held out
    assert dataset.num_starts == 108 - 79 == 29
    assert len(dataset) == 29 * 8 == 232
    for index, crop, start in [(0, 0, 0), (2, 0, 2), (29 + 5, 1, 5), (3 * 29 + 17, 3, 17), (231, 7, 28)]:
        item = dataset[index]
        assert item.shape == (10, 3, 128, 128) and item.dtype == torch.float32
        x, y = CORNERS_720[crop]
        paths = [gc_folder / f"{start + 8 * t}.png" for t in range(10)]
        assert torch.equal(item, expected_sequence(paths, (x, y, x + 240, y + 240), 128, 128))
    # '10.png' follows '9.png': frame 1 of the sequence starting at 2 is frame 10 (red = 20)
    assert dataset[2][1, 0, 0, 0].item() == pytest.approx(20 / 255)
    assert 0.0 <= dataset[0].min().item() and dataset[0].max().item() <= 1.0


def test_grand_central_test_split_uses_last_tenth_in_non_overlapping_segments(gc_folder):
    dataset = GrandCentral(gc_folder, img_h=16, img_w=16, seq_len=2, frame_skip=2, train=False)
    assert [int(p.stem) for p in dataset.paths] == list(range(108, 120))
    assert dataset.num_starts == 12 - (2 * 2 - 1) == 9
    assert dataset.num_data == 9 // 2 == 4 and len(dataset) == 32
    expected_frames = [(108, 110), (109, 111), (112, 114), (113, 115)]
    for crop in (0, 2, 7):
        for j, numbers in enumerate(expected_frames):
            x, y = CORNERS_720[crop]
            paths = [gc_folder / f"{n}.png" for n in numbers]
            item = dataset[crop * 4 + j]
            assert torch.equal(item, expected_sequence(paths, (x, y, x + 240, y + 240), 16, 16))
    used = [n for numbers in expected_frames for n in numbers]
    assert len(used) == len(set(used))  # no frame in two test sequences of one crop
    with pytest.raises(DataError, match=r"12 in the test split, but one test sequence needs 89"):
        GrandCentral(gc_folder, train=False)


def test_grand_central_general_crop_corners_and_crop_fit(tmp_path):
    folder = write_frames(tmp_path / "small", [f"{n}.png" for n in range(12)])  # 30x20 frames
    dataset = GrandCentral(folder, img_h=4, img_w=6, seq_len=2, frame_skip=1, crop_size=10)
    # r = 10: corners (5,0), (15,0), (0,10), (10,10), (20,10), (0,5), (10,5), (20,5)
    corners = [box[:2] for box in dataset.boxes]
    assert corners == [(5, 0), (15, 0), (0, 10), (10, 10), (20, 10), (0, 5), (10, 5), (20, 5)]
    assert len(dataset) == (11 - 1) * 8
    item = dataset[4 * 10 + 3]  # crop 4, start 3
    assert item.shape == (2, 3, 4, 6)
    assert torch.equal(item, expected_sequence([folder / "3.png", folder / "4.png"], (20, 10, 30, 20), 4, 6))
    with pytest.raises(DataError, match=r"crop 12x12 at \(0,10\) does not fit the 30x20 frames"):
        GrandCentral(folder, seq_len=2, frame_skip=1, crop_size=12)
    with pytest.raises(DataError, match=r"train with --train-station-cropping-origin 10 or less"):   # the fix that fits
        GrandCentral(folder, seq_len=2, frame_skip=1, crop_size=12)
    from data import largest_grand_central_crop
    assert (largest_grand_central_crop(720, 480), largest_grand_central_crop(64, 64)) == (240, 0)   # 0: no crop fits
    with pytest.raises(DataError, match=r"holds 12 frames, 11 in the train split, but one train sequence needs 80"):
        GrandCentral(folder, crop_size=10)


def test_grand_central_needs_numbered_frames(tmp_path):
    folder = write_frames(tmp_path / "named", ["1.png", "2.png", "frame3.png"])
    with pytest.raises(DataError, match=r"frame3.png' is not named by a number.*pass --dataset frames"):
        GrandCentral(folder)


def test_preset_too_small_for_the_frames_names_the_size():
    with pytest.raises(DataError, match=r"preset 'many' at 16x16 would draw sprites of 0.75 px.*use larger frames"):
        make_sprites("many", img_h=16, img_w=16)


def test_grand_central_refuses_non_square_frames(gc_folder):
    """Its crops are square: 64x128 frames would stretch them, so that is a one-line error."""
    cfg = small_config(img_h=64, img_w=128, num_cell_h=4, num_cell_w=8)
    with pytest.raises(DataError, match=r"crops are square but the frames are 64x128.*--dataset frames"):
        build_dataset("grandcentral", cfg, train=True, data_dir=gc_folder)


# ---- FrameFolder -------------------------------------------------------------------------------------

@pytest.fixture
def video_root(tmp_path):
    """Two videos, 'b2' (3 frames) and 'b10' (5 frames), with names that need a natural sort."""
    root = tmp_path / "videos"
    write_frames(root / "b10", ["f1.png", "f2.png", "f3.png", "f10.png", "f20.png"], width=40, height=30)
    write_frames(root / "b2", ["f1.png", "f2.png", "f10.png"], width=40, height=30)
    return root


def test_frame_folder_natural_sort_videos_and_crop(video_root):
    dataset = FrameFolder(video_root, img_h=8, img_w=12, seq_len=2, crop=(4, 2, 24, 16))
    b2, b10 = video_root / "b2", video_root / "b10"
    assert [p.name for p in dataset.videos[0]] == ["f1.png", "f2.png", "f10.png"]
    assert [p.name for p in dataset.videos[1]] == ["f1.png", "f2.png", "f3.png", "f10.png", "f20.png"]
    expected = [(b2, "f1", "f2"), (b2, "f2", "f10"), (b10, "f1", "f2"), (b10, "f2", "f3"),
                (b10, "f3", "f10"), (b10, "f10", "f20")]
    assert len(dataset) == len(expected) == 6
    for index, (video, first, second) in enumerate(expected):
        paths = [video / f"{first}.png", video / f"{second}.png"]
        assert torch.equal(dataset[index], expected_sequence(paths, (4, 2, 28, 18), 8, 12))
    plain = FrameFolder(video_root, img_h=8, img_w=12, seq_len=2)  # no crop: resize whole frame
    assert torch.equal(plain[0], expected_sequence([b2 / "f1.png", b2 / "f2.png"], None, 8, 12))


def test_frame_folder_sequences_never_cross_videos(video_root):
    assert len(FrameFolder(video_root, 8, 8, seq_len=4)) == 0 + 2  # b2 too short, b10 has 2 starts
    skipped = FrameFolder(video_root, 8, 8, seq_len=2, frame_skip=2)  # span 3: starts 1 + 3
    assert skipped.items == [(0, 0), (1, 0), (1, 1), (1, 2)]
    test_mode = FrameFolder(video_root, 8, 8, seq_len=2, train=False)  # non-overlapping pairs
    assert test_mode.items == [(0, 0), (1, 0), (1, 2)]
    single = FrameFolder(video_root / "b10", 8, 8, seq_len=2)  # a plain folder of frames
    assert len(single) == 4
    with pytest.raises(DataError, match=r"holds at most 5 frames per video but one sequence needs 6"):
        FrameFolder(video_root, 8, 8, seq_len=6)
    with pytest.raises(DataError, match=r"crop 50x10 at \(0,0\) does not fit the 40x30 frames"):
        FrameFolder(video_root, 8, 8, seq_len=2, crop=(0, 0, 50, 10))


# ---- errors -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda root: GrandCentral(root), lambda root: FrameFolder(root, 8, 8, 2)])
def test_missing_empty_and_frameless_folders(tmp_path, make):
    with pytest.raises(DataError, match=r"data folder '.*nope' does not exist: pass --data-dir"):
        make(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"data folder '.*empty' is empty"):
        make(tmp_path / "empty")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no frames here")
    with pytest.raises(DataError, match=r"no frames \(.png/.jpg/.jpeg\) in '.*notes'"):
        make(tmp_path / "notes")


def test_truncated_frame_raises_or_is_skipped(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for n in range(12):  # noise compresses badly, so cutting the file cuts the image data
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(folder / f"{n}.png")
    data = (folder / "5.png").read_bytes()
    # corrupt inside the image data (header and end marker intact): found when the frame is decoded
    (folder / "5.png").write_bytes(data[:len(data) // 2] + bytes(64) + data[len(data) // 2 + 64:])
    dataset = GrandCentral(folder, img_h=4, img_w=4, seq_len=2, frame_skip=1, crop_size=10)
    assert dataset.num_skipped == 0 and len(dataset) == 10 * 8
    assert dataset[3].shape == (2, 3, 4, 4)  # frames 3 and 4 load
    with pytest.raises(DataError, match=re.escape(f"frame '{folder / '5.png'}' is truncated or corrupt")
                       + r".*remove or replace it"):
        dataset[4]  # crop 0, start 4: frames 4 and 5
    # truncated (cut off): found when the dataset is built, before anything runs
    (folder / "5.png").write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError, match=re.escape(f"frame '{folder / '5.png'}' is truncated (no end-of-image marker)")):
        GrandCentral(folder, img_h=4, img_w=4, seq_len=2, frame_skip=1, crop_size=10)
    skipping = GrandCentral(folder, img_h=4, img_w=4, seq_len=2, frame_skip=1, crop_size=10,
                            skip_bad_frames=True)
    assert skipping.num_skipped == 1
    assert [int(p.stem) for p in skipping.paths] == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]  # 11 frames, 1 test
    assert len(skipping) == 9 * 8
    folder_skipping = FrameFolder(folder, 4, 4, seq_len=2, skip_bad_frames=True)
    assert folder_skipping.num_skipped == 1 and len(folder_skipping) == 10
    for frame in folder.iterdir():                                 # nothing readable left: said so
        frame.write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError, match=r"every frame in .* is unreadable \(12 skipped by --skip-bad-frames\)"):
        FrameFolder(folder, 4, 4, seq_len=2, skip_bad_frames=True)


def test_unreadable_file_and_mixed_sizes(tmp_path):
    folder = write_frames(tmp_path / "frames", [f"{n}.png" for n in range(12)])
    (folder / "7.png").write_text("not an image")
    with pytest.raises(DataError, match=r"7.png' is not a readable image.*remove it or pass --skip-bad-frames"):
        GrandCentral(folder, seq_len=2, frame_skip=1, crop_size=10)
    gradient_frame(40, 20, 0).save(folder / "7.png")
    with pytest.raises(DataError, match=r"have mixed sizes: '0.png' is 30x20 but '7.png' is 40x20"):
        GrandCentral(folder, seq_len=2, frame_skip=1, crop_size=10)
    with pytest.raises(DataError, match=r"have mixed sizes: '0.png' is 30x20 but '7.png' is 40x20"):
        FrameFolder(folder, 4, 4, seq_len=2)


def test_grayscale_rgba_and_palette_frames_load_as_rgb(tmp_path):
    folder = tmp_path / "modes"
    folder.mkdir()
    base = gradient_frame(30, 20, 90)
    images = [base.convert("L"), base.convert("RGBA"), base.convert("P"), base.convert("L")]
    for n, image in enumerate(images):
        image.save(folder / f"{n}.png")
    item = FrameFolder(folder, img_h=20, img_w=30, seq_len=4)[0]
    assert item.shape == (4, 3, 20, 30)
    assert torch.equal(item[0, 0], item[0, 1]) and torch.equal(item[0, 1], item[0, 2])  # gray
    rgb = torch.from_numpy(np.asarray(base) / 255.0).float().permute(2, 0, 1)
    assert torch.equal(item[1], rgb)  # RGBA keeps its colour channels
    assert torch.equal(item[2], expected_frame(folder / "2.png", None, 20, 30))


def test_jpeg_frames_and_truncated_jpeg(tmp_path):
    folder = tmp_path / "jpegs"
    folder.mkdir()
    for n, suffix in enumerate([".jpg", ".JPEG", ".jpeg"]):
        gradient_frame(30, 20, 50 * n).save(folder / f"{n}{suffix}", quality=95)
    dataset = FrameFolder(folder, 20, 30, seq_len=3)
    assert len(dataset) == 1
    assert torch.equal(dataset[0][2], expected_frame(folder / "2.jpeg", None, 20, 30))
    noise = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "1.JPEG", quality=95)
    data = (folder / "1.JPEG").read_bytes()
    (folder / "1.JPEG").write_bytes(data[:len(data) * 3 // 4])  # cut inside the image data
    with pytest.raises(DataError, match=r"1.JPEG' is truncated \(no end-of-image marker\)"):
        FrameFolder(folder, 20, 30, seq_len=3)   # found from the file's end, before decoding


def test_too_few_frames(tmp_path):
    folder = write_frames(tmp_path / "few", ["a1.png", "a2.png", "a3.png"])
    with pytest.raises(DataError, match=r"holds at most 3 frames per video but one sequence needs 5 "
                                        r"\(--seq-len 3, --frame-skip 2\): add frames or lower --seq-len or --frame-skip"):
        FrameFolder(folder, 4, 4, seq_len=3, frame_skip=2)
    numbered = write_frames(tmp_path / "numbered", [f"{n}.png" for n in range(12)])
    with pytest.raises(DataError, match=r"one train sequence needs 16 there \(--seq-len 2, --frame-skip 8, counted as "
                                        r"the reference does\): add frames or lower --seq-len or --frame-skip"):
        GrandCentral(numbered, seq_len=2, crop_size=10)


def test_grand_central_on_a_folder_of_frame_folders_names_the_fix(tmp_path):
    for video in ("b", "a"):
        write_frames(tmp_path / "videos" / video, [f"frame_{n:03d}.png" for n in range(3)])
    (tmp_path / "videos" / "notes").mkdir()              # a folder without frames is not named
    with pytest.raises(DataError, match=re.escape(
            f"no frames in '{tmp_path / 'videos'}' itself, but its subfolders hold frames ('a', ...): Grand Central "
            f"reads one folder of numbered frames; pass --dataset frames to read each subfolder as a video, "
            f"or --data-dir one of them")):
        GrandCentral(tmp_path / "videos")
    assert len(FrameFolder(tmp_path / "videos", 4, 4, seq_len=2)) == 4    # what the fix reads


# ---- MovingSprites --------------------------------------------------------------------------------------

def check_tight_boxes(truth, k):
    """Object k's id and box in every frame: the tight box of its mask and id k + 1, or -1 and a zero
    box where it does not show."""
    for t in range(truth["masks"].shape[0]):
        rows, cols = np.nonzero(truth["masks"][t, k])
        if len(rows) == 0:
            assert truth["ids"][t, k] == -1 and not truth["boxes"][t, k].any()
            continue
        box = [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]
        assert truth["ids"][t, k] == k + 1 and truth["boxes"][t, k].tolist() == box


def check_ground_truth(dataset, index):
    """Masks are exactly where each colour shows; boxes are tight; counts and ids agree."""
    frames = dataset[index].permute(0, 2, 3, 1).numpy()  # (T, H, W, 3)
    truth = dataset.ground_truth(index)
    num = truth["colors"].shape[0]
    spec = dataset.spec
    assert frames.shape == (spec.seq_len, spec.img_h, spec.img_w, 3) and frames.dtype == np.float32
    assert truth["ids"].shape == (spec.seq_len, num) and truth["ids"].dtype == np.int64
    assert truth["boxes"].shape == (spec.seq_len, num, 4) and truth["boxes"].dtype == np.float32
    assert truth["masks"].shape == (spec.seq_len, num, spec.img_h, spec.img_w)
    for k in range(num):
        shows_k = (frames == truth["colors"][k]).all(axis=-1)  # (T, H, W)
        assert np.array_equal(shows_k, truth["masks"][:, k])
        assert set(np.unique(truth["ids"][:, k])) <= {-1, k + 1}
        check_tight_boxes(truth, k)
    assert np.array_equal(truth["counts"], (truth["ids"] > 0).sum(axis=1))
    assert not (truth["masks"].sum(axis=1) > 1).any()  # a pixel shows at most one object
    return truth


@pytest.mark.parametrize("preset", ["easy", "few", "many", "dynamic_bg", "crowded", "stream"])
def test_sprite_masks_boxes_counts_are_exact(preset):
    dataset = make_sprites(preset, seq_len=6, num_sequences=3, seed=1)
    for index in range(3):
        truth = check_ground_truth(dataset, index)
        assert truth["counts"].max() >= 1


def test_sprites_are_deterministic_from_seed_and_index():
    dataset = make_sprites("few", num_sequences=4, seed=3)
    again = MovingSprites(SpriteSpec(**dataclasses.asdict(dataset.spec)))
    assert torch.equal(dataset[1], again[1])
    truth, truth_again = dataset.ground_truth(1), again.ground_truth(1)
    assert all(np.array_equal(truth[key], truth_again[key]) for key in truth)
    assert not torch.equal(dataset[1], dataset[2])
    assert not torch.equal(dataset[1], make_sprites("few", num_sequences=4, seed=4)[1])


@pytest.mark.parametrize("background", ["black", "static", "moving"])
def test_sprite_backgrounds(background):
    dataset = make_sprites("few", seq_len=3, num_sequences=1, background=background)
    frames = dataset[0]  # (T, 3, H, W)
    free = ~dataset.ground_truth(0)["masks"].any(axis=1)  # (T, H, W) background pixels
    both = torch.from_numpy(free[0] & free[1])
    first, second = frames[0][:, both], frames[1][:, both]  # (3, pixels)
    if background == "black":
        assert first.abs().max() == 0 and second.abs().max() == 0
        return
    assert first.min() >= 0.1 - 1e-6 and first.max() <= 0.4 + 1e-6  # dim, unlike the objects
    if background == "static":
        assert torch.equal(first, second)
    else:
        assert (first != second).any(dim=0).float().mean() > 0.9  # the texture drifts


def test_sprite_occlusion_follows_depth():
    dataset = make_sprites("many", img_h=64, img_w=64, seq_len=3, num_sequences=1, seed=2)
    truth = dataset.ground_truth(0)
    amodal = dataset.amodal_masks(0)  # (T, N, H, W)
    order = np.argsort(truth["depths"])  # near to far
    covered = np.zeros_like(amodal[:, 0])
    for k in order:
        assert np.array_equal(truth["masks"][:, k], amodal[:, k] & ~covered)
        covered |= amodal[:, k]
    assert amodal.sum() > truth["masks"].sum()  # some pixels are occluded


def test_hundred_objects_and_enter_leave():
    crowd = make_sprites("easy", img_h=128, img_w=128, seq_len=4, num_sequences=1,
                         min_objects=100, max_objects=100, min_size=4, max_size=6)
    truth = check_ground_truth(crowd, 0)
    assert truth["ids"].shape == (4, 100)
    assert len(set(truth["ids"][truth["ids"] > 0].tolist())) >= 95
    single = SpriteSpec(img_h=32, img_w=32, seq_len=10, num_sequences=10, min_objects=1, max_objects=1,
                        min_size=4, max_size=6, min_speed=4, max_speed=6, enter_leave=True)
    counts = np.stack([MovingSprites(single).ground_truth(i)["counts"] for i in range(10)])  # (10, T)
    assert (counts.max(axis=1) == 1).all()  # each object is inside in some frame
    assert (counts == 0).any()  # and outside in another
    many = make_sprites("many", seq_len=10, num_sequences=1).ground_truth(0)
    assert many["counts"].min() < many["ids"].shape[1]


@pytest.mark.parametrize("motion", ["constant", "bounce"])
def test_sprites_without_entering_stay_inside(motion):
    spec = SpriteSpec(img_h=32, img_w=32, seq_len=10, num_sequences=8, min_objects=1, max_objects=1,
                      shapes=("square",), min_size=6, max_size=6, min_speed=3, max_speed=5, motion=motion)
    for index in range(8):
        truth = MovingSprites(spec).ground_truth(index)
        assert (truth["counts"] == 1).all()
        assert (truth["masks"].sum(axis=(2, 3)) >= 25).all()  # never clipped by an edge


def test_long_constant_sprites_whose_speed_is_capped():
    """Capping the speed so the path fits can leave the start range's ends crossed by rounding
    (high - low ~ -1e-15); that scene used to raise 'high - low < 0'."""
    data = make_sprites("easy", img_h=64, img_w=64, seq_len=40, num_sequences=4, seed=10_666)
    frames = data[3]
    assert frames.shape == (40, 3, 64, 64)
    assert data.ground_truth(3)["counts"].min() >= 1


def test_sprites_wrap_across_edges():
    spec = SpriteSpec(img_h=24, img_w=24, seq_len=10, num_sequences=8, min_objects=1, max_objects=1,
                      shapes=("square",), min_size=6, max_size=6, min_speed=3, max_speed=5, motion="wrap")
    crossing = 0
    for index in range(8):
        truth = check_ground_truth(MovingSprites(spec), index)
        assert (truth["counts"] == 1).all()
        masks = truth["masks"][:, 0]
        assert (masks.sum(axis=(1, 2)) >= 25).all()
        crossing += int((masks[:, :, 0] & masks[:, :, -1]).any() or (masks[:, 0] & masks[:, -1]).any())
    assert crossing > 0


def test_write_to_disk_reads_back_with_frame_folder(tmp_path):
    dataset = make_sprites("few", img_h=32, img_w=32, seq_len=4, num_sequences=3)
    out = write_to_disk(dataset, tmp_path / "sprites", 2)
    assert sorted(p.name for p in out.iterdir()) == ["000000", "000001"]
    assert (out / "000001" / "0003.png").exists()
    folder = FrameFolder(out, 32, 32, seq_len=4)
    assert len(folder) == 2
    for index in range(2):
        assert (folder[index] - dataset[index]).abs().max().item() <= 0.5 / 255 + 1e-6


def test_sprite_spec_errors():
    with pytest.raises(DataError, match=r"unknown sprite preset 'nope'"):
        make_sprites("nope")
    with pytest.raises(DataError, match=r"motion 'zigzag' must be one of"):
        make_sprites("easy", motion="zigzag")
    with pytest.raises(DataError, match=r"enter_leave needs motion 'constant'"):
        SpriteSpec(motion="bounce", enter_leave=True)
    with pytest.raises(DataError, match=r"unknown sprite options \['colour'\]"):
        make_sprites("easy", colour="red")
    scaled = make_sprites("easy", img_h=128, img_w=128).spec
    assert (scaled.min_size, scaled.max_size) == (16, 28)


# ---- bench_batches and make_loader -------------------------------------------------------------------

def test_bench_batches_shapes_range_determinism():
    batches = bench_batches(num_batches=2, batch_size=3, seq_len=4, img_h=32, img_w=40, num_objects=5)
    assert len(batches) == 2
    assert all(b.shape == (3, 4, 3, 32, 40) and b.dtype == torch.float32 for b in batches)
    assert all(b.min() >= 0 and b.max() <= 1 for b in batches)
    again = bench_batches(num_batches=2, batch_size=3, seq_len=4, img_h=32, img_w=40, num_objects=5)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    assert not torch.equal(batches[0], batches[1])
    other = bench_batches(num_batches=1, batch_size=3, seq_len=4, img_h=32, img_w=40, num_objects=5, seed=1)
    assert not torch.equal(batches[0], other[0])
    background = bench_batches(num_batches=1, batch_size=3, seq_len=3, img_h=32, img_w=32, num_objects=0)[0]
    assert background.max() < 0.5 and torch.equal(background[:, 0], background[:, 2])  # static, scaled 0.5
    squares = bench_batches(num_batches=1, batch_size=2, seq_len=2, num_objects=20)[0]
    bright = (squares.amax(dim=2) >= 0.5).sum(dim=(2, 3))  # (B, T) pixels of squares
    assert (bright > 8 * 8).all() and (bright <= 20 * 14 * 14).all()


def test_bench_square_moves_with_wrap():
    frames = bench_batches(num_batches=1, batch_size=8, seq_len=6, img_h=32, img_w=32, num_objects=1,
                           background_scale=0.0)[0]  # (8, 6, 3, 32, 32)
    crossing = 0
    for sequence in frames:
        square = sequence.amax(dim=1) > 0  # (T, H, W)
        side = int(square[0].sum().item() ** 0.5)
        assert side in (8, 10, 12, 14) and (square.sum(dim=(1, 2)) == side * side).all()
        colour = sequence[0][:, square[0]]  # (3, pixels): one colour in [0.5, 1]
        assert (colour == colour[:, :1]).all() and colour.min() >= 0.5
        for t in range(5):
            shifts = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)
                      if torch.equal(torch.roll(sequence[t], (dy, dx), dims=(1, 2)), sequence[t + 1])]
            assert len(shifts) == 1
        crossing += int((square[:, :, 0] & square[:, :, -1]).any() or (square[:, 0] & square[:, -1]).any())
    assert crossing > 0


def test_make_loader_order_is_reproducible():
    dataset = torch.utils.data.TensorDataset(torch.arange(10))
    first = [b[0].tolist() for b in make_loader(dataset, 3, shuffle=True, seed=5)]
    second = [b[0].tolist() for b in make_loader(dataset, 3, shuffle=True, seed=5)]
    third = [b[0].tolist() for b in make_loader(dataset, 3, shuffle=True, seed=6)]
    assert first == second and first != third
    assert len(first) == 3 and all(len(b) == 3 for b in first)
    assert [b[0].tolist() for b in make_loader(dataset, 4, shuffle=False, drop_last=False)][-1] == [8, 9]
    sprites = make_sprites("easy", img_h=16, img_w=16, seq_len=2, num_sequences=8, min_size=3, max_size=5)
    in_process = [b for b in make_loader(sprites, 2, shuffle=True, seed=1)]
    in_workers = [b for b in make_loader(sprites, 2, shuffle=True, seed=1, workers=2)]
    assert len(in_process) == 4 and all(torch.equal(a, b) for a, b in zip(in_process, in_workers))
    with pytest.raises(DataError, match=r"gives 10 sequences, fewer than one batch of 20"):
        make_loader(dataset, 20, shuffle=True)


def test_16_bit_grey_frames_are_scaled_not_clipped(tmp_path):
    """PNG's 16-bit grey: 65535 is white, 32896 mid-grey (Pillow's convert("RGB") would clip every
    value above 255 to white)."""
    grey = np.full((8, 8), 32896, dtype=np.uint16)
    grey[0, 0], grey[0, 1] = 65535, 0
    Image.fromarray(grey).save(tmp_path / "g.png")
    pixels = np.asarray(load_rgb(tmp_path / "g.png"))
    assert pixels.shape == (8, 8, 3) and (pixels[1, 1] == 128).all()
    assert (pixels[0, 0] == 255).all() and (pixels[0, 1] == 0).all()


def test_videos_shorter_than_a_sequence_are_left_out_with_a_notice(video_root):
    """seq_len 4: 'b2' (3 frames) gives no sequence; the notice names it, 'b10' gives two starts."""
    dataset = FrameFolder(video_root, img_h=8, img_w=12, seq_len=4)
    assert dataset.short_videos == [video_root / "b2"] and len(dataset) == 2
    assert data_notices(dataset, "videos") == [
        f"notice: left out 1 videos shorter than one sequence in 'videos' (the first: '{video_root / 'b2'}')"]
    assert data_notices(FrameFolder(video_root, img_h=8, img_w=12, seq_len=2), "videos") == []


# ---- Sprites-MOT and the hard presets ------------------------------------------------------------

def test_spmot_preset_follows_the_published_generator():
    """OCRB's SpMOT (ocrb/tba/scripts/gen_sprite.py, at half its 128x128 size): 64x64, 10 frames,
    0-3 objects at a time from 3 slots, births and exits, sides 21/2 x U[0.9, 1.1] with a
    height/width ratio in [0.8, 1.2], 2.65 px a frame on straight lines, 6 colours, 4 shapes,
    a black background."""
    data = make_sprites("spmot", num_sequences=40, seed=3)
    spec = data.spec
    assert (spec.img_h, spec.img_w, spec.seq_len, spec.max_objects) == (64, 64, 10, 3)
    assert sorted(spec.shapes) == ["circle", "diamond", "square", "triangle"] and spec.background == "black"
    assert data[0].shape == (10, 3, 64, 64)
    counts, born, left, sides = [], 0, 0, []
    for index in range(40):
        truth = data.ground_truth(index)
        frames = data[index].permute(0, 2, 3, 1).numpy()
        counts.append(truth["counts"])
        assert (frames[~truth["masks"].any(axis=1)] == 0).all()             # black where no object shows
        assert all((SPMOT_COLORS == c).all(axis=1).any() for c in truth["colors"])
        scene = make_scene(spec, index)
        for k in range(len(scene.shapes)):
            shown = np.flatnonzero(scene.present[:, k])
            assert np.array_equal(shown, np.arange(shown[0], shown[-1] + 1))   # one stretch: no return
            born += shown[0] > 0
            left += shown[-1] < spec.seq_len - 1
            steps = np.linalg.norm(np.diff(scene.centers[shown, k], axis=0), axis=1)
            np.testing.assert_allclose(steps, 2.65, atol=1e-9)                # constant speed, straight
            w, h = 2 * scene.half_w[k], 2 * scene.half_h[k]
            assert 0.8 - 1e-9 <= h / w <= 1.2 + 1e-9 and 9.45 - 1e-9 <= math.sqrt(w * h) <= 11.55 + 1e-9
            sides += [w, h]
    counts = np.stack(counts)
    assert counts.max() == 3 and counts.min() >= 0 and (counts < 3).any()
    assert born > 0 and left > 0                                              # births and exits happen
    assert 9.45 / math.sqrt(1.2) - 1e-9 <= min(sides) and max(sides) <= 11.55 * math.sqrt(1.2) + 1e-9


def test_spmot_ground_truth_is_consistent_with_repeated_colours():
    data = make_sprites("spmot", num_sequences=12, seed=0)
    for index in range(12):
        truth = data.ground_truth(index)
        frames = data[index].permute(0, 2, 3, 1).numpy()
        masks = truth["masks"]                                                # (T, N, H, W)
        assert not (masks.sum(axis=1) > 1).any()
        assert np.array_equal(masks.any(axis=1), frames.any(axis=-1))        # objects: exactly the lit pixels
        for k, color in enumerate(truth["colors"]):
            assert (frames[masks[:, k]] == color).all()
            check_tight_boxes(truth, k)
        assert np.array_equal(truth["counts"], (truth["ids"] > 0).sum(axis=1))
        amodal = data.amodal_masks(index)
        assert (amodal | ~masks).all()                                        # visible part of the full shape


def test_hard_presets_crowd_occlude_and_share_hues():
    crowded = make_sprites("crowded", num_sequences=6, seed=1)
    occluded = 0
    for index in range(6):
        truth = crowded.ground_truth(index)
        assert 5 <= truth["ids"].shape[1] <= 9
        occluded += int(crowded.amodal_masks(index).sum() > truth["masks"].sum())
        hues = sorted(colorsys.rgb_to_hsv(*c)[0] for c in truth["colors"])
        gaps = np.diff(hues + [hues[0] + 1])
        assert gaps.max() >= 0.75 - 1e-6                                      # all hues within a quarter circle
    assert occluded >= 5
    stream = make_sprites("stream", num_sequences=6, seed=1)
    births = exits = 0
    for index in range(6):
        scene = make_scene(stream.spec, index)
        assert scene.present.sum(axis=1).max() <= 6
        births += int((~scene.present[0] & scene.present.any(axis=0)).sum())
        exits += int((~scene.present[-1] & scene.present.any(axis=0)).sum())
    assert births > 0 and exits > 0


@pytest.mark.parametrize("preset, total, weighted", [("spmot", 6936.0, 328096.0),
                                                     ("crowded", 43265.60695445724, 2067751.2753640208),
                                                     ("stream", 133761.8910476244, 6423372.954434393)])
def test_measured_presets_draw_the_same_videos(preset, total, weighted):
    """The README's measured figures were made on these exact videos: a change to the generator
    that alters them (not only its speed) must be a new preset."""
    dataset = make_sprites(preset, num_sequences=8, seed=0)
    frames = torch.stack([dataset[i] for i in range(4)]).double()  # (4, T, 3, H, W)
    weights = torch.arange(frames.numel(), dtype=torch.float64).reshape(frames.shape) % 97
    assert frames.sum().item() == pytest.approx(total, rel=1e-9)
    assert (frames * weights).sum().item() == pytest.approx(weighted, rel=1e-9)


def test_frames_beside_folders_of_frames_are_refused(tmp_path):
    """Loose frames would make the folder one video and leave its subfolders' videos out without a word."""
    from data import find_videos
    for folder in (tmp_path, tmp_path / "a"):
        folder.mkdir(exist_ok=True)
        for t in range(3):
            Image.new("RGB", (8, 8)).save(folder / f"{t:04d}.png")
    with pytest.raises(DataError, match=r"holds 3 frames beside folders of frames \('a'\): move the loose frames"):
        find_videos(tmp_path)
    assert [(v.name, len(f)) for v, f in find_videos(tmp_path / "a")] == [("a", 3)]
