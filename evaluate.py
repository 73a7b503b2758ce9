"""Evaluate a trained SCALOR: tracking, counting, reconstruction, likelihood and generation, with exports.

Usage:

    python evaluate.py --checkpoint CKPT [--dataset sprites|grandcentral|frames] [--data-dir DIR]
                       [--preset easy] [--frame-skip N] [--num-sequences N] [--batch-size B]
                       [--nll-samples K] [--out DIR] [--device auto|cpu|cuda] [--gif N] [--seed S]
                       [--workers W] [--protocol default|ocrb] [--ocrb-start-frame N]
                       [--[no-]first-frame-rejection]     # default on, as track.py infers
    python evaluate.py --aggregate eval_seed1/report.json eval_seed2/report.json ...
    python evaluate.py --track --data-dir FRAMES --checkpoint CKPT --out DIR [--gif N]   # = track.py FRAMES ...

The first form runs the model on a test split and writes `report.json` (and prints a summary):
sprite scenes drawn with seed 10000 for every run (`test_scene_seed`), Grand Central's last 10%
of frames, or non-overlapping sequences of a folder of frames; data flags left out default to the
training run's as its checkpoint records them (see `resolve_data`). The second prints the mean +- std
of every number over several report.json files; the third is an alias of `track.py` (whole videos in
windows with the state handed across; see its docstring). Bad input (a missing or
foreign checkpoint, missing data, a non-empty --out without --overwrite, an --out holding an input) prints one
line and exits with status 2, writing nothing. The first form writes everything into a temporary folder beside
--out and moves it into place at the end, so --out never holds a mix of two runs or a half-written file (an
existing one is replaced whole with --overwrite); Ctrl-C or SIGTERM exits 130 and leaves nothing.

Conventions:

- Boxes. The model's z_where = (sx, sy, tx, ty) spans x in [tx - sx, tx + sx] of the normalised
  frame [-1, 1]; in pixels x0 = (tx - sx + 1) / 2 * W, x1 = (tx + sx + 1) / 2 * W, y likewise with
  H. Pixel i covers [i, i + 1), so a ground-truth box (x, y, w, h) of whole pixels spans [x, x + w).
- Predictions of a frame: the rendered objects with z_pres > 0.5 whose mask has at least
  MIN_GT_AREA (5) pixels, the visibility rule of the ground truth (an object that draws nothing is
  no detection; the report counts those left out as `invisible_predictions`); an object's mask is
  its decoded alpha placed into the frame (`modules.spatial_transform`, inverse) and thresholded
  at 0.5. `duplicate_predictions` counts the predictions whose mask IoU with another of the same
  frame is at least 0.5 (one object claimed twice; every extra copy once).
- Ground truth (sprites only): an object counts in a frame when at least MIN_GT_AREA (5) of its
  pixels are visible; smaller ones are dropped from that frame for tracking, counting and the
  generation centre error.
- Tracking: one motmetrics accumulator per sequence, matching by IoU >= 0.5 of three kinds, each
  reported apart: `tracking_box`, the glimpse box z_where against the ground truth's tight box;
  `tracking_box_tight`, the tight box of the predicted mask against it (the glimpse is free to be
  larger than its object, so this compares like with like); `tracking_mask`, mask IoU. The
  distance is 1 - IoU. `motp_distance` is MOTP as motmetrics defines it (mean 1 - IoU of the
  matched pairs, MATCH and SWITCH events), pooled over all sequences; `motp_iou` = 1 - that (mean
  IoU). `mostly_tracked`: ground-truth objects matched
  without an id switch (motmetrics MATCH events) in >= 80% of the frames they are visible in;
  `mostly_detected`: matched by any prediction (MATCH or SWITCH) in >= 80% of them (what
  motmetrics itself calls mostly tracked); `partially_tracked` (20-80%) and `mostly_lost` (< 20%)
  are motmetrics' detection-based counts, so mostly_detected + partially_tracked + mostly_lost =
  num_unique_objects. These follow the object-centric representation benchmark (Weis et al. 2021).
  `by_frame` (`metrics.errors_by_frame`) counts objects, false positives, misses and id switches
  per frame index over all sequences: errors that grow along the sequence are drifting tracks.
- `--protocol ocrb` adds `tracking_ocrb`, that benchmark's own protocol (see `metrics.py`): each
  pixel goes to the object (or background) of the largest share of the composite (argmax), masks
  of more than 5 pixels, mask IoU >= 0.5, frames from --ocrb-start-frame (2) on, one accumulator
  pooled over all sequences, numbers in percent; `errors` splits its misses and false positives by
  `metrics.error_kinds` (not in the benchmark): objects merged into one prediction with a neighbour,
  found inexactly (IoU 0.2-0.5) or unseen; predictions that merge two objects, duplicate one, find
  one inexactly, or none. `--aggregate` prints the mean +- std of every number over several
  report.json files (the benchmark reports training seeds that way).
- Exports (`<seq>`: the sequence's name made file-name safe and unique by `utils.unique_names`):
  `tracks_<seq>.txt` in the MOTChallenge layout `frame,id,x,y,w,h,conf,-1,-1,-1` (frame
  1-based within the sequence, pixels of the model's img_w x img_h frames, conf = z_pres); `predictions.json` =
  {"<seq>": [{"frame": t (0-based), "masks": [RLE], "ids": [id]}, ...]}; masks are run-length
  encoded as the object-centric representation benchmark reads them: the mask flattened in
  row-major (C) order, then "start length" pairs of its runs of ones, starts 1-based, all joined
  by single spaces ("" for an empty mask); `gif_<seq>.gif` shows input | reconstruction | tracked
  boxes with ids | background | conditional generation.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Subset
from tqdm import tqdm

import fast
from common import ConfigError
from checkpoints import CheckpointError, load_model_state, read_checkpoint
from data import (DATASET_KINDS, DataError, FrameFolder, GrandCentral, MovingSprites, SPRITE_PRESETS, build_dataset,
                  check_preset, iterate, make_loader, one_line)
from metrics import (OCRB_START_FRAME, OcrbAccumulator, accumulate, aggregate_table, argmax_masks,  # noqa: F401
                     box_centres, count_duplicates, count_metrics, iou_matrix_distance, mask_boxes, mask_iou_distance,
                     match_centres, rle_decode, rle_encode, summarize, xyxy_to_xywh)   # (iou_matrix_distance, rle_decode: for importers)
from modules import spatial_transform
import viz
from scalor import SCALOR
from utils import (Parser, discard_work, interrupted_message, move_into_place, out_folder_problem, pick_device, seed_arg,
                   seed_everything, sigterm_as_interrupt, tau_at, unique_names, work_folder)

MIN_GT_AREA = 5            # ground-truth objects with fewer visible pixels are ignored in a frame
PRES_THRESHOLD = 0.5       # an object is predicted where z_pres > this
MASK_THRESHOLD = 0.5       # a pixel belongs to an object's mask where its placed alpha > this
TEST_SEED = 10_000         # sprite test scenes are drawn from this seed for every run (training: cfg.seed)
GIF_MIN_SIDE = 128         # GIF panels are upscaled (nearest) to at least this many pixels a side


class EvalError(Exception):
    """Bad command-line input; the one-line message says what to fix."""


# ------------------------------------------------------------------------------------------------
# Boxes and masks
# ------------------------------------------------------------------------------------------------

def box_to_pixels(z_where, H: int, W: int) -> np.ndarray:
    """(..., 4) boxes (sx, sy, tx, ty) in normalised coordinates -> (..., 4) pixel corners (x0, y0, x1, y1)."""
    z = np.asarray(z_where.detach().cpu() if torch.is_tensor(z_where) else z_where, dtype=np.float64)
    sx, sy, tx, ty = z[..., 0], z[..., 1], z[..., 2], z[..., 3]
    return np.stack(((tx - sx + 1) / 2 * W, (ty - sy + 1) / 2 * H,
                     (tx + sx + 1) / 2 * W, (ty + sy + 1) / 2 * H), axis=-1)


# ------------------------------------------------------------------------------------------------
# Model outputs and ground truth as per-frame objects
# ------------------------------------------------------------------------------------------------

@dataclass
class Objects:
    """The objects of one frame: ids (n,), xywh (n, 4) pixels, masks (n, H, W) bool, conf (n,).

    Predictions: xywh is the glimpse box z_where; ground truth: the tight box of the visible mask.
    `tight` is always the tight box of the mask (computed once: the fields are not changed after)."""
    ids: np.ndarray
    xywh: np.ndarray
    masks: np.ndarray
    conf: np.ndarray = field(default_factory=lambda: np.zeros(0))
    invisible: int = 0          # predictions with z_pres > 0.5 left out for drawing < MIN_GT_AREA pixels

    @functools.cached_property
    def tight(self) -> np.ndarray:
        return mask_boxes(self.masks)

    @property
    def count(self) -> int:
        return len(self.ids)


def placed_masks(alpha_glimpse: torch.Tensor, z_where: torch.Tensor, H: int, W: int) -> np.ndarray:
    """Glimpse alphas (n, 1, G, G) placed at boxes z_where (n, 4), thresholded: (n, H, W) bool."""
    n = alpha_glimpse.shape[0]
    if n == 0:
        return np.zeros((0, H, W), dtype=bool)
    alpha = spatial_transform(alpha_glimpse.float(), z_where.float(), (n, 1, H, W), inverse=True)
    return (alpha[:, 0] > MASK_THRESHOLD).cpu().numpy()


def frame_predictions(record, H: int, W: int, min_area: int = MIN_GT_AREA,
                      pres_threshold: float = PRES_THRESHOLD) -> list:
    """A FrameRecord (batch B) -> [Objects] per sequence: the entries with z_pres > pres_threshold
    (PRES_THRESHOLD, 0.5) whose mask has at least `min_area` pixels (the visibility rule of the ground
    truth: an object that draws nothing is not a detection)."""
    result = []
    for b in range(record.z_pres.shape[0]):
        index = torch.nonzero(record.z_pres[b] > pres_threshold).flatten().cpu()      # z_pres > 0.5
        masks = placed_masks(record.alpha_glimpse[b][index], record.z_where[b][index], H, W)
        visible = masks.sum(axis=(1, 2)) >= min_area
        index = index[torch.from_numpy(visible)]                                     # ... and visible
        result.append(Objects(ids=record.ids[b][index].cpu().numpy().astype(np.int64),
                              xywh=xyxy_to_xywh(box_to_pixels(record.z_where[b][index], H, W)).reshape(-1, 4),
                              masks=masks[visible],
                              conf=record.z_pres[b][index].float().cpu().numpy().astype(np.float64),
                              invisible=int((~visible).sum())))
    return result


def sequence_predictions(records: list, H: int, W: int) -> list:
    """Per-frame records -> per sequence, per frame Objects: result[b][t]."""
    per_frame = [frame_predictions(rec, H, W) for rec in records]   # [t][b]
    return [list(frames) for frames in zip(*per_frame)]


def ocrb_frame_predictions(record, H: int, W: int) -> list:
    """A FrameRecord (batch B) -> per sequence (ids, masks) as the OCRB protocol reads a model: each
    pixel goes to the largest of the rendered objects' shares alpha_map * w_k (w_k the normalised
    importance alpha * z_pres * sigmoid(-z_depth) of the composite) and the background's
    1 - alpha_map (`metrics.argmax_masks`); the objects with z_pres > PRES_THRESHOLD are the predictions."""
    result = []
    for b in range(record.z_pres.shape[0]):
        index = torch.nonzero(record.z_pres[b] > 0).flatten()                        # every rendered object
        n = len(index)
        alpha = spatial_transform(record.alpha_glimpse[b][index].float(), record.z_where[b][index].float(),
                                  (n, 1, H, W), inverse=True)[:, 0] if n else record.alpha_map.new_zeros(0, H, W)
        weight = alpha * (record.z_pres[b][index].float() * torch.sigmoid(-record.z_depth[b][index].float()))[:, None, None]
        alpha_map = record.alpha_map[b, 0].float()
        share = alpha_map * weight / weight.sum(0).clamp_min(1e-12)
        masks = argmax_masks(share.cpu().numpy(), (1 - alpha_map).cpu().numpy())
        predicted = (record.z_pres[b][index] > PRES_THRESHOLD).cpu().numpy()
        result.append((record.ids[b][index].cpu().numpy().astype(np.int64)[predicted], masks[predicted]))
    return result


def ground_truth_frames(gt: dict, min_area: int = MIN_GT_AREA) -> list:
    """MovingSprites ground truth -> per frame Objects of the objects with >= min_area visible pixels."""
    frames = []
    for t in range(gt["ids"].shape[0]):
        keep = (gt["ids"][t] >= 0) & (gt["masks"][t].sum(axis=(1, 2)) >= min_area)
        frames.append(Objects(ids=gt["ids"][t][keep], xywh=gt["boxes"][t][keep].astype(np.float64),
                              masks=gt["masks"][t][keep]))
    return frames


# ------------------------------------------------------------------------------------------------
# Exports
# ------------------------------------------------------------------------------------------------

def write_tracks(path: str, frames: list, numbers: list | None = None) -> None:
    """MOTChallenge layout, one line per object: frame (1-based: `numbers`, else 1..N), id, x, y, w, h,
    conf, -1, -1, -1."""
    with open(path, "w") as f:
        for t, obj in enumerate(frames):
            number = numbers[t] if numbers is not None else t + 1
            for obj_id, (x, y, w, h), conf in zip(obj.ids.tolist(), obj.xywh.tolist(), obj.conf.tolist()):
                f.write(f"{number},{obj_id},{x:.2f},{y:.2f},{w:.2f},{h:.2f},{conf:.4f},-1,-1,-1\n")


def prediction_entries(frames: list) -> list:
    """predictions.json entries of one sequence: [{"frame": t, "masks": [RLE], "ids": [id]}]."""
    return [{"frame": t, "masks": [rle_encode(m) for m in obj.masks], "ids": [int(i) for i in obj.ids]}
            for t, obj in enumerate(frames)]


def draw_objects(image: Image.Image, objects: Objects, scale: int) -> Image.Image:
    """A copy of image with each object's box and id drawn in the id's colour."""
    image = image.copy()
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for obj_id, (x, y, w, h) in zip(objects.ids.tolist(), objects.xywh.tolist()):
        box = (x * scale, y * scale, (x + w) * scale - 1, (y + h) * scale - 1)
        if not all(math.isfinite(v) for v in box) or box[2] <= box[0] or box[3] <= box[1]:
            continue
        draw.rectangle(box, outline=viz.id_color(obj_id))
        draw.text((box[0] + 2, box[1] + 1), str(obj_id), fill=viz.id_color(obj_id), font=font)
    return image


GIF_TITLES = ("input", "reconstruction", "tracks", "background", "generation")


def write_gif(path: str, columns: list, objects: list, box_column: int, titles=GIF_TITLES) -> None:
    """An animated GIF, one frame per time step, of titled panels side by side.

    columns: (T, 3, H, W) tensors in [0, 1]; the boxes of objects[t] are drawn on column box_column."""
    T, _, H, W = columns[0].shape
    scale = max(1, math.ceil(GIF_MIN_SIDE / min(H, W)))
    gap, header = 2, 14
    font = ImageFont.load_default()
    frames = []
    for t in range(T):
        canvas = Image.new("RGB", (len(columns) * (W * scale + gap) - gap, H * scale + header), (255, 255, 255))
        draw = ImageDraw.Draw(canvas)
        for c, column in enumerate(columns):
            panel = viz.to_pil(column[t], scale)
            if c == box_column:
                panel = draw_objects(panel, objects[t], scale)
            canvas.paste(panel, (c * (W * scale + gap), header))
            draw.text((c * (W * scale + gap) + 2, 1), f"{titles[c]} t={t}" if c == 0 else titles[c],
                      fill=(0, 0, 0), font=font)
        frames.append(canvas)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=400, loop=0)


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------

def sequence_name(dataset, index: int) -> str:
    """A readable name of item `index`: sprites '000007', Grand Central 'crop3_000160',
    frame folders '<video folder>_<first frame>' (as the folder is named: pass the names of all
    items through `sequence_names`/`utils.unique_names` for file names)."""
    if isinstance(dataset, GrandCentral):
        crop, start = dataset.crop_and_start(index)
        return f"crop{crop}_{start:06d}"
    if isinstance(dataset, FrameFolder):
        video, start = dataset.items[index]
        return f"{dataset.videos[video][0].parent.name}_{start:06d}"
    return f"{index:06d}"


def sequence_names(dataset) -> list[str]:
    """The file-name-safe, distinct names of all items of the dataset (`utils.unique_names`): videos
    whose folder names differ only in characters a file name cannot keep ('café'/'cafè', 'a b'/'a_b')
    keep apart."""
    return unique_names([sequence_name(dataset, i) for i in range(len(dataset))])


def resolve_data(args, trained: dict) -> None:
    """Fill in the data flags left unset, from the checkpoint's record of its training data.

    --dataset: 'grandcentral' for a model trained on it; else 'frames'
    when --data-dir is given; else 'sprites' (a model trained on a folder of frames needs --data-dir
    or --dataset). For the same kind as in training, --preset, --frame-skip and (grandcentral: its
    last 10% is the test split) --data-dir default to the training run's."""
    same = lambda kind: trained.get("dataset") == kind  # noqa: E731
    if args.dataset is None:
        if same("grandcentral"):
            args.dataset = "grandcentral"
        elif args.data_dir is not None:
            args.dataset = "frames"
        elif same("frames"):
            raise EvalError("the model was trained on a folder of frames: pass --data-dir with test frames "
                            "(or --dataset sprites)")
        else:
            args.dataset = "sprites"
    unused = ("--frame-skip", args.frame_skip) if args.dataset == "sprites" else ("--preset", args.preset)
    if unused[1] is not None:          # given, but this kind of data has no such choice
        raise EvalError(f"{unused[0]} is not used with --dataset {args.dataset}: drop it")
    if args.preset is None:
        args.preset = trained.get("preset") if args.dataset == "sprites" and same("sprites") and trained.get("preset") else "easy"
    if args.frame_skip is None and same(args.dataset):
        args.frame_skip = trained.get("frame_skip")
    if args.frame_skip is None:
        args.frame_skip = 8 if args.dataset == "grandcentral" else 1
    if args.data_dir is None and args.dataset == "grandcentral" and same("grandcentral"):
        args.data_dir = trained.get("data_dir")
    if args.dataset == "sprites" and args.data_dir is not None:
        raise EvalError("--data-dir is not used with --dataset sprites (the scenes are generated): drop one of them")
    if args.dataset == "sprites":
        try:
            check_preset(args.preset)
        except DataError as e:
            raise EvalError(str(e)) from None
    if args.dataset != "sprites" and args.data_dir is None:
        raise EvalError(f"--dataset {args.dataset} needs --data-dir with the frames")


