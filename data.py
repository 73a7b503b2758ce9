"""Data for SCALOR: Grand Central frames, any folder of frames, and synthetic sprite scenes.

Every dataset item is a float32 tensor (seq_len, 3, img_h, img_w) with values in [0, 1].

- `GrandCentral`: the reference protocol (JindongJiang/SCALOR `data.py`, `TrainStation`):
  numbered frames, the last 10% are the test split, 8 fixed square crops per frame, resized
  bilinearly, frame skip 8; training starts at every frame and crop, testing uses the
  reference's non-overlapping segments.
- `FrameFolder`: any folder of frames, or a folder of folders (one video each).
- `MovingSprites`: procedural scenes made on the fly from (seed, index), with exact ground truth
  (ids, visible boxes, visible masks, counts).
- `bench_batches`: the fixed synthetic workload of the speed benchmark.
- `make_loader`: a DataLoader whose order is reproducible from a seed.
- `dataset_kind`, `build_dataset`: which dataset a run reads, and building it (train.py, evaluate.py).

Bad input raises `DataError` with a one-line message naming the file or folder and the fix.
Unlike the reference, truncated images are never accepted silently.
"""
from __future__ import annotations

import colorsys
import contextlib
import dataclasses
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg")
NUM_GC_CROPS = 8


class DataError(Exception):
    """Bad data input; the one-line message names the file or folder and the fix."""


# ---------------------------------------------------------------------------------------------
# Frame files
# ---------------------------------------------------------------------------------------------

NUMBER = re.compile(r"[0-9]+")     # ASCII digits only: str.isdigit() is also true for '²', which int() refuses


def is_number_name(stem: str) -> bool:
    """Whether a name is a plain number of ASCII digits ('1234'; not '5²' or '١٢')."""
    return NUMBER.fullmatch(stem) is not None


def natural_key(name: str) -> list:
    """Sort key that orders the numbers inside a name by value: 'f2.png' < 'f10.png'."""
    parts = re.split(r"([0-9]+)", name.lower())
    return [(0, int(p)) if is_number_name(p) else (1, p) for p in parts]


def is_frame_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in FRAME_EXTENSIONS


def check_folder(root) -> Path:
    """The data folder as a Path; DataError if it is missing, not a folder or unreadable."""
    folder = Path(os.path.expanduser(str(root)))
    if not folder.exists():
        raise DataError(f"data folder '{folder}' does not exist: pass --data-dir with a folder of frames")
    if not folder.is_dir():
        raise DataError(f"data folder '{folder}' is not a folder: pass --data-dir with a folder of frames")
    list_folder(folder)
    return folder


def list_folder(folder: Path) -> list[Path]:
    """The entries of a folder; DataError (not a traceback) if it cannot be read."""
    try:
        return list(folder.iterdir())
    except OSError as err:
        raise DataError(f"cannot read folder '{folder}' ({err.strerror or type(err).__name__}): fix its "
                        f"permissions, or move it out of the data folder") from None


def frame_files(folder: Path) -> list[Path]:
    """Frame files directly inside `folder`, in natural order of their names; DataError when two differ
    only in their extension (0001.png and 0001.jpg: each frame would be read twice)."""
    frames = sorted((p for p in list_folder(folder) if is_frame_file(p)), key=lambda p: natural_key(p.name))
    stems = {}
    for path in frames:
        other = stems.setdefault(path.stem.lower(), path)
        if other is not path:
            raise DataError(f"'{other.name}' and '{path.name}' in '{folder}' are two frames of one name: keep one "
                            f"of them (move the other out of the folder)")
    return frames


def no_frames_error(folder: Path, where: str = "") -> DataError:
    entries = list_folder(folder)
    if not entries:
        return DataError(f"data folder '{folder}' is empty: put frames (.png/.jpg/.jpeg) in it "
                         f"or pass --data-dir with a folder of frames")
    videos = [p for p in sorted(entries, key=lambda p: natural_key(p.name)) if p.is_dir() and frame_files(p)]
    if videos:   # only Grand Central reads the folder itself: FrameFolder reads these as videos
        return DataError(f"no frames in '{folder}' itself, but its subfolders hold frames ('{videos[0].name}'"
                         f"{', ...' if len(videos) > 1 else ''}): Grand Central reads one folder of numbered frames; "
                         f"pass --dataset frames to read each subfolder as a video, or --data-dir one of them")
    return DataError(f"no frames (.png/.jpg/.jpeg) in '{folder}'{where}: "
                     f"pass --data-dir with a folder of frames")


PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"   # the IEND chunk that closes every PNG
JPEG_END = b"\xff\xd9"                          # the end-of-image marker of a JPEG


def is_complete(path: Path, fmt: str) -> bool:
    """Whether a PNG/JPEG file ends with its closing marker: a cheap test for truncated files
    (a cut-off copy or download), reading only the file's last bytes."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64))
        tail = f.read().rstrip(b"\x00")     # some writers pad JPEGs with zeros
    if fmt == "PNG":
        return tail.endswith(PNG_END)
    if fmt in ("JPEG", "MPO"):
        return tail.endswith(JPEG_END)
    return True


def read_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header, after a check that the file is not truncated;
    DataError if it is not a whole image (frames are fully decoded when loaded)."""
    try:
        with no_bomb_warning(), Image.open(path) as image:
            size, fmt = image.size, image.format
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise bomb_error(path, err) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"frame '{path}' is not a readable image ({one_line(err)}): "
                        f"remove it or pass --skip-bad-frames") from err
    if not is_complete(path, fmt):
        raise DataError(f"frame '{path}' is truncated (no end-of-image marker): "
                        f"remove it or pass --skip-bad-frames")
    return size


def load_rgb(path: Path) -> Image.Image:
    """The fully decoded frame as RGB (grayscale/RGBA/palette converted); DataError if corrupt."""
    try:
        with no_bomb_warning(), Image.open(path) as image:
            image.load()  # full decode: a truncated file fails here
            if image.mode.startswith("I"):   # 16-bit grey (PNG's deepest): convert() would clip it at 255
                grey = np.clip(np.rint(np.asarray(image, dtype=np.float64) / 257), 0, 255).astype(np.uint8)
                return Image.fromarray(grey, "L").convert("RGB")
            return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise bomb_error(path, err) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"frame '{path}' is truncated or corrupt ({one_line(err)}): remove or replace it, or pass "
                        f"--skip-bad-frames (which decodes every frame first and leaves out those that fail)") from err


