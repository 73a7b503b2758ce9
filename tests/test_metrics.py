"""metrics.py: the object-centric representation benchmark's (OCRB) tracking protocol on hand-made
videos with answers computed by hand, the argmax binarisation, and the aggregation of several
report.json files."""
import json
import math
from types import SimpleNamespace

import motmetrics as mm
import numpy as np
import pytest
import torch

import evaluate as ev
import metrics as mt

SIZE = 32


def square(x, y, side=4, size=SIZE):
    """(size, size) bool mask of a side x side square at column x, row y."""
    mask = np.zeros((size, size), dtype=bool)
    mask[y:y + side, x:x + side] = True
    return mask


def frame(ids, masks):
    return np.asarray(ids, dtype=np.int64), np.asarray(masks, dtype=bool).reshape(len(ids), SIZE, SIZE)


def two_objects(num_frames=5):
    """Ground truth: objects 1 and 2 (4x4 squares, 16 pixels) far apart, moving 1 px right per frame."""
    return [frame([1, 2], [square(2 + t, 2), square(2 + t, 20)]) for t in range(num_frames)]


def relabel(frames, offset=100):
    return [(ids + offset, masks.copy()) for ids, masks in frames]


def expected(**changes):
    """A perfect tracker's numbers, with `changes`."""
    base = dict(mota=100.0, motp=100.0, mostly_detected=100.0, mostly_tracked=100.0, match=100.0, miss=0.0,
                id_switches=0.0, false_positives=0.0)
    base.update(changes)
    return base


def check(m, **numbers):
    for key, value in numbers.items():
        assert m[key] == pytest.approx(value, abs=1e-9), key


# ------------------------------------------------------------------------------------------------
# Known answers
# ------------------------------------------------------------------------------------------------

def test_perfect_tracker():
    gt = two_objects(5)
    m = mt.ocrb_metrics([(gt, relabel(gt))])
    check(m, **expected())
    # frames 2, 3, 4 are scored (OCRB's start_step 2): 2 objects x 3 frames
    assert (m["num_objects"], m["num_unique_objects"], m["num_frames"], m["num_videos"]) == (6, 2, 3, 1)


def test_motp_is_the_mean_iou_of_the_matched_pairs_in_percent():
    gt = two_objects(4)
    pred = []
    for t, (ids, masks) in enumerate(gt):
        grown = masks.copy()
        grown[0, 2:6, 6 + t] = True                        # object 1: 16 px + a column of 4: IoU 16 / 20
        pred.append((ids + 10, grown))
    m = mt.ocrb_metrics([(gt, pred)])
    check(m, **expected(motp=100 * (0.8 + 1.0) / 2))       # frames 2, 3: IoUs 0.8, 1, 0.8, 1


def test_one_id_switch():
    gt = [frame([1], [square(2 + t, 2)]) for t in range(6)]
    pred = [frame([7 if t != 3 else 8], [square(2 + t, 2)]) for t in range(6)]   # id 8 in frame 3 only
    m = mt.ocrb_metrics([(gt, pred)], start_frame=1)
    # frames 1..5: MATCH, MATCH, SWITCH (7 -> 8), SWITCH (8 -> 7), MATCH ... motmetrics counts the way back too
    assert m["num_switches"] == 2 and m["num_objects"] == 5
    check(m, mota=100 * (1 - 2 / 5), match=60.0, id_switches=40.0, miss=0.0, false_positives=0.0,
          mostly_detected=100.0, mostly_tracked=0.0)     # MATCH in 3 / 5 frames < 80%
    once = [frame([7 if t < 3 else 8], [square(2 + t, 2)]) for t in range(6)]   # 7, then 8 for good
    m = mt.ocrb_metrics([(gt, once)], start_frame=1)
    assert m["num_switches"] == 1
    check(m, mota=80.0, match=80.0, id_switches=20.0, mostly_tracked=100.0, mostly_detected=100.0)   # 4 / 5 >= 80%


def test_one_miss_and_a_partly_detected_object():
    gt = two_objects(6)
    pred = relabel(gt)
    pred[3] = (pred[3][0][:1], pred[3][1][:1])             # object 2 missed in frame 3
    m = mt.ocrb_metrics([(gt, pred)], start_frame=1)      # frames 1..5: 10 objects
    check(m, mota=90.0, match=90.0, miss=10.0, mostly_detected=100.0, mostly_tracked=100.0)   # 4 / 5 >= 80%
    pred[4] = (pred[4][0][:1], pred[4][1][:1])             # ... and in frame 4: detected 3 / 5 < 80%
    m = mt.ocrb_metrics([(gt, pred)], start_frame=1)
    check(m, mota=80.0, match=80.0, miss=20.0, mostly_detected=50.0, mostly_tracked=50.0)