def test_scene_seed(train_seed: int, base: int = TEST_SEED) -> int:
    """The seed of the sprite test scenes: `base` whatever the training seed, so that runs of several
    seeds are scored on the same videos, as OCRB scores every seed on one test set; a run trained on
    that very seed (whose training scenes those are) gets base + 1."""
    return base + 1 if train_seed == base else base


def eval_dataset(args, cfg):
    """The test data (the training run's protocol, test split: `data.build_dataset`) and the number
    of sequences to use."""
    sprites = args.num_sequences if args.num_sequences is not None else 100
    if args.seq_len is not None:
        cfg = dataclasses.replace(cfg, seq_len=args.seq_len)
    dataset = build_dataset(args.dataset, cfg, train=False, data_dir=args.data_dir, preset=args.preset,
                            num_sequences=sprites, frame_skip=args.frame_skip, skip_bad_frames=args.skip_bad_frames,
                            seed=test_scene_seed(cfg.seed))
    num = len(dataset) if args.num_sequences is None else min(args.num_sequences, len(dataset))
    return dataset, num


# ------------------------------------------------------------------------------------------------
# Evaluation loop
# ------------------------------------------------------------------------------------------------

@dataclass
class Tally:
    """Running sums over the evaluated sequences."""
    names: list = field(default_factory=list)
    box_accs: list = field(default_factory=list)
    tight_accs: list = field(default_factory=list)
    mask_accs: list = field(default_factory=list)
    gt_counts: list = field(default_factory=list)
    pred_counts: list = field(default_factory=list)
    sq_err: float = 0.0
    num_values: int = 0
    nll: list = field(default_factory=list)
    gen_sq_err: np.ndarray | None = None      # (T - observe,) summed over sequences
    gen_sequences: int = 0
    centre_errors: list | None = None         # per generated step, matched distances
    predictions: dict = field(default_factory=dict)
    invisible: int = 0                        # predictions with z_pres > 0.5 left out as invisible
    duplicates: int = 0                       # predictions repeating another of their frame (mask IoU >= 0.5)
    ocrb: OcrbAccumulator | None = None       # --protocol ocrb: one accumulator over all sequences


