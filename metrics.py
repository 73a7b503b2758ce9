"""Metrics of tracking, counting and segmentation, without the model: box and mask IoU, motmetrics
accumulators and their summaries, counting, centre matching, run-length encoding, and the
object-centric representation benchmark's protocol (`ocrb_*`).

`evaluate.py` runs the model and feeds these; they take plain numpy arrays, so other trackers'
outputs can be scored the same way.

The OCRB protocol (Weis et al., "Benchmarking Unsupervised Object Representations for Video
Sequences", JMLR 22(183), 2021; repository ecker-lab/object-centric-representation-benchmark,
`ocrb/eval/eval_mot.py` and `ocrb/eval/eval_utils.py`), as implemented there:

- predicted soft masks are binarised by an argmax over the slots per pixel (`binarize_masks`);
  slots whose binarised mask is empty are no prediction (`vimon/generate_pred_json.py`);
- a ground-truth or predicted mask takes part in a frame only when it has MORE than `min_num_pix`
  (5) pixels;
- distance 1 - mask IoU, pairs with IoU < 0.5 are never matched (`dists[dists > 0.5] = nan`);
- with `--exclude_bg` (used in the README's command) the ground-truth background mask is removed,
  and with it every prediction whose IoU with the background is > 0.2;
- frames `start_step` .. `stop_step - 1` of each video, default 2 .. 9: the first two frames
  (t = 0, 1) are not scored;
- ONE motmetrics accumulator over all videos (ids are unique per video, so nothing carries over
  between videos): the counts are pooled over the whole test set, not averaged per video;
- MOTA = 1 - (misses + false positives + switches) / ground-truth objects, MOTP = mean IoU of the
  matched pairs (MATCH and SWITCH events), matches / misses / switches / false positives as a
  percentage of the ground-truth objects (so match + miss + switch = 100), mostly tracked (MT):
  objects matched without a switch (MATCH events) in >= 80% of the frames they appear in, mostly
  detected (MD): matched by any prediction (MATCH or SWITCH) in >= 80% of them, both in percent of
  the objects; everything in percent;
- several training seeds: mean +- standard deviation over the runs (the leaderboard).

Not in OCRB: `error_kinds` labels each scored object and prediction (merged with a neighbour into one
prediction, inexact, unseen; merge, duplicate, inexact, other), and the summary splits the misses and
false positives by those kinds.
"""
from __future__ import annotations

import math
from collections import Counter

import motmetrics as mm
import numpy as np

from data import tight_boxes

IOU_THRESHOLD = 0.5        # a prediction matches a ground-truth object at IoU >= this
MOT_METRICS = ["mota", "num_switches", "num_false_positives", "num_misses", "mostly_tracked",
               "mostly_lost", "partially_tracked", "num_objects", "num_unique_objects", "num_matches",
               "num_predictions", "idf1"]
OCRB_START_FRAME = 2       # eval_mot.py --start_step default: frames 0 and 1 of a video are not scored
OCRB_MIN_PIXELS = 5        # eval_mot.py --min_num_pix: a mask counts with MORE than this many pixels
OCRB_BG_IOU = 0.2          # eval_mot.py exclude_bg: predictions with IoU > this with the background are dropped
LIFESPAN_RATIO = 0.8       # mostly tracked / detected: in >= this fraction of an object's frames
NEAR_IOU = 0.2             # error kinds: a prediction at this IoU with an object found it, not well enough to match
MISS_KINDS = ("merged", "inexact", "unseen")                        # see error_kinds
FALSE_POSITIVE_KINDS = ("merge", "duplicate", "inexact", "other")


# ------------------------------------------------------------------------------------------------
# Boxes and masks
# ------------------------------------------------------------------------------------------------

def xyxy_to_xywh(boxes) -> np.ndarray:
    """(..., 4) corners (x0, y0, x1, y1) -> (..., 4) (x, y, w, h)."""
    b = np.asarray(boxes, dtype=np.float64)
    return np.concatenate((b[..., :2], b[..., 2:] - b[..., :2]), axis=-1)