@contextlib.contextmanager
def no_bomb_warning():
    """A context in which Pillow's DecompressionBombWarning (an image over Image.MAX_IMAGE_PIXELS)
    is raised, like its DecompressionBombError (over twice that), rather than printed."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def bomb_error(path: Path, err: Exception) -> DataError:
    return DataError(f"frame '{path}' is too large to decode safely ({one_line(err)}): downscale it, remove it "
                     f"or pass --skip-bad-frames")


def one_line(err, limit: int | None = None) -> str:
    """The error's text on one line (runs of whitespace, newlines included, as single spaces), cut to
    `limit` characters when given."""
    text = " ".join(str(err).split())
    return text if limit is None else text[:limit]


def check_frames(paths: list[Path], skip_bad_frames: bool):
    """Sizes of the frames, cheaply from headers, or by full decode when skipping bad frames.

    Returns (good paths, their (width, height) sizes, number of frames skipped).
    """
    if not skip_bad_frames:
        return paths, [read_size(p) for p in paths], 0
    good_paths, sizes = [], []
    for path in paths:
        try:
            sizes.append(load_rgb(path).size)
            good_paths.append(path)
        except DataError:
            continue
    return good_paths, sizes, len(paths) - len(good_paths)


def check_same_size(folder: Path, paths: list[Path], sizes: list[tuple[int, int]]) -> None:
    for path, size in zip(paths, sizes):
        if size != sizes[0]:
            raise DataError(f"frames in '{folder}' have mixed sizes: '{paths[0].name}' is "
                            f"{sizes[0][0]}x{sizes[0][1]} but '{path.name}' is {size[0]}x{size[1]}: make them one size "
                            f"or move the odd frames out")


def check_box_fits(folder: Path, box: tuple[int, int, int, int], size: tuple[int, int], fix: str) -> None:
    """DataError if the crop box (left, upper, right, lower) leaves a frame of `size`."""
    left, upper, right, lower = box
    width, height = size
    if left < 0 or upper < 0 or right > width or lower > height:
        raise DataError(f"crop {right - left}x{lower - upper} at ({left},{upper}) does not fit the "
                        f"{width}x{height} frames in '{folder}': {fix}")


def load_frame(path: Path, box, img_h: int, img_w: int) -> torch.Tensor:
    """One frame, cropped to box (left, upper, right, lower) or not (None), resized: (3, img_h, img_w)."""
    return resize_frame(load_rgb(path), box, img_h, img_w)


def resize_frame(image: Image.Image, box, img_h: int, img_w: int) -> torch.Tensor:
    """An RGB image cropped to box (left, upper, right, lower) or not (None) and resized bilinearly,
    as every dataset here prepares its frames: (3, img_h, img_w) float32 in [0, 1]."""
    if box is not None:
        image = image.crop(box)
    image = image.resize((img_w, img_h), resample=Image.BILINEAR)
    pixels = (np.asarray(image) / 255.0).astype(np.float32)  # (img_h, img_w, 3)
    return torch.from_numpy(pixels).permute(2, 0, 1)


def load_sequence(paths: list[Path], box, img_h: int, img_w: int) -> torch.Tensor:
    """Frames of one sequence: (T, 3, img_h, img_w) float32 in [0, 1]."""
    return torch.stack([load_frame(p, box, img_h, img_w) for p in paths])


# ---------------------------------------------------------------------------------------------
# Grand Central
# ---------------------------------------------------------------------------------------------

def numbered_frames(folder: Path) -> list[Path]:
    """Frames named by a number ('1234.png'), sorted by that number."""
    frames = [p for p in list_folder(folder) if is_frame_file(p)]
    if not frames:
        raise no_frames_error(folder)
    for path in frames:
        if not is_number_name(path.stem):
            raise DataError(f"frame '{path}' is not named by a number: Grand Central needs frames "
                            f"like '1234.png'; pass --dataset frames for other names")
    return sorted(frames, key=lambda p: int(p.stem))


def grand_central_boxes(frame_h: int, crop_size: int) -> list[tuple[int, int, int, int]]:
    """The 8 reference crop boxes (left, upper, right, lower) for frames of height frame_h.

    With r = frame_h / 2 the top-left corners are (r//2, 0), (r//2 + r, 0), (0, r), (r, r),
    (2r, r), (0, r//2), (r, r//2), (2r, r//2); at 720x480: (120,0), (360,0), (0,240), (240,240),
    (480,240), (0,120), (240,120), (480,120). Coordinates are rounded as PIL rounds the
    reference's float boxes.
    """
    r = frame_h / 2
    corners = [(r // 2, 0), (r // 2 + r, 0), (0, r), (r, r), (2 * r, r),
               (0, r // 2), (r, r // 2), (2 * r, r // 2)]
    return [tuple(int(round(v)) for v in (x, y, x + crop_size, y + crop_size)) for x, y in corners]


def largest_grand_central_crop(width: int, height: int) -> int:
    """The largest crop side whose 8 boxes (`grand_central_boxes`) fit frames of width x height; 0: none."""
    for side in range(min(width, height), 0, -1):
        if all(0 <= left and 0 <= upper and right <= width and lower <= height
               for left, upper, right, lower in grand_central_boxes(height, side)):
            return side
    return 0


class GrandCentral(Dataset):
    """Grand Central Station frames with the reference's crops, split and indexing.

    Training: item i uses crop i // num_starts and start i % num_starts, where
    num_starts = len(split) - (seq_len * frame_skip - 1) as in the reference; frames
    start, start + frame_skip, ... Testing: num_data = num_starts // seq_len items per crop;
    item index j of a crop starts at (j // frame_skip) * seq_len * frame_skip + j % frame_skip.
    """

    def __init__(self, root, img_h=128, img_w=128, seq_len=10, train=True, frame_skip=8,
                 crop_size=240, skip_bad_frames=False):
        self.folder = check_folder(root)
        self.img_h, self.img_w = img_h, img_w
        self.seq_len, self.frame_skip, self.train = seq_len, frame_skip, train
        paths, sizes, self.num_skipped = check_frames(numbered_frames(self.folder), skip_bad_frames)
        if not paths:
            raise DataError(f"every frame in '{self.folder}' is unreadable: check the files")
        check_same_size(self.folder, paths, sizes)
        self.frame_size = sizes[0]  # (width, height)
        self.boxes = grand_central_boxes(self.frame_size[1], crop_size)
        largest = largest_grand_central_crop(*self.frame_size)
        fix = (f"train with --train-station-cropping-origin {largest} or less (the reference uses 240 for 720x480 "
               f"frames), or pass --dataset frames if these are not Grand Central frames") if largest else \
            "no crop of Grand Central's layout fits these frames: pass --dataset frames"
        for box in self.boxes:
            check_box_fits(self.folder, box, self.frame_size, fix)
        self.paths = self.split_paths(paths)
        self.num_starts = len(self.paths) - (seq_len * frame_skip - 1)
        self.num_data = self.num_starts if train else self.num_starts // seq_len
        if self.num_data < 1:
            self.raise_too_few_frames(len(paths))

    def split_paths(self, paths: list[Path]) -> list[Path]:
        """Train: all but the last len // 10 frames; test: those last frames."""
        num_test = len(paths) // 10
        return paths[:len(paths) - num_test] if self.train else paths[len(paths) - num_test:]

    def raise_too_few_frames(self, num_frames: int) -> None:
        split = "train" if self.train else "test"
        need = self.seq_len * self.frame_skip + (0 if self.train else self.seq_len - 1)
        raise DataError(f"'{self.folder}' holds {num_frames} frames, {len(self.paths)} in the {split} "
                        f"split, but one {split} sequence needs {need} there (--seq-len {self.seq_len}, "
                        f"--frame-skip {self.frame_skip}, counted as the reference does): add frames "
                        f"or lower --seq-len or --frame-skip")

    def __len__(self) -> int:
        return self.num_data * NUM_GC_CROPS

    def crop_and_start(self, index: int) -> tuple[int, int]:
        """(crop number, first frame within the split) of item `index`."""
        crop, within = divmod(index, self.num_data)
        if self.train:
            return crop, within
        segment, bias = divmod(within, self.frame_skip)
        return crop, segment * self.seq_len * self.frame_skip + bias

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} out of range for {len(self)} items")
        crop, start = self.crop_and_start(index)
        paths = self.paths[start:start + (self.seq_len - 1) * self.frame_skip + 1:self.frame_skip]
        return load_sequence(paths, self.boxes[crop], self.img_h, self.img_w)  # (T, 3, H, W)


# ---------------------------------------------------------------------------------------------
# Any folder of frames
# ---------------------------------------------------------------------------------------------

def find_videos(folder: Path) -> list[tuple[Path, list[Path]]]:
    """[(video folder, frames)]: the folder itself if it holds frames, else its subfolders; DataError
    when it holds both (the subfolders' videos would be left out without a word)."""
    frames = frame_files(folder)
    subfolders = sorted((p for p in list_folder(folder) if p.is_dir()), key=lambda p: natural_key(p.name))
    videos = [(sub, frame_files(sub)) for sub in subfolders]
    videos = [(sub, paths) for sub, paths in videos if paths]
    if frames and videos:
        raise DataError(f"'{folder}' holds {len(frames)} frames beside folders of frames ('{videos[0][0].name}'"
                        f"{', ...' if len(videos) > 1 else ''}): move the loose frames into a folder of their own "
                        f"(each folder is one video) or out")
    if frames:
        return [(folder, frames)]
    if not videos:
        raise no_frames_error(folder, " or its subfolders")
    return videos


def sequence_starts(num_frames: int, seq_len: int, frame_skip: int, train: bool) -> list[int]:
    """First frames of the sequences of one video.

    Train: every start. Test: segments of seq_len * frame_skip frames, each giving frame_skip
    interleaved sequences, so no two test sequences share a frame.
    """
    span = (seq_len - 1) * frame_skip + 1
    if train:
        return list(range(num_frames - span + 1))
    segment = seq_len * frame_skip
    return [s + bias for s in range(0, num_frames, segment) for bias in range(frame_skip)
            if s + bias + span <= num_frames]


class FrameFolder(Dataset):
    """Sequences from a folder of frames, or from a folder of folders (one video each).

    Frames are ordered by natural sort of their names; sequences never cross videos.
    crop = (x, y, w, h) in pixels is cut from every frame before the bilinear resize to
    (img_w, img_h). Frames of one video must share a size; videos may differ. Unreadable
    frames raise DataError, or are dropped with skip_bad_frames. No train/test split is made
    here: `train` only picks every start (True) or non-overlapping sequences (False); point a
    test run at its own folder.
    """

    def __init__(self, root, img_h, img_w, seq_len, frame_skip=1, crop=None, train=True,
                 skip_bad_frames=False):
        self.folder = check_folder(root)
        self.img_h, self.img_w = img_h, img_w
        self.seq_len, self.frame_skip = seq_len, frame_skip
        self.box = None if crop is None else (crop[0], crop[1], crop[0] + crop[2], crop[1] + crop[3])
        self.videos = []  # list over videos of frame paths
        self.num_skipped = 0
        self.short_videos = []  # folders of the videos too short for one sequence (left out)
        self.items = []
        for video, (video_folder, paths) in enumerate(find_videos(self.folder)):
            paths = self.check_video(video_folder, paths, skip_bad_frames)
            starts = sequence_starts(len(paths), seq_len, frame_skip, train)
            self.videos.append(paths)
            self.items += [(video, start) for start in starts]
            if not starts:
                self.short_videos.append(video_folder)
        if not self.items:
            longest = max(len(paths) for paths in self.videos)
            if longest == 0:          # skip_bad_frames left nothing
                raise DataError(f"every frame in '{self.folder}' is unreadable ({self.num_skipped} skipped by "
                                f"--skip-bad-frames): replace them with readable images")
            span = (seq_len - 1) * frame_skip + 1
            raise DataError(f"'{self.folder}' holds at most {longest} frame{'s' * (longest != 1)} per video but "
                            f"one sequence needs {span} (--seq-len {seq_len}, --frame-skip {frame_skip}): add frames "
                            f"or lower --seq-len or --frame-skip")

    def check_video(self, video_folder: Path, paths: list[Path], skip_bad_frames: bool) -> list[Path]:
        paths, sizes, num_skipped = check_frames(paths, skip_bad_frames)
        self.num_skipped += num_skipped
        if paths:
            check_same_size(video_folder, paths, sizes)
            if self.box is not None:
                check_box_fits(video_folder, self.box, sizes[0], "pass a crop inside the frames")
        return paths

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor:
        video, start = self.items[index]
        stop = start + (self.seq_len - 1) * self.frame_skip + 1
        paths = self.videos[video][start:stop:self.frame_skip]
        return load_sequence(paths, self.box, self.img_h, self.img_w)  # (T, 3, H, W)


# ---------------------------------------------------------------------------------------------
# Moving sprites: synthetic scenes with exact ground truth
# ---------------------------------------------------------------------------------------------

SHAPES = ("square", "circle", "triangle", "diamond", "ellipse")
MOTIONS = ("constant", "bounce", "wrap", "cross")
BACKGROUNDS = ("black", "static", "moving")
PALETTES = ("distinct", "spmot")
# Sprites-MOT's 6 colours (He et al. 2019, as regenerated by OCRB: ocrb/tba/scripts/gen_sprite.py,
# colour i has R = (i+1)//4, G = ((i+1)%4)//2, B = (i+1)%2): blue, green, cyan, red, magenta, yellow
SPMOT_COLORS = np.array([[0, 0, 1], [0, 1, 0], [0, 1, 1], [1, 0, 0], [1, 0, 1], [1, 1, 0]], dtype=np.float32)
BG_LOW, BG_RANGE = 0.1, 0.3          # textured background values lie in [0.1, 0.4]
MIN_SATURATION = MIN_VALUE = 0.75    # object colours: max channel >= 0.75, far from the background


@dataclass(frozen=True)
class SpriteSpec:
    """Everything that defines a MovingSprites dataset; scenes follow from (seed, index)."""
    img_h: int = 64
    img_w: int = 64
    seq_len: int = 10
    num_sequences: int = 100_000         # dataset length: scenes are drawn on the fly, so many cost nothing,
                                         # and a model trained on few fits those scenes rather than sprites
    min_objects: int = 1
    max_objects: int = 4
    shapes: tuple = SHAPES
    min_size: float = 8.0                # object side / diameter in pixels
    max_size: float = 14.0
    min_speed: float = 1.0               # pixels per frame
    max_speed: float = 3.0
    motion: str = "constant"             # 'constant' | 'bounce' (off the edges) | 'wrap' (torus) | 'cross':
                                         # objects are born at an edge and cross to the opposite one, max_objects
                                         # slots, a slot's object vanishing at the far edge (Sprites-MOT)
    background: str = "black"            # 'black' | 'static' (smooth noise) | 'moving' (drifting)
    enter_leave: bool = False            # objects may start outside and move in/out (constant only)
    bg_speed: float = 1.0                # drift of a 'moving' background, pixels per frame
    bg_cells: int = 8                    # coarse noise grid of a textured background
    palette: str = "distinct"            # 'distinct' (saturated hues, evenly spread) | 'spmot' (6 colours, repeats)
    hue_spread: float = 1.0              # 'distinct': fraction of the hue circle the scene's hues spread over
                                         # (small = similar colours)
    aspect_var: float = 0.0              # 'cross': height/width = u, width = size / sqrt(u), height = size * sqrt(u)
                                         # for u uniform in [1 - aspect_var, 1 + aspect_var]
    birth_prob: float = 0.5              # 'cross': chance per frame that a free slot's object is born
    birth_wait: int = 5                  # 'cross': frames a slot stays free after its object left
    warmup: int = 60                     # 'cross': frames simulated before the first one (a running stream)
    seed: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def fail(msg):
            raise DataError(f"sprite spec: {msg}")

        if min(self.img_h, self.img_w, self.seq_len) < 1 or self.num_sequences < 0:
            fail("img_h, img_w and seq_len must be positive and num_sequences >= 0")
        if not 0 <= self.min_objects <= self.max_objects:
            fail(f"need 0 <= min_objects <= max_objects, got {self.min_objects} and {self.max_objects}")
        if not self.shapes or any(s not in SHAPES for s in self.shapes):
            fail(f"shapes {self.shapes} must be a non-empty subset of {SHAPES}")
        if self.motion not in MOTIONS:
            fail(f"motion '{self.motion}' must be one of {MOTIONS}")
        if self.background not in BACKGROUNDS:
            fail(f"background '{self.background}' must be one of {BACKGROUNDS}")
        if not 1 <= self.min_size <= self.max_size:
            fail(f"need 1 <= min_size <= max_size, got {self.min_size} and {self.max_size}")
        if self.max_size > min(self.img_h, self.img_w) - (3 if self.motion == "wrap" else 0):
            fail(f"max_size {self.max_size} does not fit {self.img_w}x{self.img_h} frames with "
                 f"motion '{self.motion}': lower max_size")
        if not 0 <= self.min_speed <= self.max_speed:
            fail(f"need 0 <= min_speed <= max_speed, got {self.min_speed} and {self.max_speed}")
        if self.enter_leave and self.motion != "constant":
            fail(f"enter_leave needs motion 'constant', not '{self.motion}'")
        if self.bg_cells < 1:
            fail("bg_cells must be positive")
        if self.palette not in PALETTES:
            fail(f"palette '{self.palette}' must be one of {PALETTES}")
        if not 0 < self.hue_spread <= 1:
            fail(f"hue_spread={self.hue_spread} must lie in (0, 1]")
        if not 0 <= self.aspect_var < 1 or not 0 <= self.birth_prob <= 1:
            fail("need 0 <= aspect_var < 1 and 0 <= birth_prob <= 1")
        if self.birth_wait < 0 or self.warmup < 0:
            fail("birth_wait and warmup must not be negative")
        if self.motion == "cross" and self.max_objects < 1:
            fail("motion 'cross' needs max_objects >= 1 (the slots)")


@dataclass
class SpriteScene:
    """One scene's objects and background, drawn from its generator."""
    shapes: list            # (N,) shape names
    half_w: np.ndarray      # (N,) half width in pixels
    half_h: np.ndarray      # (N,) half height in pixels
    colors: np.ndarray      # (N, 3) float32 RGB in [0, 1]
    depths: np.ndarray      # (N,) smaller = nearer (drawn on top)
    centers: np.ndarray     # (T, N, 2) object centre (x, y) in pixels per frame
    background: np.ndarray  # (T, H, W, 3) float32
    present: np.ndarray | None = None   # (T, N) bool: the object exists in frame t (None: in every frame)

    def exists(self, k: int, t: int) -> bool:
        return self.present is None or bool(self.present[t, k])


def distinct_colors(rng: np.random.Generator, num: int, spread: float = 1.0) -> np.ndarray:
    """(num, 3) saturated colours with hues evenly spread over `spread` of the hue circle, in random order."""
    hues = (rng.random() + rng.permutation(num) / max(num, 1) * spread) % 1.0
    saturations = rng.uniform(MIN_SATURATION, 1.0, num)
    values = rng.uniform(MIN_VALUE, 1.0, num)
    rgb = [colorsys.hsv_to_rgb(h, s, v) for h, s, v in zip(hues, saturations, values)]
    return np.array(rgb, dtype=np.float32).reshape(num, 3)


def axis_track(rng, spec: SpriteSpec, extent: int, half: np.ndarray, velocity: np.ndarray,
               frame_inside: np.ndarray) -> np.ndarray:
    """(T, N) positions along one axis of length `extent` for objects of half size `half`.

    With enter_leave the centre is inside the frame at frame `frame_inside` (N,) of each object.
    """
    times = np.arange(spec.seq_len)[:, None]  # (T, 1)
    low, high = half, extent - half            # centre range keeping the object inside
    if spec.motion == "wrap":
        return (rng.uniform(0, extent, half.shape) + velocity * times) % extent
    if spec.motion == "bounce":
        start = rng.uniform(low, high)
        return fold_into(start + velocity * times, low, high)
    if spec.enter_leave:  # centre inside at frame_inside, anywhere at other frames
        start = rng.uniform(0, extent, half.shape) - velocity * frame_inside
        return start + velocity * times
    # constant motion that stays inside: cap the speed, then start where the path fits
    if spec.seq_len > 1:
        max_speed = (high - low) / (spec.seq_len - 1)
        velocity = np.clip(velocity, -max_speed, max_speed)
    travel = velocity * (spec.seq_len - 1)
    lo, hi = low - np.minimum(travel, 0), high - np.maximum(travel, 0)
    start = rng.uniform(lo, np.maximum(hi, lo))     # hi < lo only by rounding when the speed is capped
    return start + velocity * times


def fold_into(position: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Positions reflected off the walls low and high (a triangle wave)."""
    width = np.maximum(high - low, 1e-9)
    phase = (position - low) % (2 * width)
    return low + np.where(phase <= width, phase, 2 * width - phase)


def periodic_noise(grid: np.ndarray, img_h: int, img_w: int, shift_x: float, shift_y: float) -> np.ndarray:
    """Bilinear upsampling of a (gh, gw, C) grid that wraps at the image edges: (img_h, img_w, C).

    Sampled at pixel positions shifted by (shift_x, shift_y), so shifting drifts the texture.
    """
    grid_h, grid_w = grid.shape[:2]
    u = (np.arange(img_w) + 0.5 + shift_x) * grid_w / img_w - 0.5
    v = (np.arange(img_h) + 0.5 + shift_y) * grid_h / img_h - 0.5
    u0, v0 = np.floor(u), np.floor(v)
    fu, fv = (u - u0)[None, :, None], (v - v0)[:, None, None]
    u0, v0 = u0.astype(int) % grid_w, v0.astype(int) % grid_h
    u1, v1 = (u0 + 1) % grid_w, (v0 + 1) % grid_h
    top = grid[v0][:, u0] * (1 - fu) + grid[v0][:, u1] * fu
    bottom = grid[v1][:, u0] * (1 - fu) + grid[v1][:, u1] * fu
    return top * (1 - fv) + bottom * fv


def make_background(rng, spec: SpriteSpec) -> np.ndarray:
    """(T, H, W, 3) float32 background: black, or smooth dim noise, static or drifting."""
    shape = (spec.seq_len, spec.img_h, spec.img_w, 3)
    if spec.background == "black":
        return np.zeros(shape, dtype=np.float32)
    grid = rng.random((spec.bg_cells, spec.bg_cells, 3))
    angle = rng.uniform(0, 2 * np.pi)
    if spec.background != "moving":                     # static: one frame, repeated
        frame = (BG_LOW + BG_RANGE * periodic_noise(grid, spec.img_h, spec.img_w, 0.0, 0.0)).astype(np.float32)
        return np.repeat(frame[None], spec.seq_len, axis=0)
    velocity = spec.bg_speed * np.array([np.cos(angle), np.sin(angle)])
    frames = [periodic_noise(grid, spec.img_h, spec.img_w, *(velocity * t)) for t in range(spec.seq_len)]
    return (BG_LOW + BG_RANGE * np.stack(frames)).astype(np.float32)


def crossing_scene(spec: SpriteSpec, index: int) -> SpriteScene:
    """Motion 'cross', the Sprites-MOT process (He et al. 2019; OCRB's ocrb/tba/scripts/gen_sprite.py):
    max_objects slots; a free slot waits birth_wait frames, then each frame gives birth with
    probability birth_prob; a new object starts on a random edge, at a uniform place along it and
    `margin` (half the mean size) inside, and heads for a uniform place on the opposite edge at a
    speed uniform in [min_speed, max_speed]; it shows from the frame after its birth until its centre
    leaves [margin, extent - margin], when its slot is free again. Later slots cover earlier ones.
    The process runs `warmup` frames before the first one returned, its slots first free at random
    frames of the first half of it, so scenes start mid-stream with the slots out of step."""
    rng = np.random.default_rng([spec.seed, index])
    base_hue = rng.random()                             # 'distinct' palette: hues in [base, base + hue_spread)
    slots, total = spec.max_objects, spec.warmup + spec.seq_len
    margin = (spec.min_size + spec.max_size) / 4
    extent = np.array([spec.img_w, spec.img_h], dtype=np.float64)
    objects = []                                        # per object: slot, birth frame, start, velocity, looks
    # slots start free with random delays of up to half the warm-up, so their phases are spread
    waited = [spec.birth_wait - int(d) for d in rng.integers(0, max(1, spec.warmup // 2), slots)]
    alive = [None] * slots                              # (object index, steps shown) of each slot
    positions = {}                                      # (object, frame) -> centre
    for t in range(total):
        for slot in range(slots):
            if alive[slot] is not None:
                k, step = alive[slot]
                obj = objects[k]
                centre = obj["start"] + step * obj["velocity"]
                if (centre < margin).any() or (centre > extent - margin).any():
                    alive[slot], waited[slot] = None, 0      # left at the far edge
                else:
                    positions[k, t] = centre
                    alive[slot] = (k, step + 1)
            elif waited[slot] < spec.birth_wait:
                waited[slot] += 1
            elif rng.random() < spec.birth_prob:
                alive[slot] = (len(objects), 0)
                objects.append(new_crossing_object(rng, spec, slot, margin, extent, base_hue))
    shown = sorted({k for k, t in positions if t >= spec.warmup})
    num = len(shown)
    centers = np.zeros((spec.seq_len, num, 2))
    present = np.zeros((spec.seq_len, num), dtype=bool)
    for n, k in enumerate(shown):
        for t in range(spec.seq_len):
            if (k, spec.warmup + t) in positions:
                centers[t, n], present[t, n] = positions[k, spec.warmup + t], True
    pick = lambda key: np.array([objects[k][key] for k in shown], dtype=np.float64).reshape(num)  # noqa: E731
    colors = np.array([objects[k]["color"] for k in shown], dtype=np.float32).reshape(num, 3)
    return SpriteScene(shapes=[objects[k]["shape"] for k in shown], half_w=pick("width") / 2,
                       half_h=pick("height") / 2, colors=colors, depths=1 - (pick("slot") + 0.5) / slots,
                       centers=centers, background=make_background(rng, spec), present=present)


def new_crossing_object(rng, spec: SpriteSpec, slot: int, margin: float, extent: np.ndarray,
                        base_hue: float) -> dict:
    """A 'cross' object's slot, looks, start on a random edge and velocity towards the opposite edge."""
    shape = spec.shapes[int(rng.integers(len(spec.shapes)))]
    if spec.palette == "spmot":
        color = SPMOT_COLORS[int(rng.integers(len(SPMOT_COLORS)))]
    else:
        hue = (base_hue + spec.hue_spread * rng.random()) % 1.0
        color = colorsys.hsv_to_rgb(hue, rng.uniform(MIN_SATURATION, 1.0), rng.uniform(MIN_VALUE, 1.0))
    size = rng.uniform(spec.min_size, spec.max_size)
    root = math.sqrt(rng.uniform(1 - spec.aspect_var, 1 + spec.aspect_var))
    edge = int(rng.integers(4))                          # 0: top -> bottom, 1: bottom -> top, 2: left -> right, 3: right -> left
    axis = 1 if edge < 2 else 0                          # the axis the object crosses
    along = rng.uniform(margin, extent[1 - axis] - margin, 2)   # start and end along the edges
    start, end = np.empty(2), np.empty(2)
    near, far = margin, extent[axis] - margin
    start[axis], end[axis] = (near, far) if edge % 2 == 0 else (far, near)
    start[1 - axis], end[1 - axis] = along
    direction = (end - start) / np.linalg.norm(end - start)
    speed = rng.uniform(spec.min_speed, spec.max_speed)
    return dict(slot=slot, shape=shape, color=color, width=size / root, height=size * root,
                start=start, velocity=speed * direction)


def make_scene(spec: SpriteSpec, index: int) -> SpriteScene:
    """The objects and background of scene `index`, deterministic from (spec.seed, index)."""
    if spec.motion == "cross":
        return crossing_scene(spec, index)
    rng = np.random.default_rng([spec.seed, index])
    num = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    shapes = [spec.shapes[k] for k in rng.integers(0, len(spec.shapes), num)]
    sizes = rng.uniform(spec.min_size, spec.max_size, num)
    aspect = rng.uniform(0.5, 0.9, num)
    tall = rng.random(num) < 0.5
    is_ellipse = np.array([s == "ellipse" for s in shapes], dtype=bool)
    widths = np.where(is_ellipse & ~tall, sizes, np.where(is_ellipse, sizes * aspect, sizes))
    heights = np.where(is_ellipse & tall, sizes, np.where(is_ellipse, sizes * aspect, sizes))
    colors = distinct_colors(rng, num, spec.hue_spread)
    depths = (rng.permutation(num) + 0.5) / max(num, 1)
    speed = rng.uniform(spec.min_speed, spec.max_speed, num)
    angle = rng.uniform(0, 2 * np.pi, num)
    frame_inside = rng.integers(0, spec.seq_len, num)  # used with enter_leave only
    xs = axis_track(rng, spec, spec.img_w, widths / 2, speed * np.cos(angle), frame_inside)
    ys = axis_track(rng, spec, spec.img_h, heights / 2, speed * np.sin(angle), frame_inside)
    return SpriteScene(shapes=shapes, half_w=widths / 2, half_h=heights / 2, colors=colors,
                       depths=depths, centers=np.stack([xs, ys], axis=-1),
                       background=make_background(rng, spec))


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, half_w: float, half_h: float) -> np.ndarray:
    """Pixels inside the shape, from pixel-centre offsets dx (1, w) and dy (h, 1): (h, w) bool."""
    x, y = dx / half_w, dy / half_h  # the shape's box is [-1, 1]^2
    if shape == "square":
        return (np.abs(x) <= 1) & (np.abs(y) <= 1)
    if shape in ("circle", "ellipse"):
        return x ** 2 + y ** 2 <= 1
    if shape == "diamond":
        return np.abs(x) + np.abs(y) <= 1
    if shape == "triangle":  # apex up, base at the bottom
        return (y <= 1) & (np.abs(x) <= (y + 1) / 2)
    raise DataError(f"unknown shape '{shape}': choose one of {SHAPES}")


def object_window(spec: SpriteSpec, scene: SpriteScene, k: int, t: int):
    """Rows, columns and (rows, cols) mask of object k in frame t (pixel indices inside the image)."""
    cx, cy = scene.centers[t, k]
    half_w, half_h = scene.half_w[k], scene.half_h[k]
    cols = np.arange(math.floor(cx - half_w), math.ceil(cx + half_w) + 1)
    rows = np.arange(math.floor(cy - half_h), math.ceil(cy + half_h) + 1)
    if spec.motion != "wrap":
        cols = cols[(cols >= 0) & (cols < spec.img_w)]
        rows = rows[(rows >= 0) & (rows < spec.img_h)]
    mask = shape_mask(scene.shapes[k], cols[None, :] + 0.5 - cx, rows[:, None] + 0.5 - cy, half_w, half_h)
    return rows % spec.img_h, cols % spec.img_w, mask


def render_ids(spec: SpriteSpec, scene: SpriteScene) -> np.ndarray:
    """(T, H, W) int64 id of the visible object per pixel (1..N), 0 for background."""
    id_maps = np.zeros((spec.seq_len, spec.img_h, spec.img_w), dtype=np.int64)
    far_to_near = np.argsort(-scene.depths)
    for t in range(spec.seq_len):
        for k in far_to_near:
            if not scene.exists(k, t):
                continue
            rows, cols, mask = object_window(spec, scene, k, t)
            window = id_maps[t][np.ix_(rows, cols)]
            window[mask] = k + 1
            id_maps[t][np.ix_(rows, cols)] = window
    return id_maps


def compose(scene: SpriteScene, id_maps: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) frames: object colour where an id shows, background elsewhere."""
    palette = np.concatenate([np.zeros((1, 3), np.float32), scene.colors])  # (N + 1, 3)
    return np.where(id_maps[..., None] > 0, palette[id_maps], scene.background)


def tight_boxes(masks: np.ndarray) -> np.ndarray:
    """(T, N, 4) float32 boxes (x, y, w, h) of (T, N, H, W) masks; zeros for empty masks."""
    rows_any, cols_any = masks.any(axis=3), masks.any(axis=2)  # (T, N, H), (T, N, W)
    height, width = masks.shape[2], masks.shape[3]
    top = rows_any.argmax(axis=2)
    bottom = height - 1 - rows_any[..., ::-1].argmax(axis=2)
    left = cols_any.argmax(axis=2)
    right = width - 1 - cols_any[..., ::-1].argmax(axis=2)
    boxes = np.stack([left, top, right - left + 1, bottom - top + 1], axis=-1).astype(np.float32)
    return boxes * rows_any.any(axis=2)[..., None]


class MovingSprites(Dataset):
    """Procedural sprite videos with exact ground truth, made on the fly from (spec.seed, index).

    Objects (ids 1..N) are hard-edged shapes of saturated colours; nearer objects (smaller depth)
    cover farther ones, so each visible mask is exactly where that object's colour shows (unless two
    objects share a colour: palette 'spmot' repeats its 6 colours). With motion 'cross' objects are
    born and leave during the sequence (`ground_truth` ids are -1 where an object does not show).
    """

    def __init__(self, spec: SpriteSpec):
        self.spec = spec

    def __len__(self) -> int:
        return self.spec.num_sequences

    def check_index(self, index: int) -> None:
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} out of range for {len(self)} sequences")

    def __getitem__(self, index: int) -> torch.Tensor:
        self.check_index(index)
        scene = make_scene(self.spec, index)
        frames = compose(scene, render_ids(self.spec, scene))  # (T, H, W, 3)
        return torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 1, 2)))  # (T, 3, H, W)

    def ground_truth(self, index: int) -> dict:
        """Visible ground truth of scene `index` (N objects, T frames).

        'ids' int64 (T, N): object id (n + 1) where visible, else -1; 'boxes' float32 (T, N, 4):
        (x, y, w, h) tight box of the visible pixels (zeros if hidden); 'masks' bool (T, N, H, W):
        visible pixels; 'counts' int64 (T,): visible objects; 'colors' float32 (N, 3);
        'depths' float32 (N,) (smaller = nearer).
        """
        self.check_index(index)
        scene = make_scene(self.spec, index)
        id_maps = render_ids(self.spec, scene)  # (T, H, W)
        num = len(scene.shapes)
        object_ids = np.arange(1, num + 1)
        masks = id_maps[:, None] == object_ids[None, :, None, None]  # (T, N, H, W)
        visible = masks.any(axis=(2, 3))  # (T, N)
        return {
            "ids": np.where(visible, object_ids[None, :], -1).astype(np.int64),
            "boxes": tight_boxes(masks),
            "masks": masks,
            "counts": visible.sum(axis=1).astype(np.int64),
            "colors": scene.colors.astype(np.float32),
            "depths": scene.depths.astype(np.float32),
        }

    def amodal_masks(self, index: int) -> np.ndarray:
        """(T, N, H, W) bool full shape of every object, ignoring occlusion (inside the image)."""
        self.check_index(index)
        spec, scene = self.spec, make_scene(self.spec, index)
        masks = np.zeros((spec.seq_len, len(scene.shapes), spec.img_h, spec.img_w), dtype=bool)
        for t in range(spec.seq_len):
            for k in range(len(scene.shapes)):
                if not scene.exists(k, t):
                    continue
                rows, cols, mask = object_window(spec, scene, k, t)
                masks[t, k][np.ix_(rows, cols)] = mask
        return masks


SPRITE_PRESETS = {
    "easy": SpriteSpec(img_h=64, img_w=64, min_objects=1, max_objects=4, min_size=8, max_size=14,
                       motion="constant", background="black"),
    "few": SpriteSpec(img_h=64, img_w=64, min_objects=2, max_objects=5, min_size=8, max_size=16,
                      motion="bounce", background="static"),
    "many": SpriteSpec(img_h=128, img_w=128, min_objects=20, max_objects=40, min_size=6, max_size=14,
                       motion="constant", background="static", enter_leave=True),
    "dynamic_bg": SpriteSpec(img_h=64, img_w=64, min_objects=1, max_objects=4, min_size=8, max_size=14,
                             motion="bounce", background="moving", bg_speed=1.5),
    # Sprites-MOT as the object-centric representation benchmark (Weis et al. 2021) regenerated it
    # (ocrb/tba/scripts/gen_sprite.py, made at 128x128 and scored at 64x64; all lengths halved here):
    # 10 frames, 3 slots (0-3 objects at a time), birth chance 0.5 a frame after 5 free frames,
    # template side 21 px x scale U[0.9, 1.1] (10.5 px here), height/width ratio U[0.8, 1.2], speed
    # 5.3 px/frame (2.65), straight edge-to-edge paths, 4 shapes, 6 colours, black background
    "spmot": SpriteSpec(img_h=64, img_w=64, seq_len=10, min_objects=0, max_objects=3,
                        shapes=("circle", "square", "triangle", "diamond"), min_size=9.45, max_size=11.55,
                        min_speed=2.65, max_speed=2.65, motion="cross", background="black", palette="spmot",
                        aspect_var=0.2, birth_prob=0.5, birth_wait=5),
    # hard: 5-9 sprites bouncing in 64x64 (many occlusions) with similar hues (a quarter of the circle)
    "crowded": SpriteSpec(img_h=64, img_w=64, seq_len=10, min_objects=5, max_objects=9, min_size=9, max_size=16,
                          motion="bounce", background="black", hue_spread=0.25),
    # hard: a Sprites-MOT-like stream with births and exits, up to 6 at a time, similar hues, various
    # speeds and aspects, on a textured static background
    "stream": SpriteSpec(img_h=64, img_w=64, seq_len=10, min_objects=0, max_objects=6, min_size=8, max_size=14,
                         min_speed=1.5, max_speed=3.5, motion="cross", background="static", hue_spread=0.3,
                         aspect_var=0.3, birth_prob=0.5, birth_wait=2),
}


def check_preset(preset: str) -> None:
    """DataError (one line) unless `preset` names one of SPRITE_PRESETS."""
    if preset not in SPRITE_PRESETS:
        raise DataError(f"unknown sprite preset '{preset}': choose one of {sorted(SPRITE_PRESETS)}")


def make_sprites(preset: str, img_h=None, img_w=None, seq_len=None, num_sequences=None, seed=0,
                 **overrides) -> MovingSprites:
    """A MovingSprites dataset from a preset; None keeps the preset's value.

    Object sizes and speeds scale with the image when img_h/img_w differ from the preset's
    (by the smaller ratio), unless given in `overrides` (any SpriteSpec field).
    """
    check_preset(preset)
    base = SPRITE_PRESETS[preset]
    img_h = base.img_h if img_h is None else img_h
    img_w = base.img_w if img_w is None else img_w
    scale = min(img_h / base.img_h, img_w / base.img_w)
    changes = dict(img_h=img_h, img_w=img_w, seed=seed,
                   seq_len=base.seq_len if seq_len is None else seq_len,
                   num_sequences=base.num_sequences if num_sequences is None else num_sequences,
                   min_size=base.min_size * scale, max_size=base.max_size * scale,
                   min_speed=base.min_speed * scale, max_speed=base.max_speed * scale)
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(SpriteSpec)})
    if unknown:
        raise DataError(f"unknown sprite options {unknown}: use SpriteSpec fields")
    changes.update(overrides)
    if "min_size" not in overrides and changes["min_size"] < 1:
        raise DataError(f"preset '{preset}' at {img_h}x{img_w} would draw sprites of {changes['min_size']:.2f} px "
                        f"(its sizes scale with the frame from {base.img_h}x{base.img_w}): use larger frames")
    return MovingSprites(dataclasses.replace(base, **changes))


BLACK_LEVEL = 0.05          # a pixel value (every channel) at most this is black
BLACK_FRACTION = 0.5        # frames whose static part is black over at least this fraction need no background module


def estimate_background(dataset, num_sequences: int = 8, black_level: float = BLACK_LEVEL,
                        black_fraction: float = BLACK_FRACTION) -> dict:
    """Whether the frames have a background worth a background module, from a few sequences spread
    over the dataset: per sequence, the temporal median of each pixel is its static part (moving
    objects drop out); `black_fraction` is the share of pixels whose median is black in every
    channel; `temporal_std` the mean per-pixel standard deviation over time (motion of objects or of
    the background). has_background: False when black_fraction >= the threshold, i.e. a static
    black background that SCALOR's phase_no_background (a black background) renders exactly.
    mean_colour: the frames' mean (r, g, b), where `bg_colour_init` starts the background decoder."""
    count = min(num_sequences, len(dataset))
    if count < 1:
        raise DataError("estimate_background needs at least one sequence")
    indices = np.unique(np.linspace(0, len(dataset) - 1, count).round().astype(int))
    black, spread, colour = [], [], []
    for index in indices.tolist():
        frames = dataset[index]                                          # (T, 3, H, W)
        static = frames.median(dim=0).values                             # (3, H, W)
        black.append(float((static <= black_level).all(dim=0).float().mean()))
        spread.append(float(frames.std(dim=0, unbiased=False).mean()))
        colour.append(frames.double().mean(dim=(0, 2, 3)).tolist())
    fraction = float(np.mean(black))
    return {"black_fraction": fraction, "temporal_std": float(np.mean(spread)), "sequences": len(indices),
            "has_background": fraction < black_fraction, "mean_colour": np.mean(colour, axis=0).tolist()}


def write_to_disk(dataset: Dataset, out_dir, num: int) -> Path:
    """Write the first `num` sequences as PNGs, out_dir/000000/0000.png, readable by FrameFolder."""
    out_dir = Path(out_dir)
    for index in range(num):
        frames = dataset[index]  # (T, 3, H, W) in [0, 1]
        video_dir = out_dir / f"{index:06d}"
        video_dir.mkdir(parents=True, exist_ok=True)
        pixels = (frames.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)  # (T, H, W, 3)
        for t, frame in enumerate(pixels):
            Image.fromarray(frame).save(video_dir / f"{t:04d}.png")
    return out_dir


# ---------------------------------------------------------------------------------------------
# Benchmark workload
# ---------------------------------------------------------------------------------------------

def bench_batches(num_batches=4, batch_size=20, seq_len=10, img_h=128, img_w=128, num_objects=20,
                  seed=0, background_scale=0.5) -> list[torch.Tensor]:
    """The speed-benchmark workload: `num_batches` float32 tensors (B, T, 3, H, W) in [0, 1].

    Background: 8x8 uniform RGB noise upsampled bilinearly, times background_scale (0.5).
    Objects: filled squares of half-size 4..7 px and colour uniform in [0.5, 1] per channel,
    centres uniform in the image moving at a constant velocity in [-3, 3] px/frame, wrapping
    around the edges; later squares cover earlier ones. Deterministic from seed.
    """
    generator = torch.Generator().manual_seed(seed)
    return [bench_batch(generator, batch_size, seq_len, img_h, img_w, num_objects, background_scale)
            for _ in range(num_batches)]


def bench_batch(generator, batch_size, seq_len, img_h, img_w, num_objects, background_scale) -> torch.Tensor:
    noise = torch.rand(batch_size, 3, 8, 8, generator=generator)
    background = F.interpolate(noise, size=(img_h, img_w), mode="bilinear", align_corners=False)
    background = background * background_scale  # (B, 3, H, W)
    half = torch.randint(4, 8, (batch_size, num_objects), generator=generator)  # (B, N)
    colors = 0.5 + 0.5 * torch.rand(batch_size, num_objects, 3, generator=generator)  # (B, N, 3)
    extent = torch.tensor([img_w, img_h], dtype=torch.float32)
    start = torch.rand(batch_size, num_objects, 2, generator=generator) * extent  # (B, N, 2) x, y
    velocity = (torch.rand(batch_size, num_objects, 2, generator=generator) * 2 - 1) * 3
    cols, rows = torch.arange(img_w), torch.arange(img_h)
    frames = []
    for t in range(seq_len):
        center = (start + velocity * t) % extent  # (B, N, 2)
        left = center[..., 0].floor().long() - half
        top = center[..., 1].floor().long() - half
        inside_x = (cols - left[..., None]) % img_w < 2 * half[..., None]  # (B, N, W)
        inside_y = (rows - top[..., None]) % img_h < 2 * half[..., None]   # (B, N, H)
        frame = background
        for n in range(num_objects):
            square = inside_y[:, n, :, None] & inside_x[:, n, None, :]  # (B, H, W)
            frame = torch.where(square[:, None], colors[:, n, :, None, None], frame)
        frames.append(frame)
    return torch.stack(frames, dim=1)  # (B, T, 3, H, W)


# ---------------------------------------------------------------------------------------------
# Loader
# ---------------------------------------------------------------------------------------------

def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGINT/SIGTERM to the main process, which finishes its step, saves a
    checkpoint and then shuts them down (a signal to the whole process group, as `timeout` or a
    scheduler sends it, would otherwise kill them mid-step)."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def data_notices(dataset, data_dir) -> list[str]:
    """What building a dataset of frames left out, as notice lines for the user."""
    lines = []
    if getattr(dataset, "num_skipped", 0):
        lines.append(f"notice: skipped {dataset.num_skipped} unreadable frames in '{data_dir}'")
    short = getattr(dataset, "short_videos", [])
    if short and len(short) < len(dataset.videos):   # all too short is an error, raised already
        lines.append(f"notice: left out {len(short)} videos shorter than one sequence in '{data_dir}' "
                     f"(the first: '{short[0]}')")
    return lines


DATASET_KINDS = ("sprites", "grandcentral", "frames")


def dataset_kind(kind: str | None, data_dir, notice: bool = True) -> str:
    """The kind of dataset to read: `kind` if given; else sprites without a data folder, Grand
    Central (with a notice, unless `notice` is off) if every frame in it is named by a number, else a
    folder of frames."""
    if kind is not None:
        return kind
    if data_dir is None:
        return "sprites"
    frames = [p for p in list_folder(check_folder(data_dir)) if is_frame_file(p)]
    if frames and all(is_number_name(p.stem) for p in frames):
        if notice:
            print(f"notice: numbered frames in '{data_dir}' are read as Grand Central (8 crops, every 8th frame "
                  f"unless --frame-skip, the last 10% held out); pass --dataset frames for a video of your own")
        return "grandcentral"
    return "frames"


def build_dataset(kind: str, cfg, *, train: bool, data_dir=None, preset: str = "easy", num_sequences=None,
                  frame_skip=None, skip_bad_frames: bool = False, seed: int = 0) -> Dataset:
    """The dataset of `kind` at the config's frame size and sequence length (cfg: img_h, img_w,
    seq_len, train_station_cropping_origin), for training (every start; Grand Central's first 90%)
    or testing (non-overlapping sequences; its last 10%); notices of what it left out are printed.

    sprites: `preset` scenes drawn from `seed`, `num_sequences` of them (None: the preset's);
    grandcentral / frames: the frames in `data_dir`, `frame_skip` apart (None: 8 / 1)."""
    if kind == "sprites":
        return make_sprites(preset, img_h=cfg.img_h, img_w=cfg.img_w, seq_len=cfg.seq_len,
                            num_sequences=num_sequences, seed=seed)
    if kind == "grandcentral":
        if cfg.img_h != cfg.img_w:
            raise DataError(f"Grand Central's crops are square but the frames are {cfg.img_h}x{cfg.img_w}: train "
                            f"with --img-h equal to --img-w, or pass --dataset frames to read the whole frames")
        dataset = GrandCentral(data_dir, cfg.img_h, cfg.img_w, cfg.seq_len, train=train,
                               frame_skip=8 if frame_skip is None else frame_skip,
                               crop_size=cfg.train_station_cropping_origin, skip_bad_frames=skip_bad_frames)
    elif kind == "frames":
        dataset = FrameFolder(data_dir, cfg.img_h, cfg.img_w, cfg.seq_len,
                              frame_skip=1 if frame_skip is None else frame_skip, train=train,
                              skip_bad_frames=skip_bad_frames)
    else:
        raise DataError(f"unknown dataset kind '{kind}': choose one of {DATASET_KINDS}")
    for line in data_notices(dataset, data_dir):
        print(line)
    return dataset


def iterate(loader):
    """Iterate a DataLoader and shut its workers down when the iteration ends, also by an error
    (a corrupt frame met in a worker): they ignore SIGTERM (above), so a loader left to the
    interpreter's exit would hang it."""
    iterator = iter(loader)
    try:
        yield from iterator
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)   # multi-process iterators only
        if shutdown is not None:
            shutdown()


def make_loader(dataset, batch_size, shuffle, workers=0, pin_memory=False, drop_last=True, seed=0,
                sampler=None) -> DataLoader:
    """A DataLoader whose order is reproducible from `seed`.

    With a sampler (e.g. DistributedSampler) the sampler decides the order and `shuffle` is
    ignored. Workers are persistent when workers > 0.
    """
    num_items = len(sampler) if sampler is not None else len(dataset)
    if drop_last and num_items < batch_size:
        raise DataError(f"the dataset gives {num_items} sequences, fewer than one batch of {batch_size}: "
                        f"add data or lower --batch-size")
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                      sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      drop_last=drop_last, generator=torch.Generator().manual_seed(seed),
                      persistent_workers=workers > 0, worker_init_fn=_ignore_stop_signals if workers > 0 else None)