def nll_per_sequence(model, batch, step: int, tau: float, samples: int) -> torch.Tensor:
    """(B,) importance-sampled negative log-likelihood: -(logsumexp_k log w_k - log K), where
    log w_k = sum over frames of (log p(x | z_k) + log p(z_k) - log q(z_k | x))."""
    log_w = []
    for _ in range(samples):
        out = model(batch, step, tau, nll=True)
        log_w.append((out.log_like + out.log_imp).sum(1))
    log_w = torch.stack(log_w)                                                      # (K, B)
    return -(torch.logsumexp(log_w.double(), 0) - math.log(samples))


def add_generation(tally: Tally, batch, gen, truths, observe: int, H: int, W: int) -> None:
    """Per generated step: image squared error and matched object-centre distances."""
    T = batch.shape[1]
    err = ((gen.recon[:, observe:] - batch[:, observe:]) ** 2).flatten(2).mean(2).sum(0).double().cpu().numpy()
    tally.gen_sq_err = err if tally.gen_sq_err is None else tally.gen_sq_err + err
    tally.gen_sequences += batch.shape[0]
    if truths is None:
        return
    if tally.centre_errors is None:
        tally.centre_errors = [[] for _ in range(T - observe)]
    preds = sequence_predictions(gen.records[observe:], H, W)                       # [b][t - observe]
    for b, truth in enumerate(truths):
        for k, pred in enumerate(preds[b]):
            gt = truth[observe + k]
            tally.centre_errors[k].extend(match_centres(box_centres(gt.xywh), box_centres(pred.xywh)).tolist())