def box_centres(xywh) -> np.ndarray:
    """(N, 4) boxes (x, y, w, h) -> (N, 2) centres (x, y)."""
    b = np.asarray(xywh, dtype=np.float64).reshape(-1, 4)
    return b[:, :2] + b[:, 2:] / 2


def iou_xywh(a, b) -> np.ndarray:
    """IoU of every box in a (N, 4) with every box in b (M, 4), both (x, y, w, h): (N, M)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)[:, None]
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)[None]
    inter_w = np.clip(np.minimum(a[..., 0] + a[..., 2], b[..., 0] + b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    inter_h = np.clip(np.minimum(a[..., 1] + a[..., 3], b[..., 1] + b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = inter_w * inter_h
    union = a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def iou_to_distance(iou: np.ndarray, thresh: float) -> np.ndarray:
    """motmetrics distances: 1 - IoU, NaN (never paired) where IoU < thresh."""
    return np.where(iou >= thresh, 1.0 - iou, np.nan)


def iou_matrix_distance(gt_xywh, pred_xywh, thresh: float = IOU_THRESHOLD) -> np.ndarray:
    """(N, M) box distances 1 - IoU between ground truth and predictions, NaN where IoU < thresh."""
    return iou_to_distance(iou_xywh(gt_xywh, pred_xywh), thresh)


def mask_boxes(masks) -> np.ndarray:
    """(n, H, W) bool masks -> (n, 4) tight boxes (x, y, w, h) of whole pixels; (0, 0, 0, 0) for an empty mask."""
    return tight_boxes(np.asarray(masks, dtype=bool)[None])[0].astype(np.float64)


def mask_iou(a, b) -> np.ndarray:
    """IoU of every mask in a (N, H, W) with every mask in b (M, H, W): (N, M); 0 where both are empty."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    fa = a.reshape(a.shape[0], int(np.prod(a.shape[1:]))).astype(np.float64)
    fb = b.reshape(b.shape[0], int(np.prod(b.shape[1:]))).astype(np.float64)
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def count_duplicates(masks, thresh: float = IOU_THRESHOLD) -> int:
    """Predictions of one frame (n, H, W) whose mask IoU with an earlier one of the frame is >= thresh
    (two cells claiming one object: each extra copy counts once)."""
    if len(masks) < 2:
        return 0
    iou = np.triu(mask_iou(masks, masks), k=1)                                    # (n, n), i < j
    return int((iou >= thresh).any(axis=0).sum())


def mask_iou_distance(gt_masks, pred_masks, thresh: float = IOU_THRESHOLD) -> np.ndarray:
    """(N, M) mask distances 1 - IoU between ground truth and predictions, NaN where IoU < thresh."""
    return iou_to_distance(mask_iou(gt_masks, pred_masks), thresh)


# ------------------------------------------------------------------------------------------------
# Run-length encoding
# ------------------------------------------------------------------------------------------------

def rle_encode(mask) -> str:
    """Binary (H, W) mask -> "start length start length ..." of its runs of ones in row-major order,
    starts 1-based (the object-centric representation benchmark's format); "" for an empty mask."""
    flat = np.asarray(mask, dtype=bool).ravel()
    edges = np.flatnonzero(np.diff(np.concatenate(([False], flat, [False])).astype(np.int8)))
    starts, ends = edges[0::2], edges[1::2]
    return " ".join(f"{s + 1} {e - s}" for s, e in zip(starts.tolist(), ends.tolist()))


def rle_decode(s: str, h: int, w: int) -> np.ndarray:
    """Inverse of rle_encode: the (h, w) bool mask. ValueError if the string does not fit."""
    values = [int(v) for v in s.split()]
    if len(values) % 2:
        raise ValueError(f"RLE string has an odd number of values ({len(values)})")
    flat = np.zeros(h * w, dtype=bool)
    for start, length in zip(values[0::2], values[1::2]):
        if start < 1 or length < 0 or start - 1 + length > h * w:
            raise ValueError(f"RLE run ({start}, {length}) does not fit a {h}x{w} mask")
        flat[start - 1:start - 1 + length] = True
    return flat.reshape(h, w)


