"""Track the objects of whole videos with a trained SCALOR: one id per object for its whole life.

Usage:

    python track.py VIDEO [VIDEO ...] --checkpoint CKPT --out DIR [--overwrite] [--window N] [--box tight|glimpse]
                    [--z-pres-threshold P] [--[no-]first-frame-rejection] [--duplicate-iou T]
                    [--masks visible|alpha] [--video-out mp4|gif]
                    [--crop X,Y,W,H] [--score GT_DIR] [--device auto|cpu|cuda] [--seed S]
                    [--skip-bad-frames]
    python track.py --score GT_DIR --out DIR          # score tracks written before

VIDEO is a folder of frames (.png/.jpg/.jpeg, in natural order of their names, as data.py reads
them), a folder of such folders or of video files (one video each), or a video file (.mp4, .avi,
.mov, .mkv, .webm, .m4v, .mpg, .mpeg, .gif; decoded by the ffmpeg that imageio-ffmpeg bundles).
Frames are read one at a time; a video of any length runs through the model in windows of
`--window` frames, each window starting from the recurrent state the last one ended with
(`SCALOR.forward(state=)`), which gives the same numbers as one forward over the whole video.

Each frame is resized to the model's img_h x img_w exactly as the training data is
(`data.resize_frame`: PIL bilinear), the whole frame unless `--crop X,Y,W,H` cuts a region first
(a Grand Central model was trained on 240x240 crops of 720x480 frames: pass a square crop there,
e.g. --crop 240,240,240,240, or the whole frame is squeezed into the model's square input).
Predictions follow `evaluate.frame_predictions`: the objects with z_pres > --z-pres-threshold whose
mask has at least evaluate.MIN_GT_AREA (5) pixels, masks placed at the video's own resolution
(the decoded glimpse alpha sampled bilinearly there, thresholded at 0.5), so the area rule counts
the video's pixels, as the ground truth of a video does. A second track of an object (its mask
overlapping an older track's at IoU >= --duplicate-iou, 0.5, in most frames both were in) is left
out (`DuplicateFilter`; not in the reference). The masks written are then, by default (`--masks
visible`, not in the reference), the pixels where each kept object shows (`visible_objects`): each
pixel the model's composite gives to the objects, as evaluate.py's OCRB protocol reads a model, goes
to the object in front among those whose own mask covers it and whose decoded colour there is near
the best match with the frame (so a glimpse reaching over a neighbour of another colour does not take
its pixels); where two masks overlap at IoU >= --duplicate-iou, the overlap goes to the object that
showed more of it in the frame before, where that one's colour matches too (so a track that slides
onto its occluder does not take turns with it). Masks do not overlap, an object partly hidden has
only its visible pixels (as the ground truth of a video has), and an object left with fewer than 5
pixels is not written; `--masks alpha` writes each object's own thresholded alpha instead.

Written per video <name> (names from the folder or file, made unique) into --out:

- `<name>.txt`: MOTChallenge lines `frame,id,x,y,w,h,conf,-1,-1,-1`, frame 1..N over the whole
  video (a frame dropped by --skip-bad-frames leaves its number unused), (x, y, w, h) in the video's
  pixels, conf = z_pres. The box is the tight box of the
  object's mask (whole pixels, `--box tight`, the default) or its glimpse box z_where (`--box glimpse`).
  Ids count 1, 2, ... in order of first appearance (`renumbered`: the model numbers every object it
  draws, those below the threshold too).
- `<name>_masks.json`: {"video", "width", "height", "num_frames", "frames": [{"frame": t, "masks":
  [RLE], "ids": [id]}]}, frame t 0-based (= MOT frame - 1), each mask a (height, width) mask of the
  video frame run-length encoded as `evaluate.rle_encode` (the entries of evaluate.py's predictions.json).
- `<name>.mp4` or `<name>.gif` with --video-out: the video with each object's box and id drawn in
  the id's colour (a video smaller than 256 pixels a side upscaled by a whole factor).
- `track.json`: the settings and per video frames, objects, detections, detections after the first
  frame and those of them that continue a track of the frame before; `score.json` with --score.

When 10 or more detections follow the videos' first frames and fewer than utils.LOW_TRACKED_SHARE of
them continue a track, a notice says that the model finds its objects anew in every frame; a video
file that ends well before the frame count its header announces (cut off) is named in a notice.

--score GT_DIR reads MOTChallenge ground-truth files `<name>.txt` from GT_DIR (lines whose 7th value
is 0 are ignored, as MOTChallenge marks them) and the written tracks back, and computes MOTA, MOTP,
IDF1, id switches, ... with motmetrics, matching boxes at IoU >= 0.5 (evaluate.iou_matrix_distance);
a ground-truth video without a track file counts as no detections (with a notice), none at all is an error.

Bad input (a missing or foreign checkpoint, an unreadable video, an empty folder, a non-empty --out
without --overwrite, an --out holding an input) prints one line naming the problem and the fix and
exits with status 2 before anything is written; an error met while tracking (a frame corrupt inside)
exits 2 too, and Ctrl-C or SIGTERM exits 130, both leaving no --out behind: everything is written
into a temporary sibling folder that replaces --out, whole, at the end.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from common import ConfigError
from data import (DataError, check_frames, check_same_size, frame_files, list_folder, load_rgb, natural_key, one_line,
                  resize_frame)
from evaluate import (MASK_THRESHOLD, MIN_GT_AREA, PRES_THRESHOLD, Objects, accumulate, draw_objects,
                      frame_predictions, iou_matrix_distance, load_model_for_inference,
                      prediction_entries, summarize, write_tracks)
from checkpoints import CheckpointError
from modules import spatial_transform
from utils import (LOW_TRACKED_SHARE, Parser, discard_work, interrupted_message, move_into_place, out_folder_problem,
                   pick_device, seed_arg, seed_everything, sigterm_as_interrupt, tau_at, unique_names, work_folder)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".gif")
PLACED_PIXELS = 1 << 24     # masks are placed this many pixels (objects x frame pixels) at a time
DEFAULT_OUT_FPS = 10.0      # --video-out frame rate for folders of frames
VIDEO_MIN_SIDE = 256        # --video-out upscales (nearest) small videos to at least this many pixels a side
CUT_OFF_SHARE = 0.9         # a video file decoding to fewer than this share of the frames its header announces is named
DUPLICATE_IOU = 0.5         # --duplicate-iou: mask IoU from which a younger track is a duplicate of an older one
MAX_MOT_FRAME = 10_000_000   # a MOTChallenge line's frame number above this is refused (a typo, not a video)
COLOUR_MARGIN = 0.5         # --masks visible: a colour error (squared RGB distance) within this of the best counts as a match
MASK_READINGS = ("visible", "alpha")   # --masks: the pixels where each object shows, or its own alpha > 0.5


class TrackError(Exception):
    """Bad command-line input; the one-line message says what to fix."""


# ------------------------------------------------------------------------------------------------
# Videos
# ------------------------------------------------------------------------------------------------

@dataclass
class Source:
    """One video: a folder of frames (`frames`) or a video file (`frames` None)."""
    path: Path
    name: str
    width: int
    height: int
    frames: list | None = None      # frame files, in order
    num_frames: int | None = None   # exact for folders; an estimate (or None) for video files
    fps: float | None = None
    numbers: list | None = None     # frames' 1-based numbers in the folder, gaps where --skip-bad-frames dropped
                                    # one (None: 1..N)
    length: int | None = None       # a folder's frames, dropped ones included (None: a video file)

    def read(self):
        """The frames in order as RGB PIL images, one at a time; DataError if one is corrupt."""
        if self.frames is not None:
            for path in self.frames:
                yield load_rgb(path)
        else:
            yield from read_video_file(self.path)


def ffmpeg_reader():
    try:
        import imageio_ffmpeg
    except ImportError:
        raise DataError("reading video files needs imageio-ffmpeg: pip install imageio-ffmpeg "
                        "(or pass a folder of the video's frames)") from None
    return imageio_ffmpeg


def read_video_file(path: Path):
    """Frames of a video file as RGB PIL images, decoded one at a time by ffmpeg."""
    reader = ffmpeg_reader().read_frames(str(path), pix_fmt="rgb24")
    try:
        try:
            meta = next(reader)
        except (OSError, RuntimeError, StopIteration) as e:
            raise unreadable_video(path, e) from None
        width, height = meta["size"]
        while True:
            try:
                raw = next(reader)
            except StopIteration:
                return
            except (OSError, RuntimeError) as e:
                raise DataError(f"video '{path}' failed while decoding ({short(e)}): check or re-encode the file") from None
            yield Image.fromarray(np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3))
    finally:
        reader.close()


def short(err: Exception) -> str:
    """The error's reason on one short line: for ffmpeg's errors (its version banner first, the reason
    last) the last line of its text."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = one_line(lines[-1] if lines else err)
    return text if len(text) <= 160 else text[:157] + "..."