def add_inference(tally: Tally, preds: list, names: list, truths, out_dir: str) -> None:
    """Per sequence: the exports, and (with ground truth) the tracking accumulators and counts."""
    for b, name in enumerate(names):
        tally.names.append(name)
        tally.predictions[name] = prediction_entries(preds[b])
        tally.invisible += sum(p.invisible for p in preds[b])
        tally.duplicates += sum(count_duplicates(p.masks) for p in preds[b])
        write_tracks(os.path.join(out_dir, f"tracks_{name}.txt"), preds[b])
        if truths is None:
            continue
        gt = truths[b]
        tally.box_accs.append(accumulate([(g.ids, g.xywh) for g in gt], [(p.ids, p.xywh) for p in preds[b]]))
        # the ground truth's xywh is already the tight box of its visible mask
        tally.tight_accs.append(accumulate([(g.ids, g.xywh) for g in gt], [(p.ids, p.tight) for p in preds[b]]))
        tally.mask_accs.append(accumulate([(g.ids, g.masks) for g in gt], [(p.ids, p.masks) for p in preds[b]],
                                          mask_iou_distance))
        tally.gt_counts.extend(g.count for g in gt)
        tally.pred_counts.extend(p.count for p in preds[b])


def add_ocrb(tally: Tally, records: list, truths: list, H: int, W: int) -> None:
    """--protocol ocrb: each sequence's argmax masks and ground truth (with its background, the pixels
    of no object) into the one OCRB accumulator."""
    per_frame = [ocrb_frame_predictions(rec, H, W) for rec in records]              # [t][b]
    for b, gt in enumerate(truths):
        gt_frames = [(g.ids, g.masks, ~g.masks.any(axis=0)) for g in gt]
        tally.ocrb.add_video(gt_frames, [frame[b] for frame in per_frame])