# ------------------------------------------------------------------------------------------------
# Tracking, counting and centre metrics
# ------------------------------------------------------------------------------------------------

def accumulate(gt_frames, pred_frames, distance=iou_matrix_distance):
    """A motmetrics accumulator of one sequence.

    gt_frames, pred_frames: per frame (ids, objects), where objects are whatever `distance`
    compares: (n, 4) xywh boxes for iou_matrix_distance, (n, H, W) masks for mask_iou_distance."""
    if len(gt_frames) != len(pred_frames):
        raise ValueError(f"{len(gt_frames)} ground-truth frames but {len(pred_frames)} predicted frames")
    acc = mm.MOTAccumulator(auto_id=True)
    for (gt_ids, gt_objects), (pred_ids, pred_objects) in zip(gt_frames, pred_frames):
        acc.update([int(i) for i in gt_ids], [int(i) for i in pred_ids], distance(gt_objects, pred_objects))
    return acc


def lifespan_counts(acc) -> tuple[int, int]:
    """(mostly tracked, mostly detected) ground-truth objects of one accumulator: matched without an
    id switch (MATCH), resp. by any prediction (MATCH or SWITCH), in >= 80% of their frames."""
    events = acc.mot_events
    events = events[events.Type.isin(["MATCH", "SWITCH", "MISS"])]
    if len(events) == 0:
        return 0, 0
    frames = events.OId.value_counts()
    matched = events[events.Type != "MISS"].OId.value_counts().reindex(frames.index, fill_value=0)
    same_id = events[events.Type == "MATCH"].OId.value_counts().reindex(frames.index, fill_value=0)
    return int((same_id / frames >= 0.8).sum()), int((matched / frames >= 0.8).sum())


def overall_motp(accumulators: list) -> float:
    """Mean distance of all matched pairs (MATCH and SWITCH events) over every sequence.

    motmetrics' OVERALL row weights each sequence's MOTP by its detections, and a sequence
    without any is NaN there (NaN x 0), which made the overall MOTP NaN."""
    total, count = 0.0, 0
    for acc in accumulators:
        events = acc.mot_events
        matched = events.loc[events["Type"].isin(("MATCH", "SWITCH")), "D"]
        total, count = total + float(matched.sum()), count + len(matched)
    return total / count if count else float("nan")


def errors_by_frame(accumulators: list) -> dict:
    """Per frame index t (0-based; sequences of any length pooled): ground-truth objects, false positives,
    misses and id switches in frame t of every sequence. Errors that grow with t are tracks that drift."""
    counts = {"objects": [], "false_positives": [], "misses": [], "id_switches": []}
    kinds = {"FP": ("false_positives",), "MISS": ("misses", "objects"), "SWITCH": ("id_switches", "objects"),
             "MATCH": ("objects",)}
    for acc in accumulators:
        events = acc.events   # every frame, empty ones too (as RAW events)
        frames = {frame: t for t, frame in enumerate(events.index.unique(level="FrameId"))}
        for values in counts.values():   # as long as the longest sequence so far
            values.extend([0] * (len(frames) - len(values)))
        for (frame, _), kind in events["Type"].items():
            for key in kinds.get(kind, ()):
                counts[key][frames[frame]] += 1
    return counts


def summarize(accumulators: list, names: list | None = None) -> dict:
    """Tracking metrics over all sequences' accumulators (motmetrics' OVERALL row, plus ours)."""
    names = names if names is not None else [str(i) for i in range(len(accumulators))]
    summary = mm.metrics.create().compute_many(accumulators, names=names, metrics=MOT_METRICS,
                                               generate_overall=True)
    row = summary.loc["OVERALL"]
    counts = [lifespan_counts(acc) for acc in accumulators]
    motp = overall_motp(accumulators)
    unique = int(row["num_unique_objects"])
    return {
        "mota": float(row["mota"]),
        "motp_distance": motp,
        "motp_iou": 1.0 - motp,
        "idf1": float(row["idf1"]),
        "id_switches": int(row["num_switches"]),
        "false_positives": int(row["num_false_positives"]),
        "misses": int(row["num_misses"]),
        "matches": int(row["num_matches"]),
        "num_objects": int(row["num_objects"]),
        "num_predictions": int(row["num_predictions"]),
        "num_unique_objects": unique,
        "mostly_tracked": sum(c[0] for c in counts),
        "mostly_detected": sum(c[1] for c in counts),
        "partially_tracked": int(row["partially_tracked"]),
        "mostly_lost": int(row["mostly_lost"]),
        "mostly_tracked_ratio": sum(c[0] for c in counts) / unique if unique else float("nan"),
        "mostly_detected_ratio": sum(c[1] for c in counts) / unique if unique else float("nan"),
        "by_frame": errors_by_frame(accumulators),
    }