def unreadable_video(path: Path, err: Exception) -> DataError:
    why = "it holds no frames" if isinstance(err, StopIteration) else short(err)
    return DataError(f"video '{path}' cannot be read by ffmpeg ({why}): check the file, re-encode it "
                     f"(e.g. to H.264 .mp4) or pass a folder of its frames")


def probe_video_file(path: Path, name: str) -> Source:
    """A Source of a video file, after decoding its first frame; DataError if that fails."""
    reader = ffmpeg_reader().read_frames(str(path), pix_fmt="rgb24")
    try:
        meta = next(reader)
        next(reader)                                   # the first frame decodes
    except (OSError, RuntimeError, StopIteration) as e:
        raise unreadable_video(path, e) from None
    finally:
        reader.close()
    width, height = meta["size"]
    fps = meta.get("fps") or None
    duration = meta.get("duration") or None
    estimate = int(round(fps * duration)) if fps and duration and math.isfinite(fps * duration) else None
    return Source(path=path, name=name, width=int(width), height=int(height), num_frames=estimate, fps=fps)


def frames_source(folder: Path, paths: list, name: str, skip_bad_frames: bool) -> Source:
    """A Source of a folder of frames, after the header checks data.py makes (size, completeness)."""
    good, sizes, skipped = check_frames(paths, skip_bad_frames)
    if skipped:
        print(f"notice: skipped {skipped} unreadable frames in '{folder}' (their frame numbers "
              f"stay unused in the tracks)")
    if not good:
        raise DataError(f"every frame in '{folder}' is unreadable: check the files")
    check_same_size(folder, good, sizes)
    numbers = None
    if skipped:
        position = {path: number for number, path in enumerate(paths, 1)}
        numbers = [position[path] for path in good]
    return Source(path=folder, name=name, width=sizes[0][0], height=sizes[0][1], frames=good,
                  num_frames=len(good), numbers=numbers, length=len(paths))


def is_video_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS


def find_sources(arg: str, skip_bad_frames: bool) -> list[Source]:
    """The videos named by one VIDEO argument, checked; DataError naming the problem and the fix."""
    path = Path(os.path.expanduser(arg))
    what = "pass a video file, a folder of frames (.png/.jpg/.jpeg) or a folder of such folders"
    if not path.exists():
        raise DataError(f"'{path}' does not exist: {what}")
    name = path.resolve().name or "video"
    if path.is_file():
        if not is_video_file(path):
            raise DataError(f"'{path}' is not a video file ({', '.join(VIDEO_EXTENSIONS)}): {what}")
        return [probe_video_file(path, path.stem)]
    frames = frame_files(path)
    if frames:
        others = [e.name for e in list_folder(path) if is_video_file(e) or (e.is_dir() and frame_files(e))]
        if others:
            print(f"notice: '{path}' is tracked as one video of its {len(frames)} frames; the videos and frame "
                  f"folders beside them ({', '.join(sorted(others)[:3])}{', ...' if len(others) > 3 else ''}) are not: "
                  f"pass them as VIDEO arguments of their own")
        return [frames_source(path, frames, name, skip_bad_frames)]
    sources = []
    entries = sorted(list_folder(path), key=lambda p: natural_key(p.name))
    for entry in entries:
        inner = frame_files(entry) if entry.is_dir() else []
        if inner:
            sources.append(frames_source(entry, inner, entry.name, skip_bad_frames))
        elif is_video_file(entry):
            sources.append(probe_video_file(entry, entry.stem))
    if not sources:
        empty = not entries
        raise DataError(f"folder '{path}' {'is empty' if empty else 'holds no frames, frame folders or video files'}: {what}")
    return sources


# ------------------------------------------------------------------------------------------------
# Predictions in the video's pixels
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Region:
    """The part of the video frame the model sees: (x, y) top-left, (w, h) size, in video pixels."""
    x: int
    y: int
    w: int
    h: int

    @property
    def box(self):
        """PIL crop box (left, upper, right, lower)."""
        return (self.x, self.y, self.x + self.w, self.y + self.h)