def evaluate_batch(model, batch, step, tau, args, tally: Tally, names, truths, gif_names) -> None:
    """Run the model on one batch (inference, then generation and the NLL samples),
    add everything to the tally and write the batch's exports."""
    cfg = model.cfg
    H, W = cfg.img_h, cfg.img_w
    out = model(batch, step, tau, keep_records=True)
    preds = sequence_predictions(out.records, H, W)                                 # [b][t]
    tally.sq_err += float(((out.recon - batch) ** 2).double().sum())
    tally.num_values += batch.numel()
    add_inference(tally, preds, names, truths, args.out)
    if tally.ocrb is not None and truths is not None:
        add_ocrb(tally, out.records, truths, H, W)
    gifs = [b for b, name in enumerate(names) if name in gif_names]
    gen = model(batch, step, tau, generate=True, keep_records=True)
    add_generation(tally, batch, gen, truths, cfg.observe_frames, H, W)
    if args.nll_samples > 0:
        tally.nll.extend(nll_per_sequence(model, batch, step, tau, args.nll_samples).tolist())
    for b in gifs:
        columns = [batch[b], out.recon[b], batch[b], torch.stack([r.background[b] for r in out.records]), gen.recon[b]]
        write_gif(os.path.join(args.out, f"gif_{names[b]}.gif"), [c.cpu() for c in columns], preds[b], box_column=2)


def run(model, dataset, num: int, args, step: int, tau: float, device) -> Tally:
    """Evaluate the first `num` sequences of the dataset in batches."""
    indices = list(range(num))
    names = sequence_names(dataset)[:num]
    gif_names = set(names[:args.gif])
    loader = make_loader(Subset(dataset, indices), args.batch_size, shuffle=False, workers=args.workers,
                         drop_last=False)
    has_truth = isinstance(dataset, MovingSprites)
    protocol = getattr(args, "protocol", "default")
    tally = Tally(ocrb=OcrbAccumulator(getattr(args, "ocrb_start_frame", OCRB_START_FRAME)) if protocol == "ocrb" else None)
    position = 0
    with torch.no_grad(), tqdm(total=num, unit="seq", desc="evaluate", file=sys.stderr) as bar:
        for batch in iterate(loader):
            B = batch.shape[0]
            batch_indices = indices[position:position + B]
            truths = [ground_truth_frames(dataset.ground_truth(i)) for i in batch_indices] if has_truth else None
            evaluate_batch(model, batch.to(device), step, tau, args, tally, names[position:position + B],
                           truths, gif_names)
            position += B
            bar.update(B)
    return tally


def generation_report(tally: Tally, observe_frames: int, has_truth: bool) -> dict:
    """Conditional generation: image MSE per generated step and, with ground truth, the mean
    distance (pixels) between matched predicted and true object centres per generated step."""
    mse = (tally.gen_sq_err / max(tally.gen_sequences, 1)).tolist() if tally.gen_sq_err is not None else []
    report = {"observe_frames": observe_frames, "mse_per_step": mse,
              "mse": float(np.mean(mse)) if mse else float("nan"),
              "centre_error_px_per_step": None, "centre_error_px": None, "centre_matches_per_step": None}
    if has_truth and tally.centre_errors is not None:
        every = [d for step in tally.centre_errors for d in step]
        report.update(centre_error_px_per_step=[float(np.mean(e)) if e else float("nan") for e in tally.centre_errors],
                      centre_error_px=float(np.mean(every)) if every else float("nan"),
                      centre_matches_per_step=[len(e) for e in tally.centre_errors])
    return report