def tracking_metrics(gt_frames, pred_frames, distance=iou_matrix_distance) -> dict:
    """Tracking metrics of one sequence; frames are (ids, xywh boxes) (or masks with mask_iou_distance)."""
    return summarize([accumulate(gt_frames, pred_frames, distance)])


def count_metrics(gt_counts, pred_counts) -> dict:
    """Per-frame counting: exact-count accuracy, mean absolute error and mean signed error (pred - gt)."""
    gt = np.asarray(gt_counts, dtype=np.int64).ravel()
    pred = np.asarray(pred_counts, dtype=np.int64).ravel()
    if gt.shape != pred.shape:
        raise ValueError(f"{gt.size} ground-truth counts but {pred.size} predicted counts")
    if gt.size == 0:
        return {"accuracy": float("nan"), "mae": float("nan"), "bias": float("nan"), "frames": 0}
    return {"accuracy": float((gt == pred).mean()), "mae": float(np.abs(pred - gt).mean()),
            "bias": float((pred - gt).mean()), "frames": int(gt.size)}


def match_centres(gt_centres, pred_centres, use_scipy: bool = True) -> np.ndarray:
    """Distances of the matched (ground truth, prediction) centre pairs, (min(N, M),).

    One-to-one matching minimising the total distance (Hungarian, scipy), or greedy nearest pairs
    when scipy is missing or use_scipy is False."""
    gt = np.asarray(gt_centres, dtype=np.float64).reshape(-1, 2)
    pred = np.asarray(pred_centres, dtype=np.float64).reshape(-1, 2)
    if len(gt) == 0 or len(pred) == 0:
        return np.zeros(0)
    dist = np.linalg.norm(gt[:, None] - pred[None], axis=-1)
    if use_scipy:
        try:
            from scipy.optimize import linear_sum_assignment
        except ImportError:
            use_scipy = False
    if not use_scipy:
        return greedy_match(dist)
    rows, cols = linear_sum_assignment(dist)
    return dist[rows, cols]


def greedy_match(dist: np.ndarray) -> np.ndarray:
    """Repeatedly pair the closest unmatched (row, column): the matched distances."""
    dist = dist.copy()
    matched = []
    for _ in range(min(dist.shape)):
        r, c = np.unravel_index(np.argmin(dist), dist.shape)
        matched.append(dist[r, c])
        dist[r, :] = np.inf
        dist[:, c] = np.inf
    return np.array(matched)


# ------------------------------------------------------------------------------------------------
# The object-centric representation benchmark's protocol (OCRB)
# ------------------------------------------------------------------------------------------------

def argmax_masks(soft, background=None) -> np.ndarray:
    """OCRB's binarisation of soft masks (K, H, W), one per slot: each pixel belongs to the slot of
    the largest weight. With a `background` weight (H, W) a pixel where it is the largest belongs
    to no slot (ties go to the background, then to the lower slot). Returns (K, H, W) bool."""
    soft = np.asarray(soft, dtype=np.float64)
    if soft.shape[0] == 0:
        return np.zeros(soft.shape, dtype=bool)
    stack = soft if background is None else np.concatenate((np.asarray(background, np.float64)[None], soft))
    winner = stack.argmax(axis=0) - (0 if background is None else 1)                # -1: background
    return winner[None] == np.arange(soft.shape[0])[:, None, None]