def test_one_false_positive_and_the_five_pixel_rule():
    gt = [frame([1], [square(2 + t, 2)]) for t in range(5)]
    pred = relabel(gt)
    extra = np.zeros((SIZE, SIZE), dtype=bool)
    extra[20, 20:26] = True                                 # 6 pixels: more than 5, a prediction
    pred[3] = frame([101, 102], [pred[3][1][0], extra])
    m = mt.ocrb_metrics([(gt, pred)], start_frame=1, exclude_bg=False)
    check(m, mota=75.0, false_positives=25.0, match=100.0)  # 4 objects, 1 false positive
    extra[20, 25] = False                                   # 5 pixels: no prediction at all
    pred[3] = frame([101, 102], [pred[3][1][0], extra])
    check(mt.ocrb_metrics([(gt, pred)], start_frame=1), **expected())
    tiny_gt = [frame([1, 2], [square(2 + t, 2), extra]) for t in range(5)]   # ... nor ground truth
    check(mt.ocrb_metrics([(tiny_gt, relabel(gt))], start_frame=1), **expected())


def test_errors_before_the_start_frame_do_not_count():
    gt = two_objects(5)
    pred = relabel(gt)
    pred[0] = (pred[0][0][:1], pred[0][1][:1])             # a miss in frame 0
    pred[1] = frame([101, 102, 103], [*pred[1][1], square(12, 12)])   # a false positive in frame 1
    pred[1] = (np.array([101, 109, 103]), pred[1][1])       # and object 2 under another id in frame 1
    check(mt.ocrb_metrics([(gt, pred)]), **expected())    # OCRB's default: frames 2.. only
    m = mt.ocrb_metrics([(gt, pred)], start_frame=0)       # every frame: 10 objects
    # object 2: missed in frame 0, first matched by 109 in frame 1 (no switch), by 102 from frame 2 on (a switch)
    assert (m["num_misses"], m["num_false_positives"], m["num_switches"]) == (1, 1, 1)
    check(m, mota=100 * (1 - 3 / 10))
    only_first = relabel(gt)
    only_first[0] = (only_first[0][0][:1], only_first[0][1][:1])
    check(mt.ocrb_metrics([(gt, only_first)], start_frame=1), **expected())   # first frame only: excluded


def test_iou_of_exactly_one_half_matches():
    gt = [frame([1], [square(2, 2)]) for _ in range(3)]    # 16 pixels
    half = square(2, 2)
    half[4:6] = False                                       # rows 4, 5 off: 8 pixels inside, IoU 0.5
    m = mt.ocrb_metrics([(gt, [frame([5], [half])] * 3)], start_frame=0)
    check(m, mota=100.0, motp=50.0)
    less = half.copy()
    less[3, 2] = False                                      # 7 pixels: IoU 7 / 16 < 0.5
    m = mt.ocrb_metrics([(gt, [frame([5], [less])] * 3)], start_frame=0)
    check(m, mota=100 * (1 - 6 / 3), miss=100.0, false_positives=100.0, match=0.0)
    assert math.isnan(m["motp"])


def rectangle(x, y, w, h):
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[y:y + h, x:x + w] = True
    return mask