def nll_report(tally: Tally, samples: int, cfg, seq_len: int) -> dict | None:
    """Mean importance-sampled NLL per sequence, per frame and in bits per dimension (of a Gaussian
    density over continuous pixel values, so it may be negative)."""
    if not tally.nll:
        return None
    nll = float(np.mean(tally.nll))
    return {"samples": samples, "nats_per_sequence": nll, "nats_per_frame": nll / seq_len,
            "bits_per_dim": nll / (seq_len * 3 * cfg.img_h * cfg.img_w * math.log(2))}


def build_report(tally: Tally, args, cfg, step: int, tau: float, dataset_name: str) -> dict:
    """The report.json contents from the tally."""
    has_truth = bool(tally.box_accs)
    sprites = dataset_name == "sprites"
    seq_len = args.seq_len or cfg.seq_len
    return {
        "checkpoint": os.path.abspath(args.checkpoint),
        "step": step,
        "tau": tau,
        "dataset": dataset_name,
        "preset": args.preset if sprites else None,
        "data_dir": None if sprites else os.path.abspath(args.data_dir),
        "frame_skip": None if sprites else args.frame_skip,
        "num_sequences": len(tally.names),
        "seq_len": seq_len,
        "image_size": [cfg.img_h, cfg.img_w],
        "min_gt_area": MIN_GT_AREA,
        "first_frame_rejection": cfg.first_frame_rejection,
        "invisible_predictions": tally.invisible,
        "duplicate_predictions": tally.duplicates,
        "tracking_box": summarize(tally.box_accs, tally.names) if has_truth else None,
        "tracking_box_tight": summarize(tally.tight_accs, tally.names) if has_truth else None,
        "tracking_mask": summarize(tally.mask_accs, tally.names) if has_truth else None,
        "tracking_ocrb": tally.ocrb.summary() if has_truth and tally.ocrb is not None else None,
        "counting": count_metrics(tally.gt_counts, tally.pred_counts) if has_truth else None,
        "reconstruction": {"mse": tally.sq_err / max(tally.num_values, 1)},
        "nll": nll_report(tally, args.nll_samples, cfg, seq_len),
        "generation": generation_report(tally, cfg.observe_frames, has_truth),
    }