def ocrb_frame(gt_ids, gt_masks, pred_ids, pred_masks, gt_background=None,
               min_pixels: int = OCRB_MIN_PIXELS, bg_iou: float = OCRB_BG_IOU):
    """The objects and predictions of one frame that OCRB scores: (gt_ids, gt_masks, pred_ids, pred_masks).

    Masks with at most `min_pixels` pixels are left out (ground truth and predictions); with a
    ground-truth background mask (`exclude_bg`), predictions whose IoU with it exceeds `bg_iou` are
    left out too. The distance OCRB matches them by is `mask_iou_distance` (1 - IoU, never matched
    below IoU 0.5)."""
    gt_masks, pred_masks = np.asarray(gt_masks, dtype=bool), np.asarray(pred_masks, dtype=bool)   # (n, H, W)
    gt_keep = gt_masks.sum(axis=(1, 2)) > min_pixels
    pred_keep = pred_masks.sum(axis=(1, 2)) > min_pixels
    gt_ids, gt_masks = np.asarray(gt_ids)[gt_keep], gt_masks[gt_keep]
    pred_ids, pred_masks = np.asarray(pred_ids)[pred_keep], pred_masks[pred_keep]
    if gt_background is not None and len(pred_ids) and np.asarray(gt_background).sum() > min_pixels:
        on_background = mask_iou(np.asarray(gt_background, dtype=bool)[None], pred_masks)[0] > bg_iou
        pred_ids, pred_masks = pred_ids[~on_background], pred_masks[~on_background]
    return gt_ids, gt_masks, pred_ids, pred_masks


def error_kinds(gt_masks, pred_masks, iou_thresh: float = IOU_THRESHOLD, near_iou: float = NEAR_IOU) -> tuple:
    """Why each ground-truth object and each prediction of one frame could go unmatched (not in OCRB):
    (gt kinds, prediction kinds), lists of MISS_KINDS and FALSE_POSITIVE_KINDS.

    A prediction spans two objects when its IoU with the two together is >= iou_thresh and above its
    IoU with either alone. An object is 'merged' when a prediction spans it and another object; else
    'inexact' when a prediction overlaps it at IoU >= near_iou; else 'unseen'. A prediction is a
    'merge' when it spans two objects; else a 'duplicate' when its IoU with an object is >= iou_thresh
    (left unmatched, another prediction took that object); else 'inexact' at IoU >= near_iou with an
    object; else 'other'. gt_masks (n, H, W) are visible masks (they do not overlap), pred_masks (m, H, W)."""
    n, m = len(gt_masks), len(pred_masks)
    if n == 0 or m == 0:
        return ["unseen"] * n, ["other"] * m
    gt = np.asarray(gt_masks, dtype=bool).reshape(n, -1).astype(np.float64)                     # (n, HW)
    pred = np.asarray(pred_masks, dtype=bool).reshape(m, -1).astype(np.float64)                 # (m, HW)
    inter = gt @ pred.T                                                                         # (n, m)
    gt_area, pred_area = gt.sum(1), pred.sum(1)
    iou = inter / np.maximum(gt_area[:, None] + pred_area[None] - inter, 1)
    pair_inter = inter[:, None] + inter[None]                                                   # (n, n, m)
    pair_iou = pair_inter / np.maximum(gt_area[:, None, None] + gt_area[None, :, None] + pred_area - pair_inter, 1)
    spans = (pair_iou >= iou_thresh) & (pair_iou > np.maximum(iou[:, None], iou[None])) & \
        ~np.eye(n, dtype=bool)[:, :, None]                                                      # (n, n, m)
    merged, merge = spans.any(axis=(1, 2)), spans.any(axis=(0, 1))                              # (n,), (m,)
    best_for_gt, best_for_pred = iou.max(axis=1), iou.max(axis=0)
    gt_kinds = ["merged" if merged[i] else "inexact" if best_for_gt[i] >= near_iou else "unseen" for i in range(n)]
    pred_kinds = ["merge" if merge[j] else "duplicate" if best_for_pred[j] >= iou_thresh else
                  "inexact" if best_for_pred[j] >= near_iou else "other" for j in range(m)]
    return gt_kinds, pred_kinds