def video_objects(record, region: Region, width: int, height: int, pres_threshold: float,
                  min_area: int = MIN_GT_AREA) -> Objects:
    """The predictions of one frame (a FrameRecord of batch 1) by `evaluate.frame_predictions`, made
    at the region's resolution, moved into the (height, width) video frame: boxes (x, y, w, h) are the
    glimpse boxes in video pixels, masks (n, height, width) bool.

    Masks are placed for at most PLACED_PIXELS pixels at a time (objects in chunks); the rule is per
    object, so the result is that of one call."""
    keep = torch.nonzero(record.z_pres[0] > pres_threshold).flatten()
    per = max(1, PLACED_PIXELS // (region.w * region.h))
    parts = []
    for start in range(0, max(len(keep), 1), per):
        index = keep[start:start + per]
        chunk = SimpleNamespace(z_pres=record.z_pres[:, index], z_where=record.z_where[:, index],
                                alpha_glimpse=record.alpha_glimpse[:, index], ids=record.ids[:, index])
        parts.append(frame_predictions(chunk, region.h, region.w, min_area, pres_threshold)[0])
    masks = np.concatenate([p.masks for p in parts])
    if region.box != (0, 0, width, height):
        full = np.zeros((len(masks), height, width), dtype=bool)
        full[:, region.y:region.y + region.h, region.x:region.x + region.w] = masks
        masks = full
    xywh = np.concatenate([p.xywh for p in parts]).reshape(-1, 4) + np.array([region.x, region.y, 0, 0], dtype=np.float64)
    return Objects(ids=np.concatenate([p.ids for p in parts]), xywh=xywh, masks=masks,
                   conf=np.concatenate([p.conf for p in parts]), invisible=sum(p.invisible for p in parts))


def yielded_overlaps(objects: Objects, previous: Objects | None, region: Region, shared_iou: float) -> list:
    """`--masks visible` (not in the reference): which track keeps the overlap of two tracks over one object.

    A track of a hidden object can slide onto the object in front of it: for a few frames two tracks then
    cover one object, and the one in front changes from frame to frame. Of two objects whose masks overlap
    at IoU >= shared_iou (`--duplicate-iou`; 0: never), the one that showed more of the overlap's pixels in
    the previous frame (`previous`: that frame's visible objects, the model's ids) keeps it; equal counts
    (neither shown, say) leave it to the other rules. Returns [(index of the one that yields, index of the
    one that keeps it, (region.h, region.w) bool: the overlap)]; `visible_objects` decides where its
    colour allows."""
    if previous is None or shared_iou <= 0 or len(objects.ids) < 2:
        return []
    shown_before = dict(zip(previous.ids.tolist(), previous.masks))
    boxes, areas = objects.tight.astype(int), objects.masks.sum(axis=(1, 2))
    ids = objects.ids.tolist()
    yields = []
    for i in range(len(ids)):
        for k in range(i + 1, len(ids)):
            if mask_overlap(objects, boxes, areas, i, k) < shared_iou:
                continue
            x0, y0, x1, y1 = box_overlap(boxes, i, k)                          # masks meet inside it only
            overlap = objects.masks[i, y0:y1, x0:x1] & objects.masks[k, y0:y1, x0:x1]
            held = [int((shown_before[j][y0:y1, x0:x1] & overlap).sum()) if j in shown_before else 0
                    for j in (ids[i], ids[k])]
            if held[0] != held[1]:
                pixels = np.zeros((region.h, region.w), dtype=bool)
                pixels[y0 - region.y:y1 - region.y, x0 - region.x:x1 - region.x] = overlap
                yields.append((k, i, pixels) if held[0] > held[1] else (i, k, pixels))
    return yields


def visible_objects(record, objects: Objects, frame: torch.Tensor, region: Region, width: int, height: int,
                    min_area: int = MIN_GT_AREA, previous: Objects | None = None,
                    shared_iou: float = DUPLICATE_IOU) -> Objects:
    """`--masks visible` (not in the reference): the objects' masks become the pixels where each shows.

    Which pixels show an object is read as evaluate.py's OCRB protocol reads a model (`metrics.argmax_masks`):
    a pixel shows an object when the share alpha_map * w_max / sum(w) of the object of the largest importance
    w = alpha * z_pres * sigmoid(-z_depth) exceeds the background's 1 - alpha_map, where alpha_map = min(1,
    sum of alpha * z_pres), sums over `objects` (a frame's predictions, second tracks left out already).
    Which object it shows: of the objects whose own mask (alpha > MASK_THRESHOLD) covers the pixel, the one
    in front (largest w) among those whose decoded colour there is within COLOUR_MARGIN (squared RGB
    distance) of the colour that matches the frame best; a pixel no mask covers goes to the largest w. So
    masks do not overlap, the covered part of an object belongs to the one in front, a second track cannot
    hold its object's pixels, and where a glimpse in front reaches over a neighbour of another colour, the
    neighbour keeps the pixels that show it. Where two tracks cover one object, the one that showed more of
    it in the previous frame keeps it where its colour is such a match too (`yielded_overlaps`; `previous`
    None: the first frame). Objects left with fewer than `min_area` pixels are left out.
    record: FrameRecord of batch 1; objects: from `video_objects`; frame: (3, img_h, img_w) the model's
    input, the region resized (sampled bilinearly back to the region's pixels here, as data.resize_frame
    samples: half-pixel centres).

    Alphas and colours (4 values a pixel) are placed for at most PLACED_PIXELS values at a time (objects in
    chunks, read in two passes: the best colour match first); the result is that of one pass (ties go to
    the earlier object, as in argmax_masks)."""
    n = len(objects.ids)
    if n == 0:
        return objects
    device = record.ids.device
    wanted = torch.as_tensor(objects.ids, device=device)
    index = torch.nonzero(wanted[:, None] == record.ids[0][None, :])[:, 1]      # (n,) their rows, in order
    seen = F.interpolate(frame[None].float().to(device), size=(region.h, region.w), mode="bilinear",
                         align_corners=False)[0]                               # (3, h, w)
    per = max(1, PLACED_PIXELS // (4 * region.w * region.h))
    chunks = [(start, index[start:start + per]) for start in range(0, n, per)]
    kept = {}                                                                   # one chunk: placed once, read twice
    yields = [(loser, keeper, torch.as_tensor(pixels, device=device))
              for loser, keeper, pixels in yielded_overlaps(objects, previous, region, shared_iou)]
    keepers = {keeper for _, keeper, _ in yields}
    keeper_error = {}                                                           # keeper -> its colour error (h, w)

    def placed(start, part):
        """alpha * z_pres, the mask alpha > MASK_THRESHOLD, importance w and squared colour error of the
        objects `part`, each (k, h, w)."""
        if start in kept:
            return kept[start]
        z_where, pres = record.z_where[0, part].float(), record.z_pres[0, part].float()
        alpha = spatial_transform(record.alpha_glimpse[0, part].float(), z_where, (len(part), 1, region.h, region.w),
                                  inverse=True)[:, 0]
        colour = spatial_transform(record.glimpse[0, part].float(), z_where, (len(part), 3, region.h, region.w),
                                   inverse=True)                                # (k, 3, h, w)
        weight = alpha * (pres * torch.sigmoid(-record.z_depth[0, part].float()))[:, None, None]
        result = alpha * pres[:, None, None], alpha > MASK_THRESHOLD, weight, colour.sub_(seen).square_().sum(1)
        if len(chunks) == 1:
            kept[start] = result
        return result

    alpha_sum = torch.zeros(region.h, region.w, device=device)                 # sum of alpha * z_pres
    weight_sum, best = torch.zeros_like(alpha_sum), torch.zeros_like(alpha_sum)
    match = torch.full_like(alpha_sum, float("inf"))                            # best colour error under a mask
    owner = torch.full_like(alpha_sum, -1, dtype=torch.long)                  # largest w; -1: none
    for start, part in chunks:
        alpha_pres, covered, weight, error = placed(start, part)
        alpha_sum += alpha_pres.sum(0)
        weight_sum += weight.sum(0)
        top, top_index = weight.max(0)
        better = top > best
        best, owner = torch.where(better, top, best), torch.where(better, top_index + start, owner)
        match = torch.minimum(match, torch.where(covered, error, float("inf")).min(0).values)
        keeper_error.update({j: error[j - start].clone() for j in keepers if start <= j < start + len(part)})
    alpha_map = alpha_sum.clamp(max=1)
    shown = alpha_map * best / weight_sum.clamp_min(1e-12) > 1 - alpha_map   # ties: the background
    front, front_owner = torch.full_like(alpha_sum, -1.0), owner.clone()
    yielded = {}                                                                # object -> pixels it yields (h, w)
    for loser, keeper, pixels in yields:                                       # where the keeper's colour matches
        pixels = pixels & (keeper_error[keeper] <= match + COLOUR_MARGIN)
        yielded[loser] = yielded[loser] | pixels if loser in yielded else pixels
    for start, part in chunks:                                                 # the front one among good matches
        _, covered, weight, error = placed(start, part)
        good = covered & (error <= match + COLOUR_MARGIN)                       # (k, h, w)
        for j in yielded.keys() & range(start, start + len(part)):
            good[j - start] &= ~yielded[j]
        top, top_index = torch.where(good, weight, -2.0).max(0)
        better = top > front
        front, front_owner = torch.where(better, top, front), torch.where(better, top_index + start, front_owner)
    owner = torch.where(shown, torch.where(torch.isfinite(match), front_owner, owner), -1).cpu().numpy()
    masks = np.zeros((n, height, width), dtype=bool)
    masks[:, region.y:region.y + region.h, region.x:region.x + region.w] = owner[None] == np.arange(n)[:, None, None]
    keep = masks.sum(axis=(1, 2)) >= min_area
    return Objects(ids=objects.ids[keep], xywh=objects.xywh[keep], masks=masks[keep], conf=objects.conf[keep],
                   invisible=objects.invisible + int((~keep).sum()))


def renumbered(objects: Objects, numbers: dict) -> Objects:
    """The objects with the ids written: the model numbers every object it draws, those below the z_pres
    threshold too, so a video's written ids are 1, 2, ... in order of first appearance (`numbers`, kept
    across the video's frames, maps the model's ids to them)."""
    ids = [numbers.setdefault(i, len(numbers) + 1) for i in objects.ids.tolist()]
    return dataclasses.replace(objects, ids=np.array(ids, dtype=np.int64))


def boxed(objects: Objects, box: str) -> Objects:
    """The objects without masks, their xywh the chosen box: 'tight' (of the mask) or 'glimpse'."""
    xywh = objects.tight if box == "tight" else objects.xywh
    return Objects(ids=objects.ids, xywh=np.asarray(xywh, dtype=np.float64).reshape(-1, 4),
                   masks=np.zeros((len(objects.ids), 0, 0), dtype=bool), conf=objects.conf)


def box_overlap(boxes: np.ndarray, i: int, k: int) -> tuple:
    """(x0, y0, x1, y1) where boxes i and k (rows x, y, w, h of whole pixels) overlap; empty when x1 <= x0 or y1 <= y0."""
    x0, y0 = max(boxes[i, 0], boxes[k, 0]), max(boxes[i, 1], boxes[k, 1])
    return (x0, y0, min(boxes[i, 0] + boxes[i, 2], boxes[k, 0] + boxes[k, 2]),
            min(boxes[i, 1] + boxes[i, 3], boxes[k, 1] + boxes[k, 3]))


def mask_overlap(objects: Objects, boxes: np.ndarray, areas: np.ndarray, i: int, k: int) -> float:
    """Mask IoU of objects i and k, counted on their boxes' overlap only (the masks of a large video are
    not multiplied whole). boxes (n, 4) x, y, w, h whole pixels; areas (n,) mask pixels (> 0)."""
    x0, y0, x1, y1 = box_overlap(boxes, i, k)
    if x1 <= x0 or y1 <= y0:
        return 0.0
    inter = np.logical_and(objects.masks[i, y0:y1, x0:x1], objects.masks[k, y0:y1, x0:x1]).sum()
    return float(inter / (areas[i] + areas[k] - inter))


class DuplicateFilter:
    """Not in the reference: leaves the second tracks of an object out of a video's frames.

    The model sometimes follows one object with two tracks (a proposal that the rejection let through,
    propagated since). Two tracks are taken for one object in a frame where their masks overlap at
    IoU >= max_iou and have overlapped so in most (over half) of the frames in which both were predicted:
    second tracks overlap their object from birth or for good, objects that cross overlap briefly. The
    younger track (first predicted later; in the same frame, the larger id) is left out of that frame,
    so the older keeps the object and its id. Call it on a video's frames in order; max_iou 0 keeps all."""

    def __init__(self, max_iou: float):
        self.max_iou = max_iou
        self.frame = 0
        self.born = {}                                 # id -> the frame it was first predicted in
        self.together = collections.Counter()          # (older id, younger id) -> frames both were predicted in
        self.overlapping = collections.Counter()       # ... and their masks overlapped at IoU >= max_iou

    def __call__(self, objects: Objects) -> Objects:
        ids = objects.ids.tolist()
        for i in ids:
            self.born.setdefault(i, self.frame)
        self.frame += 1
        if self.max_iou <= 0 or len(ids) < 2:
            return objects
        boxes, areas = objects.tight.astype(int), objects.masks.sum(axis=(1, 2))
        order = sorted(range(len(ids)), key=lambda i: (self.born[ids[i]], ids[i]))     # oldest first
        same = set()                                   # (older index, younger index) taken for one object now
        for a, i in enumerate(order):
            for k in order[:a]:
                pair = (ids[k], ids[i])
                self.together[pair] += 1
                if mask_overlap(objects, boxes, areas, i, k) >= self.max_iou:
                    self.overlapping[pair] += 1
                    if 2 * self.overlapping[pair] > self.together[pair]:
                        same.add((k, i))
        kept = []
        for i in order:
            if not any((k, i) in same for k in kept):  # only a kept track hides a younger one
                kept.append(i)
        if len(kept) == len(ids):
            return objects                             # the same frame, its tight boxes computed already
        kept.sort()
        return Objects(ids=objects.ids[kept], xywh=objects.xywh[kept], masks=objects.masks[kept],
                       conf=objects.conf[kept], invisible=objects.invisible)


# ------------------------------------------------------------------------------------------------
# Writers
# ------------------------------------------------------------------------------------------------

class MasksWriter:
    """Streams `<name>_masks.json`: one frame's entry at a time."""

    def __init__(self, path: str, source: Source):
        self.file = open(path, "w")
        head = {"video": str(source.path), "width": source.width, "height": source.height}
        self.file.write(json.dumps(head)[:-1] + ', "frames": [')
        self.count = 0

    def add(self, t: int, objects: Objects) -> None:
        entry = prediction_entries([objects])[0]
        entry["frame"] = t
        self.file.write((", " if self.count else "") + json.dumps(entry))
        self.count += 1

    def close(self) -> None:
        self.file.write(f'], "num_frames": {self.count}}}\n')
        self.file.close()


class VideoWriter:
    """`--video-out`: frames with the boxes drawn, encoded by ffmpeg (H.264 .mp4 or .gif); a small video
    is upscaled by a whole factor (nearest) so the ids stay legible."""

    def __init__(self, path: str, kind: str, width: int, height: int, fps: float):
        self.scale = max(1, math.ceil(VIDEO_MIN_SIDE / min(width, height)))
        width, height = width * self.scale, height * self.scale
        self.width, self.height = width + width % 2, height + height % 2     # H.264 4:2:0 needs even sides
        params = dict(codec="libx264", pix_fmt_out="yuv420p") if kind == "mp4" else dict(codec="gif", pix_fmt_out="rgb8")
        self.writer = ffmpeg_reader().write_frames(path, (self.width, self.height), fps=fps, macro_block_size=1,
                                                   quality=None, **params)
        self.writer.send(None)

    def add(self, image: Image.Image, objects: Objects) -> None:
        canvas = Image.new("RGB", (self.width, self.height))
        if self.scale > 1:
            image = image.resize((image.width * self.scale, image.height * self.scale), Image.NEAREST)
        canvas.paste(draw_objects(image, objects, self.scale), (0, 0))
        self.writer.send(np.ascontiguousarray(np.asarray(canvas, dtype=np.uint8)).tobytes())

    def close(self) -> None:
        self.writer.close()


# ------------------------------------------------------------------------------------------------
# Tracking
# ------------------------------------------------------------------------------------------------

def run_windows(model, items, window: int, step: int, tau: float, device, frame=lambda item: item):
    """Run the model over a video in windows of `window` frames, the recurrent state handed from each
    window to the next (the same numbers as one forward over the whole video). `items` yields one item
    a frame, `frame(item)` its (3, img_h, img_w) input; yields (item, FrameRecord of batch 1) per frame,
    in order. Call it under torch.no_grad()."""
    state, batch = None, []

    def forward():
        nonlocal state
        out = model(torch.stack([frame(item) for item in batch])[None].to(device), step, tau, keep_records=True,
                    state=state)
        state = out.state
        return list(zip(batch, out.records))

    for item in items:
        batch.append(item)
        if len(batch) == window:
            yield from forward()
            batch = []
    if batch:
        yield from forward()


def track_video(model, source: Source, name: str, out_dir: str, opts, step: int, tau: float, device, bar) -> dict:
    """Run the model over one whole video in windows, handing the state across; write its files.
    Returns its summary for track.json."""
    cfg = model.cfg
    region = opts.region or Region(0, 0, source.width, source.height)
    seed_everything(opts.seed)      # each video the same draws whatever came before it
    frames = []                     # boxes per frame, no masks
    masks = MasksWriter(os.path.join(out_dir, f"{name}_masks.json"), source)
    video = None
    if opts.video_out:
        video = VideoWriter(os.path.join(out_dir, f"{name}.{opts.video_out}"), opts.video_out, source.width,
                            source.height, source.fps or DEFAULT_OUT_FPS)
    duplicates = DuplicateFilter(opts.duplicate_iou)
    numbers = {}                    # the model's object id -> the id written: 1, 2, ... by first appearance
    previous = None                 # the previous frame's visible objects (--masks visible), the model's ids
    images = ((image if video is not None else None, resize_frame(image, region.box, cfg.img_h, cfg.img_w))
              for image in source.read())          # the full-size frame is kept for --video-out only
    try:
        with torch.no_grad():
            for (image, frame), record in run_windows(model, images, opts.window, step, tau, device,
                                                      frame=lambda i: i[1]):
                objects = video_objects(record, region, source.width, source.height, opts.z_pres_threshold)
                objects = duplicates(objects)
                if opts.masks == "visible":
                    objects = previous = visible_objects(record, objects, frame, region, source.width,
                                                         source.height, previous=previous,
                                                         shared_iou=opts.duplicate_iou)
                objects = renumbered(objects, numbers)
                masks.add(frame_number(source, len(frames)) - 1, objects)
                frames.append(boxed(objects, opts.box))
                if video is not None:
                    video.add(image, frames[-1])
                bar.update(1)
    finally:
        masks.close()
        if video is not None:
            video.close()
    write_tracks(os.path.join(out_dir, f"{name}.txt"), frames,
                 [frame_number(source, t) for t in range(len(frames))])
    ids = sorted({int(i) for f in frames for i in f.ids})
    detections = [len(f.ids) for f in frames]
    return {"source": str(source.path), "width": source.width, "height": source.height, "frames": len(frames),
            "frames_announced": source.num_frames if source.frames is None else None,
            "detections": sum(detections), "objects": len(ids), "detections_after_first_frame": sum(detections[1:]),
            "continued_detections": continued_detections(frames)}


def frame_number(source: Source, t: int) -> int:
    """The 1-based MOTChallenge number of the video's t-th frame read (0-based)."""
    return source.numbers[t] if source.numbers is not None else t + 1


def cut_off_notice(video: dict) -> str | None:
    """A notice when a video file ended well before the frame count its header announces (a file cut
    off while copying decodes up to the cut without an error)."""
    announced = video.get("frames_announced")
    if announced and video["frames"] < CUT_OFF_SHARE * announced:
        return (f"notice: '{video['source']}' ended after {video['frames']} frames where its header announces about "
                f"{announced}: the file may be cut off; check it (or re-encode it) and track it again")
    return None


def continued_detections(frames: list) -> int:
    """Detections whose id was in the frame before (of a video's frames, Objects each)."""
    return sum(len(set(before.ids.tolist()) & set(now.ids.tolist())) for before, now in zip(frames, frames[1:]))


def tracking_notice(videos: dict) -> str | None:
    """A notice when few detections after each video's first frame continue a track (track.json's
    videos): the model finds its objects anew in every frame, so each gets a new id."""
    later = sum(v["detections_after_first_frame"] for v in videos.values())
    continued = sum(v["continued_detections"] for v in videos.values())
    if later < 10 or continued >= LOW_TRACKED_SHARE * later:
        return None
    return (f"notice: only {continued} of the {later} detections after the first frames continue a track from the "
            f"frame before: this model finds objects anew in every frame and has not learned to track "
            f"(train.py's train/tracked_share; README: 'When the foreground does not learn')")


def parse_crop(text: str | None) -> Region | None:
    if text is None:
        return None
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise TrackError(f"--crop '{text}' must be four whole numbers X,Y,W,H (pixels)") from None
    if x < 0 or y < 0 or w < 1 or h < 1:
        raise TrackError(f"--crop '{text}': need X, Y >= 0 and W, H >= 1")
    return Region(x, y, w, h)


def parse_args(argv):
    p = Parser(
        prog="track.py", description="Track the objects of whole videos with a trained SCALOR: MOTChallenge tracks "
        "and RLE masks in the video's pixels, one id per object for the whole video.",
        epilog="Options marked 'not in the reference' are inference rules the reference implementation lacks. "
               "Defaults: first-frame rejection on (two neighbouring cells claiming one object in the first "
               "frame would otherwise both be tracked: docs/PERF_NOTES.md measures it); z_pres threshold 0.5, evaluate.py's rule (scripts/compare_track_export.py "
               "--thresholds measures others).")
    p.add_argument("videos", nargs="*", metavar="VIDEO",
                   help="a folder of frames, a folder of such folders or of video files, or a video file "
                        f"({' '.join(VIDEO_EXTENSIONS)})")
    p.add_argument("--checkpoint", help="a .pt file written by train.py")
    p.add_argument("--out", default="tracks", help="output folder (default: tracks); written whole at the end, an "
                   "existing non-empty one is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (never one holding the inputs)")
    p.add_argument("--window", type=int, default=None,
                   help="frames per forward; the state is handed from window to window, so this changes "
                        "speed and memory, never the tracks (default: the checkpoint's seq_len)")
    p.add_argument("--box", choices=("tight", "glimpse"), default="tight",
                   help="box written: 'tight' box of the object's mask (default) or its 'glimpse' box z_where")
    p.add_argument("--z-pres-threshold", type=float, default=PRES_THRESHOLD,
                   help=f"not in the reference (it exports no tracks): an object is written where z_pres > this "
                        f"(default {PRES_THRESHOLD}, as evaluate.py counts predictions); it changes which objects are "
                        "written, not what the model tracks")
    p.add_argument("--first-frame-rejection", action=argparse.BooleanOptionalAction, default=None,
                   help="not in the reference: also reject first-frame proposals explained by kept proposals of "
                        "larger z_pres, so no object is born twice in the first frame (default: on for tracking, "
                        "unless the checkpoint has phase_rejection off)")
    p.add_argument("--duplicate-iou", type=float, default=DUPLICATE_IOU,
                   help="not in the reference: leave out a second track of one object: in a frame where its mask "
                        "overlaps an older track's at IoU >= this, as it did in most of the frames both "
                        f"were in (objects that cross overlap briefly; default {DUPLICATE_IOU}; 0 keeps all); "
                        "with --masks visible, of two masks overlapping so in one frame, the object that showed "
                        "more of the overlap in the frame before keeps it where its colour matches (0: never)")
    p.add_argument("--masks", choices=MASK_READINGS, default="visible",
                   help="not in the reference: the masks (and tight boxes) written: 'visible', the pixels where "
                        "each object shows: a pixel of the model's composite (as evaluate.py --protocol ocrb reads "
                        "it) goes to the object in front among those whose own mask covers it and whose decoded "
                        "colour there is near the best match with the frame, and where two tracks cover one "
                        "object, to the one that showed it before (disjoint; a second track gets none of "
                        "its object's pixels, and an object left with fewer than 5 pixels is not written, whatever "
                        "--box; default), or 'alpha', the object's own decoded alpha > 0.5 (whole shapes, overlapping)")
    p.add_argument("--video-out", choices=("mp4", "gif"), default=None,
                   help="also write each video with id-coloured boxes (H.264 .mp4 or .gif)")
    p.add_argument("--crop", default=None, metavar="X,Y,W,H",
                   help="track only this region of every frame (pixels; default: the whole frame, resized to "
                        "the model's size); boxes and masks stay in the whole frame's pixels")
    p.add_argument("--score", default=None, metavar="GT_DIR",
                   help="score the tracks against MOTChallenge ground truth GT_DIR/<name>.txt (writes score.json); "
                        "without VIDEO: score the tracks already in --out")
    p.add_argument("--skip-bad-frames", action="store_true",
                   help="drop unreadable frames of frame folders (each decoded first) instead of stopping; their "
                        "frame numbers stay unused in the tracks")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of the model's sampling (set again for every video)")
    args = p.parse_args(argv)
    if not args.videos and args.score is None:
        raise TrackError("pass at least one VIDEO (and --checkpoint), or --score GT_DIR to score tracks in --out")
    if args.videos and args.checkpoint is None:
        raise TrackError("--checkpoint is required to track: pass a .pt file written by train.py")
    if args.window is not None and args.window < 1:
        raise TrackError(f"--window must be positive, got {args.window}")
    if not 0 <= args.duplicate_iou <= 1:
        raise TrackError(f"--duplicate-iou must lie in [0, 1] (0 keeps all objects), got {args.duplicate_iou}")
    if not 0 < args.z_pres_threshold < 1:
        raise TrackError(f"--z-pres-threshold must lie strictly between 0 and 1, got {args.z_pres_threshold}")
    args.region = parse_crop(args.crop)
    return args


def check_out(args) -> None:
    """TrackError unless tracking may write --out (utils.out_folder_problem): a folder that does not exist
    yet, an empty one, or (--overwrite) any folder that holds none of the inputs (videos, checkpoint,
    ground truth)."""
    problem = out_folder_problem(args.out, args.overwrite, [*args.videos, args.checkpoint, args.score])
    if problem:
        raise TrackError(problem)


def prepare(argv):
    """Parse and check everything before anything is written: (args, model, payload, sources, names, device)."""
    args = parse_args(argv)
    if args.videos:
        check_out(args)
    elif os.path.isfile(args.out):
        raise TrackError(f"--out '{args.out}' is a file, not a folder: pass the --out of a track.py run")
    if args.score is not None and not os.path.isdir(args.score):
        raise TrackError(f"--score '{args.score}' is not a folder: pass the folder of ground-truth <name>.txt files")
    if not args.videos:
        if not os.path.isdir(args.out):
            raise TrackError(f"--out '{args.out}' is not a folder of tracks to score: pass the --out of a track.py run")
        return args, None, None, [], [], None
    device = pick_device(args.device)
    model, payload = load_model_checked(args)
    if args.window is None:
        args.window = model.cfg.seq_len
    sources = [s for arg in args.videos for s in find_sources(arg, args.skip_bad_frames)]
    names = unique_names([s.name for s in sources])
    region = args.region
    for source in sources:
        if region is not None and (region.x + region.w > source.width or region.y + region.h > source.height):
            raise TrackError(f"--crop {region.w}x{region.h} at ({region.x},{region.y}) does not fit the "
                             f"{source.width}x{source.height} frames of '{source.path}': pass a crop inside them")
    if args.score is not None and not any(os.path.isfile(os.path.join(args.score, f"{n}.txt")) for n in names):
        raise TrackError(f"--score '{args.score}' holds no ground truth for these videos: it needs <name>.txt files "
                         f"named as the tracks ({', '.join(n + '.txt' for n in names[:3])}{', ...' if len(names) > 3 else ''})")
    if args.score is not None:
        check_ground_truth(args.score, names, {n: s.length for n, s in zip(names, sources) if s.length is not None})
    return args, model.to(device), payload, sources, names, device


def load_model_checked(args):
    return load_model_for_inference(args.checkpoint, "cpu", args.first_frame_rejection)


def data_notice(payload, args) -> str | None:
    trained = payload.get("data") if isinstance(payload.get("data"), dict) else {}
    if trained.get("dataset") == "grandcentral" and args.region is None:
        return ("notice: this model was trained on square crops of Grand Central frames; the whole frame is "
                "resized to the model's input: pass --crop X,Y,W,H (e.g. --crop 240,240,240,240) to track a square region")
    if trained.get("frame_skip") not in (None, 1):
        return (f"notice: this model was trained on one frame in {trained['frame_skip']}; track.py feeds every "
                f"frame (pass a video subsampled the same way for motion like training's)")
    return None


def main(argv=None, prog: str = "track.py") -> int:
    try:
        args, model, payload, sources, names, device = prepare(argv)
    except SystemExit as e:   # argparse: usage error (already printed) or --help
        return int(e.code or 0)
    except (TrackError, CheckpointError, DataError, ConfigError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if not sources:           # --score only
        try:
            return print_score(score_folder(args.out, args.score), args.out)
        except (TrackError, DataError) as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 2
    cfg = model.cfg
    step = int(payload.get("step", 0))
    tau = tau_at(cfg, step)
    notice = data_notice(payload, args)
    if notice:
        print(notice)
    out = os.path.abspath(args.out)
    try:
        tmp, made = work_folder(out, "partial")
    except OSError as e:
        print(f"{prog}: error: cannot write into '{os.path.dirname(out)}' ({e.strerror or type(e).__name__}): "
              f"pass an --out in a writable folder", file=sys.stderr)
        return 2
    summary = {"checkpoint": os.path.abspath(args.checkpoint), "step": step, "tau": tau,
               "image_size": [cfg.img_h, cfg.img_w], "window": args.window, "box": args.box,
               "z_pres_threshold": args.z_pres_threshold, "first_frame_rejection": cfg.first_frame_rejection,
               "duplicate_iou": args.duplicate_iou, "masks": args.masks,
               "min_area": MIN_GT_AREA, "crop": None if args.region is None else list(args.region.box),
               "seed": args.seed, "videos": {}}
    known = [s.num_frames for s in sources]
    total = sum(known) if all(n is not None for n in known) else None
    start = time.perf_counter()
    try:
        with sigterm_as_interrupt(), tqdm(total=total, unit="frame", desc="track", file=sys.stderr) as bar:
            for source, name in zip(sources, names):
                bar.set_postfix_str(name)
                summary["videos"][name] = track_video(model, source, name, tmp, args, step, tau, device, bar)
            seconds = time.perf_counter() - start
            num_frames = sum(v["frames"] for v in summary["videos"].values())
            summary["seconds"], summary["frames_per_second"] = seconds, num_frames / max(seconds, 1e-9)
            with open(os.path.join(tmp, "track.json"), "w") as f:
                json.dump(summary, f, indent=2)
        move_into_place(tmp, out)
    except KeyboardInterrupt as e:
        print(interrupted_message(prog, e, args.out), file=sys.stderr)
        return 130
    except DataError as e:    # a frame found corrupt while reading it (setup checks headers only)
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:      # a full disk or a folder that became unwritable: nothing moved into --out
        print(f"{prog}: error: cannot write the tracks into '{os.path.dirname(out)}' ({e.strerror or type(e).__name__}): "
              f"disk full / not writable; free space or pass another --out", file=sys.stderr)
        return 2
    finally:
        discard_work(tmp, made)        # gone already once moved into place
    for name, video in summary["videos"].items():
        print(f"{name}: {video['frames']} frames, {video['objects']} objects, {video['detections']} detections")
    for video in summary["videos"].values():
        if notice := cut_off_notice(video):
            print(notice)
    print(f"tracked {num_frames} frames of {len(sources)} videos in {seconds:.1f} s "
          f"({summary['frames_per_second']:.1f} frames/s); wrote {args.out}")
    if notice := tracking_notice(summary["videos"]):
        print(notice)
    if args.score is not None:
        try:
            lengths = {n: s.length or summary["videos"][n]["frames"] for n, s in zip(names, sources)}
            return print_score(score_folder(args.out, args.score, names, lengths), args.out)
        except (TrackError, DataError) as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 2
    return 0


# ------------------------------------------------------------------------------------------------
# Scoring MOTChallenge files
# ------------------------------------------------------------------------------------------------

def whole_number(text: str) -> int:
    """The integer a MOTChallenge field holds ('3' or '3.0'); ValueError for anything else (2.5, inf, nan)."""
    value = float(text)
    if not math.isfinite(value) or value != int(value):
        raise ValueError(text)
    return int(value)


def read_mot(path, ground_truth: bool = False) -> dict:
    """{frame (1-based): (ids (n,) int64, xywh (n, 4) float64)} of a MOTChallenge file
    `frame,id,x,y,w,h,conf,...`; ground truth: lines with conf 0 (MOTChallenge's 'ignore') are left out."""
    rows = {}
    try:
        with open(path, encoding="utf-8-sig") as f:     # a byte-order mark at the start is not part of line 1
            lines = f.readlines()
    except OSError as e:
        raise DataError(f"cannot read '{path}' ({e.strerror or type(e).__name__}): make it readable") from None
    except UnicodeDecodeError:
        raise DataError(f"'{path}' is not a UTF-8 text file: pass MOTChallenge .txt files") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        values = line.strip().split(",")
        try:
            frame, obj_id = whole_number(values[0]), whole_number(values[1])
            box = [float(v) for v in values[2:6]]
            conf = float(values[6]) if len(values) > 6 else 1.0
        except (ValueError, IndexError):
            raise DataError(f"'{path}' line {number} is not a MOTChallenge line frame,id,x,y,w,h,conf,...: "
                            f"'{line.strip()[:60]}'") from None
        if len(box) < 4 or not 1 <= frame <= MAX_MOT_FRAME or not abs(obj_id) < 2**63 \
                or not all(map(math.isfinite, box)) or box[2] < 0 or box[3] < 0:
            raise DataError(f"'{path}' line {number}: need a frame 1..{MAX_MOT_FRAME:,}, an integer id and four "
                            f"finite box values x,y,w,h with w, h >= 0: '{line.strip()[:60]}'")
        if ground_truth and conf == 0:
            continue
        if any(i == obj_id for i, _ in rows.get(frame, ())):
            raise DataError(f"'{path}' line {number}: id {obj_id} appears twice in frame {frame}: one line per "
                            f"object and frame")
        rows.setdefault(frame, []).append((obj_id, box))
    return {t: (np.array([i for i, _ in r], dtype=np.int64), np.array([b for _, b in r], dtype=np.float64))
            for t, r in rows.items()}


def check_ground_truth(gt_dir: str, names: list, lengths: dict | None = None) -> None:
    """DataError / TrackError (one line) unless gt_dir/<name>.txt of the given names read as MOTChallenge
    ground truth holding at least one object, none in a frame past its video's length (`lengths`: {name:
    frames}, where known): checked before tracking, so a bad file costs no run."""
    num_objects = 0
    for name in names:
        path = os.path.join(gt_dir, f"{name}.txt")
        if not os.path.isfile(path):
            continue
        rows = read_mot(path, ground_truth=True)
        num_objects += sum(len(ids) for ids, _ in rows.values())
        length = (lengths or {}).get(name)
        if length is not None and rows and max(rows) > length:
            raise TrackError(f"'{path}' has objects up to frame {max(rows)}, but video '{name}' has {length} frames: "
                             f"pass the ground truth of this video")
    if num_objects == 0:
        raise TrackError(f"the ground truth in '{gt_dir}' for these videos holds no objects (lines with conf 0 are "
                         f"ignored): nothing to score; pass the ground truth of these videos")


def mot_frames(rows: dict, num_frames: int) -> list:
    """Per frame 1..num_frames (ids, xywh), empty frames included."""
    empty = (np.zeros(0, dtype=np.int64), np.zeros((0, 4)))
    return [rows.get(t, empty) for t in range(1, num_frames + 1)]


def score_files(gt_paths: list, pred_paths: list, names: list | None = None) -> dict:
    """Tracking metrics (evaluate.summarize) of prediction files against ground-truth files, pairwise;
    box IoU >= 0.5 matching; a missing prediction file counts as no predictions."""
    accs = []
    for gt_path, pred_path in zip(gt_paths, pred_paths):
        gt = read_mot(gt_path, ground_truth=True)
        pred = read_mot(pred_path) if os.path.isfile(pred_path) else {}
        num_frames = max([0, *gt, *pred])
        accs.append(accumulate(mot_frames(gt, num_frames), mot_frames(pred, num_frames), iou_matrix_distance))
    return summarize(accs, names)


def score_folder(pred_dir: str, gt_dir: str, names: list | None = None, lengths: dict | None = None) -> dict:
    """{"overall": metrics, "videos": {name: metrics}, "missing": [name]} of pred_dir/<name>.txt against
    gt_dir/<name>.txt, for the given names (default: every .txt in gt_dir); a missing track file counts as
    no detections (listed in "missing"); TrackError if every one is missing."""
    if names is None:
        names = sorted((p[:-4] for p in os.listdir(gt_dir) if p.endswith(".txt")), key=natural_key)
    names = [n for n in names if os.path.isfile(os.path.join(gt_dir, f"{n}.txt"))]
    if not names:
        raise TrackError(f"no ground-truth <name>.txt files in '{gt_dir}' for the tracked videos: name them as the "
                         f"tracks in --out are named")
    check_ground_truth(gt_dir, names, lengths)
    gt = [os.path.join(gt_dir, f"{n}.txt") for n in names]
    pred = [os.path.join(pred_dir, f"{n}.txt") for n in names]
    missing = [n for n, p in zip(names, pred) if not os.path.isfile(p)]
    if len(missing) == len(names):
        raise TrackError(f"no tracks in '{pred_dir}' are named as the ground truth in '{gt_dir}' "
                         f"({', '.join(n + '.txt' for n in names[:3])}{', ...' if len(names) > 3 else ''}): "
                         f"pass the --out of the track.py run that tracked these videos")
    return {"gt_dir": os.path.abspath(gt_dir), "overall": score_files(gt, pred, names),
            "videos": {n: score_files([g], [p], [n]) for n, g, p in zip(names, gt, pred)}, "missing": missing}


def print_score(score: dict, out: str) -> int:
    from evaluate import json_ready
    m = score["overall"]
    if score.get("missing"):
        print(f"notice: no tracks for {len(score['missing'])} of the {len(score['videos'])} ground-truth videos "
              f"({', '.join(score['missing'][:3])}{', ...' if len(score['missing']) > 3 else ''}): scored as no detections")
    print(f"MOTA {m['mota']:.4f}  MOTP IoU {m['motp_iou']:.4f}  IDF1 {m['idf1']:.4f}  id switches {m['id_switches']}  "
          f"false positives {m['false_positives']}  misses {m['misses']}  ({len(score['videos'])} videos)")
    if os.path.isdir(out):
        with open(os.path.join(out, "score.json"), "w") as f:
            json.dump(json_ready(score), f, indent=2)
    return 0


def ground_truth_file(path, frames: list) -> None:
    """Write per-frame ground truth Objects (evaluate.ground_truth_frames) as a MOTChallenge file (conf 1)."""
    write_tracks(path, [Objects(ids=f.ids, xywh=f.xywh, masks=f.masks, conf=np.ones(len(f.ids))) for f in frames])


# ------------------------------------------------------------------------------------------------
# evaluate.py --track
# ------------------------------------------------------------------------------------------------

def evaluate_alias(argv: list) -> int:
    """`evaluate.py --track --data-dir FRAMES --checkpoint CKPT --out DIR [--gif N] ...`: track.py on
    FRAMES (kept for old command lines; --gif N > 0 becomes --video-out gif for every video)."""
    p = Parser(prog="evaluate.py --track", description="alias of track.py (see python track.py --help)")
    p.add_argument("--track", action="store_true")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", default="tracks")
    p.add_argument("--gif", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--skip-bad-frames", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--first-frame-rejection", action=argparse.BooleanOptionalAction, default=None)
    try:
        a, rest = p.parse_known_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if rest:
        print(f"evaluate.py: error: {' '.join(rest)} not used with --track: run python track.py "
              f"(see python track.py --help)", file=sys.stderr)
        return 2
    if a.gif < 0:
        print(f"evaluate.py: error: --gif {a.gif} must not be negative (0: no gif)", file=sys.stderr)
        return 2
    flags = [a.data_dir, "--checkpoint", a.checkpoint, "--out", a.out, "--device", a.device, "--seed", str(a.seed)]
    flags += ["--skip-bad-frames"] * a.skip_bad_frames + ["--overwrite"] * a.overwrite + ["--video-out", "gif"] * (a.gif > 0)
    if a.first_frame_rejection is not None:
        flags.append("--first-frame-rejection" if a.first_frame_rejection else "--no-first-frame-rejection")
    return main(flags, prog="evaluate.py")


if __name__ == "__main__":
    sys.exit(main())