def json_ready(value):
    """The value with NaN and infinities replaced by None (strict JSON)."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def summary_table(report: dict) -> str:
    """A readable table of the main numbers."""
    rows = [("sequences", report["num_sequences"]), ("step", report["step"]),
            ("first-frame rejection", "on" if report.get("first_frame_rejection") else "off"),
            ("duplicate predictions", report["duplicate_predictions"])]
    for kind in ("tracking_box", "tracking_box_tight", "tracking_mask"):
        m = report.get(kind)
        if m:
            label = kind.replace("tracking_", "")
            rows += [(f"MOTA ({label})", m["mota"]), (f"MOTP IoU ({label})", m["motp_iou"]),
                     (f"MOTP 1-IoU ({label})", m["motp_distance"]), (f"IDF1 ({label})", m["idf1"]),
                     (f"ID switches ({label})", m["id_switches"]), (f"false positives ({label})", m["false_positives"]),
                     (f"misses ({label})", m["misses"]),
                     (f"mostly tracked ({label})", f"{m['mostly_tracked']} / {m['num_unique_objects']}"),
                     (f"mostly detected ({label})", f"{m['mostly_detected']} / {m['num_unique_objects']}")]
    by_frame = (report.get("tracking_box_tight") or {}).get("by_frame")
    if by_frame:   # errors that grow along the sequence are drifting tracks
        rows += [(f"{name} / frame (box_tight)", " ".join(str(v) for v in by_frame[key]))
                 for name, key in (("false positives", "false_positives"), ("misses", "misses"))]
    m = report.get("tracking_ocrb")
    if m:
        rows += [(f"OCRB {name} (%, frames {m['start_frame']}+, pooled)", m[key]) for name, key in
                 (("MOTA", "mota"), ("MOTP", "motp"), ("MD", "mostly_detected"), ("MT", "mostly_tracked"),
                  ("match", "match"), ("miss", "miss"), ("ID switches", "id_switches"), ("FPs", "false_positives"))]
        rows += [(f"OCRB {name} by kind (%)", "  ".join(f"{kind} {share:.1f}" for kind, share in m["errors"][key].items()))
                 for name, key in (("misses", "miss"), ("FPs", "false_positive"))]
    if report.get("counting"):
        rows += [("count accuracy", report["counting"]["accuracy"]), ("count MAE", report["counting"]["mae"])]
    rows.append(("reconstruction MSE", report["reconstruction"]["mse"]))
    if report.get("nll"):
        rows += [("NLL (nats/sequence)", report["nll"]["nats_per_sequence"]),
                 ("NLL (bits/dim)", report["nll"]["bits_per_dim"])]
    gen = report["generation"]
    rows.append(("generation MSE / step", " ".join(f"{v:.4f}" for v in gen["mse_per_step"])))
    if gen.get("centre_error_px_per_step") is not None:
        rows.append(("centre error px / step", " ".join("n/a" if v is None or not math.isfinite(v) else f"{v:.2f}"
                                                       for v in gen["centre_error_px_per_step"])))
    width = max(len(name) for name, _ in rows)
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(f"{name:<{width}}  {fmt(value)}" for name, value in rows)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def parse_args(argv):
    p = Parser(description="Evaluate a trained SCALOR checkpoint (metrics and exports).",
                                epilog="Also: evaluate.py --aggregate REPORT.json [REPORT.json ...] prints the mean "
                                       "± std of every number over several runs (e.g. training seeds).",
                                allow_abbrev=False)   # `--trac` must not stand for the --track alias main() dispatches
    p.add_argument("--checkpoint", required=True, help="a .pt file written by train.py")
    p.add_argument("--dataset", choices=DATASET_KINDS, default=None,
                   help="test data (default: grandcentral for a model trained on it, else frames with "
                        "--data-dir, else sprites)")
    p.add_argument("--data-dir", default=None,
                   help="frames folder (grandcentral: default the training run's; its last 10%% is the test split)")
    p.add_argument("--preset", default=None,
                   help=f"sprite preset, one of {', '.join(sorted(SPRITE_PRESETS))} (default: the training run's, else easy)")
    p.add_argument("--skip-bad-frames", action="store_true",
                   help="drop unreadable frames (with a notice) instead of stopping")
    p.add_argument("--frame-skip", type=int, default=None,
                   help="frame skip (default: the training run's, else grandcentral 8, frames 1)")
    p.add_argument("--num-sequences", type=int, default=None,
                   help="sequences to evaluate (sprites: default 100; folders: default all)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="frames per test sequence, each run through the model in one forward (default: the "
                        "checkpoint's seq_len; OCRB scores 10-frame videos)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the checkpoint's batch size")
    p.add_argument("--nll-samples", type=int, default=0, help="importance samples for the NLL (0: off)")
    p.add_argument("--out", default="eval",
                   help="output folder: written whole at the end (a sibling temporary folder until then); "
                        "an existing non-empty one is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out folder (whole, at the end, so it never holds a mix)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--gif", type=int, default=0, help="write GIFs of the first N sequences")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of the model's sampling")
    p.add_argument("--workers", type=int, default=0, help="data loader processes")
    p.add_argument("--first-frame-rejection", action=argparse.BooleanOptionalAction, default=None,
                   help="reject first-frame proposals explained by kept proposals of larger z_pres, an inference rule "
                        "without parameters that the reference lacks (no duplicates born in the first frame; "
                        "default: on, as in track.py, unless the checkpoint has phase_rejection off; "
                        "--no-first-frame-rejection infers as the reference does)")
    p.add_argument("--protocol", choices=("default", "ocrb"), default="default",
                   help="ocrb: also score tracking as the object-centric representation benchmark does (argmax masks, "
                        "mask IoU >= 0.5, masks of > 5 pixels, frames from --ocrb-start-frame on, pooled over all "
                        "sequences, percent; report.json 'tracking_ocrb')")
    p.add_argument("--ocrb-start-frame", type=int, default=None,
                   help=f"first frame (0-based) OCRB scores [{OCRB_START_FRAME}, its eval_mot.py default]")
    args = p.parse_args(argv)
    if args.ocrb_start_frame is not None and args.protocol != "ocrb":
        raise EvalError("--ocrb-start-frame is used with --protocol ocrb only: drop it or add --protocol ocrb")
    if args.ocrb_start_frame is None:
        args.ocrb_start_frame = OCRB_START_FRAME
    for name in ("num_sequences", "seq_len", "batch_size", "frame_skip"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise EvalError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.nll_samples < 0 or args.gif < 0 or args.workers < 0 or args.ocrb_start_frame < 0:
        raise EvalError("--nll-samples, --gif, --workers and --ocrb-start-frame must not be negative")
    return args


def load_model(path: str, device, **changes) -> tuple:
    """(model in eval mode, checkpoint payload), the weights loaded strictly; `changes`: config fields
    that have no parameters (e.g. first_frame_rejection) to set differently from the checkpoint's."""
    payload = read_checkpoint(path, map_location="cpu")
    model = SCALOR(payload["config"].replace(**changes))
    load_model_state(model, payload, path)   # CheckpointError if the weights do not fit
    return fast.apply(model.to(device).eval(), fast.SpeedOptions()), payload   # Triton convs, decoder reuse


def load_model_for_inference(path: str, device, first_frame_rejection: bool | None = None) -> tuple:
    """load_model with first-frame rejection as given, or (None) on wherever the checkpoint has the
    rejection phase it extends (phase_rejection), as track.py and evaluate.py infer by default."""
    if first_frame_rejection is None:
        try:
            return load_model(path, device, first_frame_rejection=True)
        except ConfigError:           # the checkpoint has rejection off: first-frame rejection needs it
            return load_model(path, device)
    try:
        return load_model(path, device, first_frame_rejection=first_frame_rejection)
    except ConfigError as e:
        if first_frame_rejection and not read_checkpoint(path, map_location="cpu")["config"].phase_rejection:
            raise ConfigError("first_frame_rejection (--first-frame-rejection) extends rejection to the first "
                              "frame, and this checkpoint was trained without it (phase_rejection off): drop the "
                              "flag") from e
        raise


def prepare(argv):
    """Parse, load and check everything before anything is written: (args, model, step, dataset, num, device)."""
    args = parse_args(argv)
    device = pick_device(args.device)
    model, payload = load_model_for_inference(args.checkpoint, device, args.first_frame_rejection)
    if args.seq_len is not None and args.seq_len <= model.cfg.observe_frames:
        raise EvalError(f"--seq-len {args.seq_len} must exceed the checkpoint's observe_frames "
                        f"({model.cfg.observe_frames}: the frames that generation observes before it predicts)")
    trained = payload.get("data")
    resolve_data(args, trained if isinstance(trained, dict) else {})
    dataset, num = eval_dataset(args, model.cfg)
    if args.protocol == "ocrb":
        check_ocrb(args, dataset, args.seq_len or model.cfg.seq_len)
    if args.batch_size is None:
        args.batch_size = model.cfg.batch_size
    return args, model, int(payload.get("step", 0)), dataset, num, device