class OcrbAccumulator:
    """OCRB's single motmetrics accumulator over every video of a test set.

    add_video(gt_frames, pred_frames): per frame (ids, masks (n, H, W)) or (ids, masks, background
    mask (H, W)) for the ground truth; frames start_frame .. stop_frame - 1 are scored. Ids are
    made unique per video (OCRB numbers them across the test set), so no track continues from one
    video into the next. Each scored object and prediction also gets its `error_kinds`, which the
    summary counts for the misses and false positives."""

    def __init__(self, start_frame: int = OCRB_START_FRAME, stop_frame: int | None = None,
                 iou_thresh: float = IOU_THRESHOLD, min_pixels: int = OCRB_MIN_PIXELS, exclude_bg: bool = True):
        self.start_frame, self.stop_frame = start_frame, stop_frame
        self.iou_thresh, self.min_pixels, self.exclude_bg = iou_thresh, min_pixels, exclude_bg
        self.acc = mm.MOTAccumulator(auto_id=True)
        self.num_videos = 0
        self.num_frames = 0
        self._keys = {}
        self.kinds = {}           # (motmetrics frame id, object or prediction key) -> its error kind

    def _key(self, video: int, kind: str, obj_id) -> int:
        return self._keys.setdefault((video, kind, int(obj_id)), len(self._keys))

    def add_video(self, gt_frames, pred_frames) -> None:
        if len(gt_frames) != len(pred_frames):
            raise ValueError(f"{len(gt_frames)} ground-truth frames but {len(pred_frames)} predicted frames")
        video = self.num_videos
        stop = len(gt_frames) if self.stop_frame is None else min(self.stop_frame, len(gt_frames))
        for t in range(self.start_frame, stop):
            gt, (pred_ids, pred_masks) = gt_frames[t], pred_frames[t]
            background = gt[2] if len(gt) > 2 and self.exclude_bg else None
            gt_ids, gt_masks, pred_ids, pred_masks = ocrb_frame(gt[0], gt[1], pred_ids, pred_masks, background,
                                                                self.min_pixels)
            gt_keys = [self._key(video, "gt", i) for i in gt_ids]
            pred_keys = [self._key(video, "pred", i) for i in pred_ids]
            dist = mask_iou_distance(gt_masks, pred_masks, self.iou_thresh) if len(gt_keys) and len(pred_keys) \
                else np.ones((len(gt_keys), len(pred_keys)))
            frame = self.acc.update(gt_keys, pred_keys, dist)
            gt_kinds, pred_kinds = error_kinds(gt_masks, pred_masks, self.iou_thresh)
            self.kinds.update({(frame, key): kind for key, kind in zip(gt_keys + pred_keys, gt_kinds + pred_kinds)})
            self.num_frames += 1
        self.num_videos += 1

    def summary(self) -> dict:
        """OCRB's numbers (percent) and the counts behind them, pooled over all videos."""
        return ocrb_summary(self.acc, self.num_videos, self.num_frames, self.start_frame, self.kinds)