def test_misses_and_false_positives_by_kind():
    """One frame of seven objects: the misses and false positives split into error_kinds, which add up."""
    a, b = rectangle(2, 2, 4, 4), rectangle(6, 2, 6, 4)     # one prediction spans both, matches b (IoU 0.6)
    c, d = rectangle(14, 2, 4, 4), rectangle(18, 2, 4, 4)   # one spans both and matches neither (16 / 36)
    e = rectangle(2, 20, 4, 4)                              # found 2 px off: IoU 8 / 24
    f = rectangle(12, 20, 4, 4)                             # found twice
    g = rectangle(22, 20, 4, 4)                             # not found
    gt = [frame([1, 2, 3, 4, 5, 6, 7], [a, b, c, d, e, f, g])]
    pred = [frame([11, 12, 13, 14, 15, 16], [a | b, c | d | rectangle(14, 6, 4, 1), rectangle(4, 20, 4, 4), f, f,
                                             rectangle(26, 26, 4, 4)])]
    m = mt.ocrb_metrics([(gt, pred)], start_frame=0)
    assert (m["num_objects"], m["num_matches"], m["num_misses"], m["num_false_positives"]) == (7, 2, 5, 4)
    check(m["errors"]["miss"], merged=100 * 3 / 7, inexact=100 / 7, unseen=100 / 7)
    check(m["errors"]["false_positive"], merge=100 / 7, duplicate=100 / 7, inexact=100 / 7, other=100 / 7)
    assert sum(m["errors"]["miss"].values()) == pytest.approx(m["miss"])
    assert sum(m["errors"]["false_positive"].values()) == pytest.approx(m["false_positives"])
    gt_kinds, pred_kinds = mt.error_kinds(gt[0][1], pred[0][1])
    assert gt_kinds == ["merged", "merged", "merged", "merged", "inexact", "inexact", "unseen"]   # b and f: matched
    assert pred_kinds == ["merge", "merge", "inexact", "duplicate", "duplicate", "other"]
    assert mt.error_kinds(gt[0][1], np.zeros((0, SIZE, SIZE))) == (["unseen"] * 7, [])


def test_predictions_on_the_background_are_left_out():
    gt_masks = [square(2 + t, 2) for t in range(4)]
    background = [~m for m in gt_masks]
    whole = np.ones((SIZE, SIZE), dtype=bool)
    gt = [(np.array([1]), m[None], bg) for m, bg in zip(gt_masks, background)]
    pred = [frame([3, 4], [m, whole]) for m in gt_masks]   # a slot that took the whole frame
    check(mt.ocrb_metrics([(gt, pred)]), **expected())    # IoU with the background > 0.2: dropped
    m = mt.ocrb_metrics([(gt, pred)], exclude_bg=False)
    check(m, false_positives=100.0, mota=0.0)


def test_videos_are_pooled_not_averaged_and_ids_do_not_carry_over():
    gt = two_objects(5)
    lost = [frame([1], [square(2 + t, 2)]) for t in range(5)]
    nothing = [frame([], []) for _ in range(5)]
    m = mt.ocrb_metrics([(gt, relabel(gt)), (lost, nothing)])
    # video 1: 6 objects matched; video 2: 3 objects missed. Pooled: 1 - 3 / 9, not (100 + (-0)) / 2 = 50
    check(m, mota=100 * (1 - 3 / 9), miss=100 * 3 / 9, mostly_detected=100 * 2 / 3, mostly_tracked=100 * 2 / 3)
    # the same ids in two videos, predicted under different ids: no switch from one video to the next
    m = mt.ocrb_metrics([(gt, relabel(gt, 100)), (gt, relabel(gt, 200))])
    check(m, **expected())
    assert m["num_unique_objects"] == 4


def test_agrees_with_motmetrics_own_summary():
    rng = np.random.default_rng(0)
    gt = two_objects(8)
    pred = []
    for t, (ids, masks) in enumerate(gt):
        keep = rng.random(2) < 0.8
        pred_ids = np.where(rng.random(2) < 0.2, ids + 50, ids + 10)[keep]
        pred.append((pred_ids, masks[keep]))
    acc = mt.OcrbAccumulator(start_frame=0)
    acc.add_video(gt, pred)
    m = acc.summary()
    row = mm.metrics.create().compute(acc.acc, metrics=["mota", "motp", "num_objects", "num_matches",
                                                        "num_switches", "num_misses", "num_false_positives"])
    assert m["mota"] == pytest.approx(100 * float(row["mota"].iloc[0]))
    assert m["motp"] == pytest.approx(100 * (1 - float(row["motp"].iloc[0])))
    assert m["num_objects"] == int(row["num_objects"].iloc[0])
    for key in ("num_matches", "num_switches", "num_misses", "num_false_positives"):
        assert m[key] == int(row[key].iloc[0]), key
    assert m["match"] + m["miss"] + m["id_switches"] == pytest.approx(100.0)