def check_ocrb(args, dataset, seq_len: int) -> None:
    """EvalError unless --protocol ocrb can score: it needs ground-truth masks (the sprite scenes) and
    frames from --ocrb-start-frame on."""
    if not isinstance(dataset, MovingSprites):
        raise EvalError(f"--protocol ocrb needs ground-truth masks, which only the sprite scenes have "
                        f"(not --dataset {args.dataset}): drop --protocol ocrb or evaluate on --dataset sprites")
    if args.ocrb_start_frame >= seq_len:
        raise EvalError(f"--ocrb-start-frame {args.ocrb_start_frame} leaves no frame of the {seq_len}-frame "
                        f"sequences to score: pass a smaller one or a longer --seq-len")


def check_out(args) -> None:
    """EvalError unless --out can be written (utils.out_folder_problem): a folder that does not exist yet,
    an empty folder, or (--overwrite) any folder that holds none of the inputs (checkpoint, data folder)."""
    problem = out_folder_problem(args.out, args.overwrite, [args.checkpoint, getattr(args, "data_dir", None)])
    if problem:
        raise EvalError(problem)


def write_outputs(tally: Tally, args, cfg, step: int, tau: float) -> dict | None:
    """predictions.json and report.json into args.out; returns the report."""
    with open(os.path.join(args.out, "predictions.json"), "w") as f:
        json.dump(tally.predictions, f)
    report = build_report(tally, args, cfg, step, tau, args.dataset)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(json_ready(report), f, indent=2)
    return report


REPORT_KEYS = ("step", "reconstruction")   # what every report.json of evaluate.py holds
# what --aggregate needs equal in every report: the test set
TEST_SET_KEYS = ("dataset", "preset", "data_dir", "frame_skip", "num_sequences", "seq_len", "image_size")


def aggregate_main(argv) -> int:
    """`--aggregate REPORT.json ...`: mean +- std of every number over several runs (e.g. seeds)."""
    p = Parser(description="Mean and standard deviation of several report.json files.")
    p.add_argument("--aggregate", nargs="+", required=True, metavar="REPORT",
                   help="report.json files of runs evaluated on the same test set")
    args = p.parse_args(argv)
    missing = [path for path in args.aggregate if not os.path.isfile(path)]
    if missing:
        print(f"evaluate.py: error: no report '{missing[0]}': pass report.json files written by evaluate.py", file=sys.stderr)
        return 2
    reports = []
    for path in args.aggregate:
        try:
            with open(path) as f:
                reports.append(json.load(f))
            if not isinstance(reports[-1], dict):
                raise ValueError("not a JSON object")
            absent = [key for key in REPORT_KEYS if key not in reports[-1]]
            if absent:
                raise ValueError(f"no {', '.join(repr(k) for k in absent)}")
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            print(f"evaluate.py: error: '{path}' is not a report.json ({one_line(e)}): pass report.json files "
                  f"written by evaluate.py", file=sys.stderr)
            return 2
    for key in TEST_SET_KEYS:
        values = [report.get(key) for report in reports]
        other = next((i for i, v in enumerate(values) if v != values[0]), None)
        if other is not None:
            print(f"evaluate.py: error: the reports were evaluated on different data ({key} {values[0]!r} in "
                  f"'{args.aggregate[0]}', {values[other]!r} in '{args.aggregate[other]}'): aggregate runs "
                  f"evaluated on the same test set", file=sys.stderr)
            return 2
    try:
        print(aggregate_table(reports))
    except (AttributeError, OverflowError) as e:
        print(f"evaluate.py: error: a report is not a report.json ({e})", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(arg == "--aggregate" or arg.startswith("--aggregate=") for arg in argv):
        return aggregate_main(argv)
    if "--track" in argv:     # whole videos, one id per object: track.py
        import track
        return track.evaluate_alias(argv)
    try:
        args, model, step, dataset, num, device = prepare(argv)
        check_out(args)
    except SystemExit as e:   # argparse: usage error (already printed) or --help
        return int(e.code or 0)
    except (EvalError, CheckpointError, DataError, ConfigError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    cfg = model.cfg
    tau = tau_at(cfg, step)
    seed_everything(args.seed)
    out = args.out
    try:
        work, made = work_folder(out)
    except OSError as e:
        print(f"evaluate.py: error: cannot write beside --out '{out}' ({e.strerror or e}): pass another --out",
              file=sys.stderr)
        return 2
    args.out = work          # everything is written here, then moved into place whole
    try:
        with sigterm_as_interrupt():
            tally = run(model, dataset, num, args, step, tau, device)
            report = write_outputs(tally, args, cfg, step, tau)
        move_into_place(work, out)
    except KeyboardInterrupt as e:
        discard_work(work, made)
        print(interrupted_message("evaluate.py", e, out), file=sys.stderr)
        return 130
    except (DataError, OSError) as e:   # a frame found corrupt while reading it (setup checks headers only), a full disk
        discard_work(work, made)
        text = str(e) if isinstance(e, DataError) else \
            f"cannot write the outputs to --out '{out}' (disk full / not writable: {one_line(e)})"
        print(f"evaluate.py: error: {text}; nothing written", file=sys.stderr)
        return 2
    except BaseException:
        discard_work(work, made)
        raise
    finally:
        args.out = out
    print(summary_table(report))
    print(f"wrote report.json, tracks, predictions.json and {min(args.gif, num)} GIFs to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