def ocrb_summary(acc, num_videos: int = 0, num_frames: int = 0, start_frame: int = OCRB_START_FRAME,
                 kinds: dict | None = None) -> dict:
    """OCRB's metrics of one accumulator (eval_utils.compute_mot_metrics), in percent. With `kinds`
    ((frame id, object or prediction id) -> `error_kinds` kind), also 'errors': the misses and the
    false positives by kind, in percent of the ground-truth objects (they add up to 'miss' and
    'false_positives')."""
    events = acc.mot_events
    events = events[~events.Type.isin(["RAW", "MIGRATE", "TRANSFER", "ASCEND"])]
    types = events.Type.astype(str)
    matches, switches = int((types == "MATCH").sum()), int((types == "SWITCH").sum())
    misses, false_positives = int((types == "MISS").sum()), int((types == "FP").sum())
    objects = matches + switches + misses
    detected_pairs = events.loc[types.isin(["MATCH", "SWITCH"]), "D"].astype(float)
    frames = events.OId.value_counts()
    tracked = events[types == "MATCH"].OId.value_counts().reindex(frames.index, fill_value=0)
    detected = events[types != "MISS"].OId.value_counts().reindex(frames.index, fill_value=0)
    unique = len(frames)
    per_object = lambda n: 100.0 * n / objects if objects else float("nan")  # noqa: E731
    per_unique = lambda n: 100.0 * n / unique if unique else float("nan")    # noqa: E731
    summary = {
        "mota": 100.0 * (1 - (misses + false_positives + switches) / objects) if objects else float("nan"),
        "motp": 100.0 * (1 - float(detected_pairs.mean())) if len(detected_pairs) else float("nan"),
        "mostly_detected": per_unique(int((detected / frames >= LIFESPAN_RATIO).sum())),
        "mostly_tracked": per_unique(int((tracked / frames >= LIFESPAN_RATIO).sum())),
        "match": per_object(matches), "miss": per_object(misses),
        "id_switches": per_object(switches), "false_positives": per_object(false_positives),
        "num_objects": objects, "num_unique_objects": unique, "num_matches": matches, "num_switches": switches,
        "num_misses": misses, "num_false_positives": false_positives,
        "num_videos": num_videos, "num_frames": num_frames, "start_frame": start_frame,
    }
    if kinds is not None:
        frame_ids = events.index.get_level_values("FrameId")

        def by_kind(event: str, column: str, names: tuple) -> dict:
            rows = (types == event).to_numpy()
            counted = Counter(kinds[(frame, int(key))] for frame, key in zip(frame_ids[rows], events[column][rows]))
            return {name: per_object(counted[name]) for name in names}

        summary["errors"] = {"miss": by_kind("MISS", "OId", MISS_KINDS),
                             "false_positive": by_kind("FP", "HId", FALSE_POSITIVE_KINDS)}
    return summary


def ocrb_metrics(videos, **options) -> dict:
    """OCRB's metrics of [(gt_frames, pred_frames)] per video (see OcrbAccumulator)."""
    acc = OcrbAccumulator(**options)
    for gt_frames, pred_frames in videos:
        acc.add_video(gt_frames, pred_frames)
    return acc.summary()


# ------------------------------------------------------------------------------------------------
# Several runs (training seeds): mean +- standard deviation
# ------------------------------------------------------------------------------------------------

AGGREGATE_SKIP = {"step", "tau", "seq_len", "min_gt_area", "num_sequences", "frame_skip", "observe_frames",
                  "start_frame", "samples"}


def numeric_leaves(report: dict, prefix: str = "") -> dict:
    """{"section.key": value} of every number in a (nested) report, lists and flags left out."""
    leaves = {}
    for key, value in report.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            leaves.update(numeric_leaves(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key not in AGGREGATE_SKIP:
            leaves[name] = float(value)
    return leaves


def aggregate_reports(reports: list) -> dict:
    """{metric: {"mean", "std", "n"}} over several report.json contents (e.g. training seeds): the
    std is the sample standard deviation (ddof 1; NaN for one run); a metric missing or null in a
    run is left out of that run's numbers."""
    values = {}
    for report in reports:
        for name, value in numeric_leaves(report).items():
            if math.isfinite(value):
                values.setdefault(name, []).append(value)
    return {name: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else float("nan"),
                   "n": len(v)} for name, v in values.items()}


def aggregate_table(reports: list) -> str:
    """The mean +- std table of report.json contents (dicts, one per run)."""
    stats = aggregate_reports(reports)
    if not stats:
        return "no numbers in the reports"
    width = max(len(name) for name in stats)
    lines = [f"{'metric':<{width}}  {'mean':>12}  {'std':>10}  n   ({len(reports)} reports)"]
    for name, s in stats.items():
        std = "n/a" if not math.isfinite(s["std"]) else f"{s['std']:.4f}"
        lines.append(f"{name:<{width}}  {s['mean']:>12.4f}  {std:>10}  {s['n']}")
    return "\n".join(lines)