def test_argmax_masks_give_each_pixel_to_one_slot_or_the_background():
    soft = np.array([[[0.6, 0.2, 0.1]], [[0.3, 0.5, 0.1]]])     # 2 slots, a 1 x 3 image
    background = np.array([[0.1, 0.3, 0.8]])
    masks = mt.argmax_masks(soft, background)
    assert masks.tolist() == [[[True, False, False]], [[False, True, False]]]
    assert mt.argmax_masks(soft).tolist() == [[[True, False, True]], [[False, True, False]]]   # tie: first slot
    assert mt.argmax_masks(np.zeros((0, 1, 3)), background).shape == (0, 1, 3)


def test_ocrb_frame_predictions_follow_the_composite():
    """Two overlapping objects: the overlap goes to the nearer one (smaller z_depth); pixels of no
    object to the background; only objects with z_pres > 0.5 are predictions."""
    H = W = 16
    z_where = torch.tensor([[[0.25, 0.25, -0.25, -0.25], [0.25, 0.25, 0.0, 0.0], [0.25, 0.25, 0.5, 0.5]]])
    z_pres = torch.tensor([[1.0, 1.0, 0.3]])
    alpha = torch.ones(1, 3, 1, 8, 8)
    placed = ev.spatial_transform(alpha[0], z_where[0], (3, 1, H, W), inverse=True)[:, 0]   # (3, H, W)
    alpha_map = (placed * z_pres[0, :, None, None]).sum(0).clamp(1e-5, 1 - 1e-5)[None, None]
    record = SimpleNamespace(z_where=z_where, z_pres=z_pres, z_depth=torch.tensor([[3.0, -3.0, 0.0]]),
                             ids=torch.tensor([[4, 5, 6]]), alpha_glimpse=alpha, alpha_map=alpha_map)
    (ids, masks), = ev.ocrb_frame_predictions(record, H, W)
    assert ids.tolist() == [4, 5]
    first, second = placed[0].numpy() > 0.5, placed[1].numpy() > 0.5
    assert (masks[1] == second).all()                      # the nearer object keeps all of its pixels
    assert (masks[0] == (first & ~second)).all()           # the farther one loses the overlap
    assert not (masks[0] & masks[1]).any()


# ------------------------------------------------------------------------------------------------
# Several runs
# ------------------------------------------------------------------------------------------------

def test_aggregate_reports_mean_and_std(tmp_path, capsys):
    reports = [{"step": 5, "tracking_ocrb": {"mota": 90.0, "motp": 80.0}, "reconstruction": {"mse": 0.01},
                "first_frame_rejection": True},
               {"step": 6, "tracking_ocrb": {"mota": 94.0, "motp": None}, "reconstruction": {"mse": 0.03},
                "first_frame_rejection": True}]
    stats = mt.aggregate_reports(reports)
    assert stats["tracking_ocrb.mota"] == {"mean": 92.0, "std": pytest.approx(math.sqrt(8)), "n": 2}
    assert stats["tracking_ocrb.motp"]["n"] == 1 and math.isnan(stats["tracking_ocrb.motp"]["std"])
    assert stats["reconstruction.mse"]["mean"] == pytest.approx(0.02)
    assert "step" not in stats and "first_frame_rejection" not in stats
    paths = []
    for k, report in enumerate(reports):
        path = tmp_path / f"seed{k}" / "report.json"
        path.parent.mkdir()
        path.write_text(json.dumps(report))
        paths.append(str(path))
    assert ev.main(["--aggregate", *paths]) == 0
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if row.startswith("tracking_ocrb.mota"))
    assert line.split()[1:] == ["92.0000", f"{math.sqrt(8):.4f}", "2"]
    assert ev.main(["--aggregate", str(tmp_path / "missing.json")]) == 2
    assert "no report" in capsys.readouterr().err
    for bad in ('{"step": 5,', "[1, 2]", "{}", '{"checkpoint": "c.pt", "step": 5, "videos": {}}',
                "[" * 100000 + "]" * 100000):    # not JSON; not an object; no report's keys (a track.json); too deep
        (tmp_path / "bad.json").write_text(bad)
        assert ev.main(["--aggregate", paths[0], str(tmp_path / "bad.json")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"'{tmp_path / 'bad.json'}' is not a report.json" in err
    assert ev.main([f"--aggregate={paths[0]}"]) == 0 and "tracking_ocrb.mota" in capsys.readouterr().out
    (tmp_path / "other.json").write_text(json.dumps(dict(reports[1], seq_len=20)))    # another test set
    assert ev.main(["--aggregate", paths[0], str(tmp_path / "other.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "evaluated on different data (seq_len None in" in err
