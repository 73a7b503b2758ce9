"""evaluate.py: box geometry, IoU distances, tracking/counting metrics on known answers, RLE, and the
command line end to end on a tiny untrained model."""
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import evaluate as ev
import metrics as mt
from common import small_config
from data import make_sprites, write_to_disk
from scalor import SCALOR
from checkpoints import save_checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny models run fastest on one thread


# ------------------------------------------------------------------------------------------------
# Helpers: synthetic ground truth
# ------------------------------------------------------------------------------------------------

def moving_boxes(num_objects=2, num_frames=6):
    """Per frame (ids, xywh): objects 1..N, 10x8 boxes far apart, moving 2 px right per frame."""
    frames = []
    for t in range(num_frames):
        ids = np.arange(1, num_objects + 1)
        boxes = np.array([[5.0 + 2 * t, 5.0 + 30 * k, 10.0, 8.0] for k in range(num_objects)])
        frames.append((ids, boxes))
    return frames


def boxes_to_masks(frames, size=128):
    """The same frames with each (whole-pixel) box turned into a filled (size, size) mask."""
    result = []
    for ids, boxes in frames:
        masks = np.zeros((len(ids), size, size), dtype=bool)
        for k, (x, y, w, h) in enumerate(boxes.astype(int)):
            masks[k, y:y + h, x:x + w] = True
        result.append((ids, masks))
    return result


# ------------------------------------------------------------------------------------------------
# Tracking metrics on known answers
# ------------------------------------------------------------------------------------------------

def test_ground_truth_as_predictions_is_perfect():
    gt = moving_boxes(num_objects=3, num_frames=5)
    pred = [(ids + 100, boxes.copy()) for ids, boxes in gt]   # different id values, same tracks
    m = mt.tracking_metrics(gt, pred)
    assert m["mota"] == 1.0
    assert m["motp_distance"] == 0.0 and m["motp_iou"] == 1.0
    assert m["idf1"] == 1.0
    assert (m["id_switches"], m["false_positives"], m["misses"]) == (0, 0, 0)
    assert (m["num_objects"], m["matches"], m["num_unique_objects"]) == (15, 15, 3)
    assert (m["mostly_tracked"], m["mostly_detected"], m["partially_tracked"], m["mostly_lost"]) == (3, 3, 0, 0)


def test_ground_truth_masks_as_predictions_is_perfect():
    gt = boxes_to_masks(moving_boxes(num_objects=2, num_frames=4))
    m = mt.tracking_metrics(gt, gt, distance=mt.mask_iou_distance)
    assert m["mota"] == 1.0 and m["motp_distance"] == 0.0 and m["motp_iou"] == 1.0
    assert (m["id_switches"], m["false_positives"], m["misses"]) == (0, 0, 0)


def test_swapping_two_ids_once_gives_two_switches():
    gt = moving_boxes(num_objects=2, num_frames=6)
    pred = []
    for t, (ids, boxes) in enumerate(gt):
        pred_ids = np.array([11, 12]) if t < 3 else np.array([12, 11])   # swapped from frame 3 on
        pred.append((pred_ids, boxes.copy()))
    m = mt.tracking_metrics(gt, pred)
    assert m["id_switches"] == 2                                      # one per object, at frame 3
    assert (m["false_positives"], m["misses"], m["num_objects"]) == (0, 0, 12)
    assert m["mota"] == pytest.approx(1 - 2 / 12, abs=1e-12)
    assert m["motp_distance"] == 0.0
    # each object: matched in 6/6 frames, without a switch in 5/6 >= 0.8
    assert (m["mostly_tracked"], m["mostly_detected"]) == (2, 2)


def test_dropping_k_objects_in_m_frames_gives_k_times_m_misses():
    k, m_frames = 2, 3
    gt = moving_boxes(num_objects=3, num_frames=8)
    pred = []
    for t, (ids, boxes) in enumerate(gt):
        keep = slice(k, None) if t in (1, 4, 6) else slice(None)      # drop objects 1..k in m frames
        pred.append((ids[keep] + 50, boxes[keep]))
    m = mt.tracking_metrics(gt, pred)
    assert m["misses"] == k * m_frames
    assert (m["false_positives"], m["id_switches"]) == (0, 0)
    assert m["mota"] == pytest.approx(1 - k * m_frames / 24, abs=1e-12)
    # the dropped objects are matched in 5/8 frames: partially tracked, not mostly
    assert (m["mostly_tracked"], m["mostly_detected"], m["partially_tracked"]) == (1, 1, 2)


def test_false_positives_are_counted():
    gt = moving_boxes(num_objects=1, num_frames=4)
    pred = [(np.array([7, 8]), np.concatenate((boxes, [[100.0, 100.0, 5.0, 5.0]]))) for _, boxes in gt]
    m = mt.tracking_metrics(gt, pred)
    assert (m["false_positives"], m["misses"], m["id_switches"]) == (4, 0, 0)
    assert m["mota"] == pytest.approx(1 - 4 / 4, abs=1e-12)


def test_summarize_adds_up_sequences():
    gt = moving_boxes(num_objects=2, num_frames=3)
    pred_miss = [(ids[:1], boxes[:1]) for ids, boxes in gt]           # second object always missed
    accs = [mt.accumulate(gt, gt), mt.accumulate(gt, pred_miss)]
    m = mt.summarize(accs, ["a", "b"])
    assert (m["num_objects"], m["misses"], m["num_unique_objects"]) == (12, 3, 4)
    assert (m["mostly_tracked"], m["mostly_lost"]) == (3, 1)


def test_errors_by_frame_pool_sequences_frame_by_frame():
    gt = moving_boxes(num_objects=2, num_frames=4)
    swapped = [(np.array([11, 12]) if t < 2 else np.array([12, 11]), boxes) for t, (_, boxes) in enumerate(gt)]
    stray = [(np.array([1, 2, 9]), np.concatenate((boxes, [[100.0, 100.0, 5.0, 5.0]]))) if t == 3 else (ids, boxes)
             for t, (ids, boxes) in enumerate(gt)]                    # one false positive in the last frame
    empty = [(ids[:0], boxes[:0]) for ids, boxes in gt[:2]]           # no objects, nothing predicted: 2 frames
    dropped = [(ids[:1], boxes[:1]) if t == 1 else (ids, boxes) for t, (ids, boxes) in enumerate(gt[:3])]
    accs = [mt.accumulate(empty, empty), mt.accumulate(gt[:3], dropped), mt.accumulate(gt, swapped),
            mt.accumulate(gt, stray)]                                 # shortest first: the counts grow
    m = mt.summarize(accs)
    by_frame = m["by_frame"]
    assert by_frame == {"objects": [6, 6, 6, 4], "false_positives": [0, 0, 0, 1], "misses": [0, 1, 0, 0],
                        "id_switches": [0, 0, 2, 0]}
    assert [sum(by_frame[k]) for k in ("objects", "false_positives", "misses", "id_switches")] == \
        [m["num_objects"], m["false_positives"], m["misses"], m["id_switches"]]


def test_motp_is_the_mean_over_all_matches_when_a_sequence_has_none():
    """A sequence without any match must not make the overall MOTP NaN (motmetrics' own does)."""
    gt = moving_boxes(num_objects=1, num_frames=2)
    shifted = [(ids, boxes + np.array([boxes[0][2] / 4, 0, 0, 0])) for ids, boxes in gt]   # IoU 0.6 each
    nothing = [(ids[:0], boxes[:0]) for ids, boxes in gt]
    m = mt.summarize([mt.accumulate(gt, shifted), mt.accumulate(gt, nothing)], ["a", "b"])
    assert (m["matches"], m["misses"]) == (2, 2)
    assert m["motp_iou"] == pytest.approx(0.6)


# ------------------------------------------------------------------------------------------------
# Geometry
# ------------------------------------------------------------------------------------------------

def test_box_shifted_by_half_its_width_has_iou_one_third():
    a = np.array([[10.0, 20.0, 8.0, 6.0]])
    b = np.array([[14.0, 20.0, 8.0, 6.0]])
    assert mt.iou_xywh(a, b)[0, 0] == 1 / 3
    assert mt.iou_xywh(a, a)[0, 0] == 1.0
    assert mt.iou_xywh(a, [[18.0, 20.0, 8.0, 6.0]])[0, 0] == 0.0       # touching edges
    dist = mt.iou_matrix_distance(a, np.concatenate((a, b)))
    assert dist[0, 0] == 0.0 and np.isnan(dist[0, 1])                  # IoU 1/3 < 0.5: never paired
    # the same through the normalised-coordinate conversion
    z = np.array([[0.25, 0.25, 0.0, 0.0], [0.25, 0.25, 0.25, 0.0]])
    boxes = mt.xyxy_to_xywh(ev.box_to_pixels(z, 64, 64))
    assert mt.iou_xywh(boxes[:1], boxes[1:])[0, 0] == 1 / 3


def test_box_to_pixels_known_values():
    z = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [0.5, 0.25, 0.5, -0.5]]])   # (B=1, R=2, 4)
    xyxy = ev.box_to_pixels(z, 32, 64)                                     # H=32, W=64
    assert xyxy.shape == (1, 2, 4)
    np.testing.assert_array_equal(xyxy[0, 0], [0, 0, 64, 32])             # the whole frame
    np.testing.assert_array_equal(xyxy[0, 1], [32, 4, 64, 12])
    np.testing.assert_array_equal(mt.xyxy_to_xywh(xyxy)[0, 1], [32, 4, 32, 8])
    np.testing.assert_array_equal(mt.box_centres([[32, 4, 32, 8]]), [[48, 8]])


def test_mask_iou_distance_known_values():
    a = np.zeros((1, 4, 4), dtype=bool)
    a[0, :2, :2] = True                                                   # 4 pixels
    b = np.zeros((3, 4, 4), dtype=bool)
    b[0, :2, :2] = True                                                   # same
    b[1, :2, :3] = True                                                   # 6 pixels, IoU 4/6
    b[2, :1, :2] = True                                                   # 2 pixels, IoU 2/4
    np.testing.assert_allclose(mt.mask_iou(a, b), [[1.0, 2 / 3, 0.5]])
    np.testing.assert_allclose(mt.mask_iou_distance(a, b), [[0.0, 1 / 3, 0.5]])
    assert np.isnan(mt.mask_iou_distance(a, b, thresh=0.6)[0, 2])
    assert mt.mask_iou_distance(a, np.zeros((0, 4, 4), bool)).shape == (1, 0)


def test_placed_masks_match_the_boxes():
    """An all-ones glimpse placed at a box covers exactly the box's pixels."""
    G, H, W = 16, 64, 64
    record = SimpleNamespace(
        z_pres=torch.tensor([[0.9, 0.2, 0.8]]),
        z_where=torch.tensor([[[0.25, 0.25, 0.0, 0.0], [0.1, 0.1, 0.5, 0.5], [0.125, 0.25, -0.5, 0.5]]]),
        ids=torch.tensor([[3, 4, 9]]),
        alpha_glimpse=torch.ones(1, 3, 1, G, G))
    (objects,) = ev.frame_predictions(record, H, W)
    assert objects.ids.tolist() == [3, 9]                                 # z_pres 0.2 is not an object
    np.testing.assert_allclose(objects.conf, [0.9, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(objects.xywh, [[24, 24, 16, 16], [12, 40, 8, 16]])
    for mask, (x, y, w, h) in zip(objects.masks, objects.xywh.astype(int)):
        expected = np.zeros((H, W), dtype=bool)
        expected[y:y + h, x:x + w] = True
        np.testing.assert_array_equal(mask, expected)


def test_mask_boxes_are_tight_boxes_of_whole_pixels():
    masks = np.zeros((3, 8, 10), dtype=bool)
    masks[0, 2:5, 3:9] = True               # rows 2-4, columns 3-8
    masks[1, 7, 0] = True                   # one pixel in the corner
    boxes = mt.mask_boxes(masks)            # masks[2] is empty
    np.testing.assert_array_equal(boxes, [[3, 2, 6, 3], [0, 7, 1, 1], [0, 0, 0, 0]])


def test_predictions_that_draw_fewer_than_five_pixels_are_not_detections():
    """z_pres > 0.5 but an alpha that covers < MIN_GT_AREA pixels: left out and counted as invisible."""
    G, H, W = 16, 64, 64
    alpha = torch.ones(1, 3, 1, G, G)
    alpha[0, 1] = 0.0                                                    # draws nothing
    record = SimpleNamespace(z_pres=torch.tensor([[0.9, 0.95, 0.99]]),   # the third: a 2x2-pixel box
                             z_where=torch.tensor([[[0.25, 0.25, 0.0, 0.0], [0.25, 0.25, 0.5, 0.5],
                                                    [0.03125, 0.03125, -0.46875, -0.46875]]]),
                             ids=torch.tensor([[3, 4, 5]]), alpha_glimpse=alpha)
    (objects,) = ev.frame_predictions(record, H, W)
    assert objects.ids.tolist() == [3] and objects.invisible == 2
    (all_objects,) = ev.frame_predictions(record, H, W, min_area=1)
    assert all_objects.ids.tolist() == [3, 5] and all_objects.invisible == 1
    assert all_objects.masks[1].sum() == 4
    np.testing.assert_array_equal(objects.tight, [[24, 24, 16, 16]])


# ------------------------------------------------------------------------------------------------
# RLE, counting, centre matching
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (13, 7), (64, 64), (31, 1), (1, 29)])
def test_rle_round_trips_exactly(shape):
    rng = np.random.default_rng(sum(shape))
    for mask in (rng.random(shape) < 0.3, rng.random(shape) < 0.9, np.zeros(shape, bool), np.ones(shape, bool)):
        text = mt.rle_encode(mask)
        decoded = mt.rle_decode(text, *shape)
        assert decoded.dtype == bool and decoded.shape == shape
        np.testing.assert_array_equal(decoded, mask)


def test_rle_format():
    assert mt.rle_encode(np.array([[0, 1, 1], [1, 0, 0]])) == "2 3"       # row-major, 1-based starts
    assert mt.rle_encode(np.array([[1, 0], [0, 1]])) == "1 1 4 1"
    assert mt.rle_encode(np.zeros((2, 3))) == ""
    assert mt.rle_encode(np.ones((2, 3))) == "1 6"
    with pytest.raises(ValueError):
        mt.rle_decode("1", 2, 3)
    with pytest.raises(ValueError):
        mt.rle_decode("5 3", 2, 3)


def test_count_metrics_known_answers():
    m = mt.count_metrics([2, 3, 1, 0], [2, 1, 1, 1])
    assert m == {"accuracy": 0.5, "mae": 0.75, "bias": -0.25, "frames": 4}
    assert mt.count_metrics([4, 4], [4, 4])["accuracy"] == 1.0
    with pytest.raises(ValueError):
        mt.count_metrics([1, 2], [1])


def test_match_centres_hungarian_and_greedy():
    gt = [[0.0, 0.0], [10.0, 0.0]]
    pred = [[9.0, 0.0], [19.0, 0.0]]
    assert sorted(mt.match_centres(gt, pred).tolist()) == [9.0, 9.0]      # least total distance
    assert sorted(mt.match_centres(gt, pred, use_scipy=False).tolist()) == [1.0, 19.0]  # closest first
    assert mt.match_centres(gt, np.zeros((0, 2))).size == 0
    assert mt.match_centres(gt, [[3.0, 4.0]]).tolist() == [5.0]


# ------------------------------------------------------------------------------------------------
# The evaluation loop with a model that predicts the ground truth
# ------------------------------------------------------------------------------------------------

class OracleModel:
    """Stands in for SCALOR: its 'inference' is the ground truth of the sprite scene it is shown
    (boxes as z_where, ids, z_pres 1), its reconstruction is the input, its log weights are 0."""

    def __init__(self, cfg, dataset):
        self.cfg, self.dataset = cfg, dataset
        self.scenes = [dataset[i] for i in range(len(dataset))]

    def truth(self, seq):
        index = next(i for i, scene in enumerate(self.scenes) if torch.equal(scene, seq))
        return ev.ground_truth_frames(self.dataset.ground_truth(index))

    def __call__(self, batch, step, tau, generate=False, nll=False, keep_records=False):
        B, T, _, H, W = batch.shape
        truths = [self.truth(seq) for seq in batch]
        R = max(1, max(frame.count for truth in truths for frame in truth))
        records = []
        for t in range(T):
            z_where, z_pres = torch.zeros(B, R, 4), torch.zeros(B, R)
            ids = torch.zeros(B, R, dtype=torch.long)
            for b, truth in enumerate(truths):
                for r, (obj_id, (x, y, w, h)) in enumerate(zip(truth[t].ids, truth[t].xywh)):
                    z_where[b, r] = torch.tensor([w / W, h / H, (x + w / 2) / W * 2 - 1, (y + h / 2) / H * 2 - 1])
                    z_pres[b, r], ids[b, r] = 1.0, int(obj_id)
            records.append(SimpleNamespace(z_where=z_where, z_pres=z_pres, ids=ids,
                                           alpha_glimpse=torch.ones(B, R, 1, 8, 8), background=torch.zeros(B, 3, H, W)))
        zeros = torch.zeros(B, T)
        return SimpleNamespace(recon=batch.clone(), records=records, log_like=zeros, log_imp=zeros)


def test_evaluation_of_perfect_predictions(tmp_path):
    cfg = small_config(seq_len=4, batch_size=2, observe_frames=2)
    data = make_sprites("easy", img_h=64, img_w=64, seq_len=4, num_sequences=3, seed=5)
    args = SimpleNamespace(out=str(tmp_path), gif=1, batch_size=2, workers=0, nll_samples=2,
                           checkpoint="oracle", preset="easy", data_dir=None, frame_skip=None, seq_len=None)
    tally = ev.run(OracleModel(cfg, data), data, 3, args, 0, 1.0, torch.device("cpu"))   # batches of 2 and 1
    report = ev.build_report(tally, args, cfg, 0, 1.0, "sprites")
    box = report["tracking_box"]
    num_objects = sum(f.count for i in range(3) for f in ev.ground_truth_frames(data.ground_truth(i)))
    assert box["num_objects"] == box["matches"] == box["num_predictions"] == num_objects > 0
    assert box["mota"] == 1.0 and box["idf1"] == 1.0
    assert (box["id_switches"], box["false_positives"], box["misses"]) == (0, 0, 0)
    assert box["motp_iou"] == pytest.approx(1.0, abs=1e-5)
    assert box["mostly_tracked"] == box["num_unique_objects"]
    assert report["tracking_mask"]["num_objects"] == num_objects     # masks are boxes here: no exact match
    tight = report["tracking_box_tight"]                             # tight boxes of box masks: the boxes
    assert tight["mota"] == 1.0 and tight["matches"] == num_objects and tight["motp_iou"] == pytest.approx(1.0)
    assert report["invisible_predictions"] == 0 and report["duplicate_predictions"] == 0
    assert report["counting"] == {"accuracy": 1.0, "mae": 0.0, "bias": 0.0, "frames": 12}
    assert report["reconstruction"]["mse"] == 0.0
    assert report["nll"]["nats_per_sequence"] == pytest.approx(0.0, abs=1e-12)   # log w = 0 for every sample
    assert report["generation"]["mse_per_step"] == [0.0, 0.0]
    assert report["generation"]["centre_error_px"] == pytest.approx(0.0, abs=1e-4)
    assert sorted(tally.predictions) == ["000000", "000001", "000002"]
    with open(tmp_path / "tracks_000001.txt") as f:
        first = [line.split(",") for line in f if line.startswith("1,")]
    truth = ev.ground_truth_frames(data.ground_truth(1))[0]
    assert sorted(int(line[1]) for line in first) == sorted(truth.ids.tolist())
    for line in first:
        k = truth.ids.tolist().index(int(line[1]))
        np.testing.assert_allclose([float(v) for v in line[2:6]], truth.xywh[k], atol=0.01)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def read_tracks(out):
    """{sequence: [[10 values] per line]} of the tracks_*.txt files."""
    tracks = {}
    for name in sorted(os.listdir(out)):
        if name.startswith("tracks_"):
            with open(os.path.join(out, name)) as f:
                tracks[name[len("tracks_"):-len(".txt")]] = [line.strip().split(",") for line in f if line.strip()]
    return tracks


def test_main_end_to_end(tmp_path, checkpoint, tiny_cfg):
    out = str(tmp_path / "eval")
    code = ev.main(["--checkpoint", checkpoint, "--num-sequences", "2", "--batch-size", "2", "--out", out,
                    "--nll-samples", "2", "--gif", "1", "--device", "cpu"])
    assert code == 0
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    assert report["step"] == 1234 and report["num_sequences"] == 2 and report["dataset"] == "sprites"
    assert report["tau"] == pytest.approx(math.exp(1234 * math.log(0.5) / 2e4))

    # ground truth computed independently: the test scenes, objects with >= 5 visible pixels
    data = make_sprites("easy", img_h=64, img_w=64, seq_len=3, num_sequences=2, seed=ev.TEST_SEED)
    gt_counts = [int(((gt["ids"][t] >= 0) & (gt["masks"][t].sum((1, 2)) >= 5)).sum())
                 for gt in map(data.ground_truth, range(2)) for t in range(3)]

    tracks = read_tracks(out)
    assert sorted(tracks) == ["000000", "000001"]
    lines = [line for rows in tracks.values() for line in rows]
    assert all(len(line) == 10 and line[7:] == ["-1", "-1", "-1"] for line in lines)
    assert all(1 <= int(line[0]) <= 3 and int(line[1]) >= 1 and 0.5 < float(line[6]) <= 1 for line in lines)
    pred_counts = [sum(1 for line in tracks[s] if int(line[0]) == t + 1) for s in ("000000", "000001") for t in range(3)]

    for kind in ("tracking_box", "tracking_mask"):
        m = report[kind]
        for key in ("mota", "idf1", "id_switches", "false_positives", "misses", "num_objects",
                    "mostly_tracked", "mostly_detected", "partially_tracked", "mostly_lost"):
            assert math.isfinite(m[key]), (kind, key)
        assert m["mota"] <= 1
        assert m["num_objects"] == sum(gt_counts)
        assert m["num_predictions"] == len(lines)
        assert m["mota"] == pytest.approx(1 - (m["misses"] + m["false_positives"] + m["id_switches"]) / m["num_objects"])
        assert m["misses"] + m["matches"] == m["num_objects"]
        assert m["mostly_detected"] + m["partially_tracked"] + m["mostly_lost"] == m["num_unique_objects"]
        assert m["motp_iou"] is None or (0.5 <= m["motp_iou"] <= 1 and m["motp_distance"] == pytest.approx(1 - m["motp_iou"]))

    counting = report["counting"]
    assert counting["frames"] == 6 and 0 <= counting["accuracy"] <= 1
    assert counting["accuracy"] == pytest.approx(np.mean(np.array(gt_counts) == np.array(pred_counts)))
    assert counting["mae"] == pytest.approx(np.mean(np.abs(np.array(gt_counts) - np.array(pred_counts))))
    assert 0 <= report["reconstruction"]["mse"] <= 1
    assert math.isfinite(report["nll"]["nats_per_sequence"]) and report["nll"]["samples"] == 2
    gen = report["generation"]
    assert len(gen["mse_per_step"]) == 2 and all(0 <= v <= 1 for v in gen["mse_per_step"])
    assert len(gen["centre_error_px_per_step"]) == 2
    assert all(v is None or v >= 0 for v in gen["centre_error_px_per_step"])

    with open(os.path.join(out, "predictions.json")) as f:
        predictions = json.load(f)
    assert sorted(predictions) == ["000000", "000001"]
    for seq, frames in predictions.items():
        assert [fr["frame"] for fr in frames] == [0, 1, 2]
        for fr in frames:
            assert len(fr["masks"]) == len(fr["ids"])
            assert sorted(fr["ids"]) == sorted(int(line[1]) for line in tracks[seq] if int(line[0]) == fr["frame"] + 1)
            for text in fr["masks"]:
                assert mt.rle_decode(text, 64, 64).shape == (64, 64)
    assert os.path.isfile(os.path.join(out, "gif_000000.gif"))
    assert not os.path.exists(os.path.join(out, "gif_000001.gif"))


def test_track_mode_writes_exports_only(tmp_path, checkpoint):
    """--track is an alias of track.py (whole videos; tests/test_track.py tests it)."""
    frames = write_to_disk(make_sprites("easy", seq_len=4, num_sequences=1), tmp_path / "frames", 1)
    out = str(tmp_path / "tracks")
    assert ev.main(["--track", "--data-dir", str(frames), "--checkpoint", checkpoint, "--out", out,
                    "--device", "cpu"]) == 0
    names = sorted(os.listdir(out))
    assert names == ["000000.txt", "000000_masks.json", "track.json"]     # track.py's files, no report


def test_track_mode_bad_frames_and_out_folder(tmp_path, checkpoint, capsys):
    """A frame damaged inside (met while reading, after the setup's header checks): one line, exit
    2, no --out folder left; --skip-bad-frames, which the message suggests, exists here too; an
    --out that is a file is refused."""
    from PIL import Image
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for t in range(6):   # noise: a PNG large enough to damage inside
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(frames / f"{t:04d}.png")
    first = frames / "0001.png"
    data = bytearray(first.read_bytes())
    data[200:len(data) - 100] = bytes(len(data) - 300)        # zeroed inside, header and end marker kept
    first.write_bytes(bytes(data))
    out = tmp_path / "tracks"
    flags = ["--track", "--data-dir", str(frames), "--checkpoint", checkpoint, "--device", "cpu"]
    assert ev.main(flags + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]       # after the progress bar
    assert err.startswith("evaluate.py: error: ") and "0001.png' is truncated or corrupt" in err
    assert not out.exists()
    assert ev.main(flags + ["--out", str(tmp_path / "new" / "tracks")]) == 2     # folders made for --out go too
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("")
    assert ev.main(flags + ["--out", str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    (frames / "0002.png").write_bytes((frames / "0002.png").read_bytes()[:300])      # cut short: the header check
    assert ev.main(flags + ["--out", str(out)]) == 2
    assert "pass --skip-bad-frames" in capsys.readouterr().err
    first.unlink()
    assert ev.main(flags + ["--out", str(out), "--skip-bad-frames"]) == 0
    assert "notice: skipped 1 unreadable frames" in capsys.readouterr().out


def test_first_frame_rejection_switched_at_evaluation(tmp_path, checkpoint):
    """An inference rule without parameters: on by default, as track.py infers (the checkpoint was trained
    without it), off with --no-first-frame-rejection (the reference's inference); the same weights."""
    _, default, *_ = ev.prepare(["--checkpoint", checkpoint, "--device", "cpu"])
    _, off, *_ = ev.prepare(["--checkpoint", checkpoint, "--device", "cpu", "--no-first-frame-rejection"])
    assert ev.read_checkpoint(checkpoint)["config"].first_frame_rejection is False
    assert default.cfg.first_frame_rejection is True and off.cfg.first_frame_rejection is False
    assert default.cfg.replace(first_frame_rejection=False) == off.cfg
    assert all(torch.equal(a, b) for a, b in zip(off.state_dict().values(), default.state_dict().values()))
    for flags, expected in (([], True), (["--no-first-frame-rejection"], False)):
        out = str(tmp_path / f"eval{expected}")
        assert ev.main(["--checkpoint", checkpoint, "--num-sequences", "1", "--out", out, "--device", "cpu"] + flags) == 0
        with open(os.path.join(out, "report.json")) as f:
            assert json.load(f)["first_frame_rejection"] is expected


def test_first_frame_rejection_needs_rejection(tmp_path, tiny_cfg, capsys):
    cfg = tiny_cfg.replace(phase_rejection=False)
    path = str(tmp_path / "norej.pt")
    save_checkpoint(path, SCALOR(cfg), step=1, cfg=cfg)
    out = tmp_path / "eval"
    assert ev.main(["--checkpoint", path, "--first-frame-rejection", "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "first_frame_rejection" in err and "phase_rejection" in err
    assert "drop the flag" in err                                                # the fix, named
    assert not out.exists()
    assert ev.main(["--checkpoint", path, "--num-sequences", "1", "--out", str(out), "--device", "cpu"]) == 0
    with open(out / "report.json") as f:
        assert json.load(f)["first_frame_rejection"] is False         # the default where it cannot apply


def data_flags(**given):
    flags = dict(dataset=None, data_dir=None, preset=None, frame_skip=None)
    flags.update(given)
    return SimpleNamespace(**flags)


def test_data_defaults_come_from_the_training_run():
    sprites = {"dataset": "sprites", "data_dir": None, "preset": "few", "frame_skip": None}
    gc = {"dataset": "grandcentral", "data_dir": "/data/gc", "preset": "easy", "frame_skip": 4}
    frames = {"dataset": "frames", "data_dir": "/data/train", "preset": "easy", "frame_skip": 2}
    cases = [  # (training data, flags given) -> (dataset, preset, data_dir, frame_skip)
        ({}, {}, ("sprites", "easy", None, 1)),
        (sprites, {}, ("sprites", "few", None, 1)),
        (sprites, {"preset": "many"}, ("sprites", "many", None, 1)),
        (gc, {}, ("grandcentral", "easy", "/data/gc", 4)),
        (gc, {"data_dir": "/other", "frame_skip": 2}, ("grandcentral", "easy", "/other", 2)),
        (gc, {"dataset": "frames", "data_dir": "/test"}, ("frames", "easy", "/test", 1)),
        (frames, {"data_dir": "/test"}, ("frames", "easy", "/test", 2)),     # never the training frames
        (sprites, {"data_dir": "/f"}, ("frames", "easy", "/f", 1)),      # test frames, not sprites
    ]
    for trained, given, expected in cases:
        args = data_flags(**given)
        ev.resolve_data(args, trained)
        assert (args.dataset, args.preset, args.data_dir, args.frame_skip) == expected, (trained, given)
    for trained, given in [(frames, {}), ({}, {"dataset": "grandcentral"}),
                           ({}, {"preset": "nope"})]:
        with pytest.raises(ev.EvalError):
            ev.resolve_data(data_flags(**given), trained)
    for trained, given, flag in [({}, {"data_dir": "/f", "preset": "spmot"}, "--preset"),   # a flag the data ignores
                                 (sprites, {"frame_skip": 3}, "--frame-skip"), (gc, {"preset": "few"}, "--preset")]:
        with pytest.raises(ev.EvalError, match=f"{flag} is not used with --dataset .*: drop it"):
            ev.resolve_data(data_flags(**given), trained)


@pytest.mark.parametrize("problem", ["missing_checkpoint", "not_a_checkpoint", "missing_data", "short_sequences"])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, checkpoint, capsys, problem):
    out = tmp_path / "out"
    args = {"missing_checkpoint": ["--checkpoint", str(tmp_path / "nope.pt")],
            "not_a_checkpoint": ["--checkpoint", str(tmp_path / "junk.pt")],
            "missing_data": ["--checkpoint", checkpoint, "--dataset", "frames", "--data-dir", str(tmp_path / "none")],
            "short_sequences": ["--checkpoint", checkpoint, "--seq-len", "1"]}     # observe_frames 1
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    assert ev.main(args[problem] + ["--out", str(out)]) == 2
    assert not out.exists()
    err = capsys.readouterr().err.strip()
    assert err.startswith("evaluate.py: error:") and "\n" not in err
    if problem == "short_sequences":
        assert "--seq-len 1 must exceed the checkpoint's observe_frames (1" in err


def test_out_holding_an_input_is_refused_and_an_interrupted_run_writes_nothing(tmp_path, checkpoint, capsys,
                                                                                 monkeypatch):
    """--out holding the checkpoint is refused even with --overwrite; Ctrl-C or SIGTERM during the run
    (utils.sigterm_as_interrupt): exit 130, one line, no --out and no work folder left."""
    assert ev.main(["--checkpoint", checkpoint, "--out", str(tmp_path), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds the input" in err and os.path.exists(checkpoint)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt("SIGTERM")
    monkeypatch.setattr(ev, "run", stopped)
    out = tmp_path / "new" / "eval"
    assert ev.main(["--checkpoint", checkpoint, "--out", str(out), "--device", "cpu"]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == f"evaluate.py: interrupted (SIGTERM): nothing written to --out '{out}'"
    assert not (tmp_path / "new").exists()


def test_duplicates_count_each_extra_copy_of_an_object_once():
    def box(x, y, w=8, h=8):
        m = np.zeros((32, 32), dtype=bool)
        m[y:y + h, x:x + w] = True
        return m
    a, b = box(2, 2), box(20, 20)
    near = box(3, 2)                       # IoU 7/9 with a
    half = box(6, 2)                       # shifted by half the width: IoU 1/3, not a copy
    assert mt.count_duplicates(np.stack([a, b, half])) == 0
    assert mt.count_duplicates(np.stack([a, near, b, a])) == 2
    assert mt.count_duplicates(np.stack([a, box(2, 2, 8, 4)])) == 1      # IoU exactly 0.5 counts
    assert mt.count_duplicates(np.stack([a, box(2, 2, 8, 3)])) == 0      # IoU 3/8
    assert mt.count_duplicates(np.zeros((2, 32, 32), dtype=bool)) == 0    # empty masks: IoU 0
    assert mt.count_duplicates(np.zeros((1, 32, 32), dtype=bool)) == 0
    assert mt.count_duplicates(np.zeros((0, 32, 32), dtype=bool)) == 0


def test_ocrb_protocol_needs_ground_truth_and_frames_to_score(tmp_path, checkpoint, capsys):
    from PIL import Image
    frames = tmp_path / "frames"
    frames.mkdir()
    for t in range(6):
        Image.new("RGB", (64, 64), (t * 40, 0, 0)).save(frames / f"f{t}.png")
    for flags, message in ((["--data-dir", str(frames)], "needs ground-truth masks"),
                           (["--data-dir", str(frames), "--dataset", "sprites"], "--data-dir is not used with"),
                           (["--ocrb-start-frame", "3"], "--ocrb-start-frame 3 leaves no frame of the 3-frame")):
        out = tmp_path / "eval"
        assert ev.main(["--checkpoint", checkpoint, "--out", str(out), "--device", "cpu", "--protocol", "ocrb",
                        "--num-sequences", "1", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and not out.exists()
    assert ev.main(["--checkpoint", checkpoint, "--out", str(out), "--device", "cpu", "--ocrb-start-frame", "1"]) == 2
    assert "--ocrb-start-frame is used with --protocol ocrb only" in capsys.readouterr().err and not out.exists()


def test_ocrb_protocol_end_to_end(tmp_path, checkpoint):
    out = str(tmp_path / "eval")
    assert ev.main(["--checkpoint", checkpoint, "--num-sequences", "2", "--batch-size", "2", "--out", out,
                    "--device", "cpu", "--protocol", "ocrb", "--ocrb-start-frame", "1"]) == 0
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    m = report["tracking_ocrb"]
    assert (m["num_videos"], m["num_frames"], m["start_frame"]) == (2, 4, 1)     # seq_len 3: frames 1 and 2
    if m["num_objects"]:
        assert m["match"] + m["miss"] + m["id_switches"] == pytest.approx(100.0)
        assert m["mota"] == pytest.approx(100 - m["miss"] - m["false_positives"] - m["id_switches"])
        assert sum(m["errors"]["miss"].values()) == pytest.approx(m["miss"])       # the kinds add up
        assert sum(m["errors"]["false_positive"].values()) == pytest.approx(m["false_positives"])
    assert report["tracking_mask"] is not None                                  # the default sections stay
    default = str(tmp_path / "default")
    assert ev.main(["--checkpoint", checkpoint, "--num-sequences", "1", "--out", default, "--device", "cpu"]) == 0
    with open(os.path.join(default, "report.json")) as f:
        assert json.load(f)["tracking_ocrb"] is None
    # --seq-len: longer test sequences, each one forward (OCRB scores 10-frame videos)
    longer = str(tmp_path / "longer")
    assert ev.main(["--checkpoint", checkpoint, "--num-sequences", "2", "--out", longer, "--device", "cpu",
                    "--protocol", "ocrb", "--seq-len", "6"]) == 0
    with open(os.path.join(longer, "report.json")) as f:
        report = json.load(f)
    assert report["seq_len"] == 6 and report["tracking_ocrb"]["num_frames"] == 2 * (6 - 2)
    with open(os.path.join(longer, "predictions.json")) as f:
        assert all(len(frames) == 6 for frames in json.load(f).values())


def test_every_training_seed_is_scored_on_the_same_sprite_test_scenes_never_its_own():
    """OCRB scores every training seed on one test set: the test scenes do not follow the seed."""
    assert ev.test_scene_seed(0) == ev.test_scene_seed(2) == ev.TEST_SEED
    assert ev.test_scene_seed(ev.TEST_SEED) == ev.TEST_SEED + 1           # those would be its training scenes
    test = make_sprites("spmot", num_sequences=2, seed=ev.test_scene_seed(2))
    train = make_sprites("spmot", num_sequences=2, seed=2)
    assert not torch.equal(test[0], train[0]) and not torch.equal(test[1], train[1])


def test_a_checkpoint_of_non_finite_weights_is_refused(tmp_path, checkpoint, capsys):
    """NaN weights would give empty tracks and NaN metrics with exit 0: one line, exit 2, nothing written."""
    import track
    payload = torch.load(checkpoint, weights_only=True)
    next(v for v in payload["model"].values() if v.is_floating_point()).view(-1)[0] = float("nan")
    bad = tmp_path / "nan.pt"
    torch.save(payload, bad)
    frames = write_to_disk(make_sprites("easy", seq_len=3, num_sequences=1), tmp_path / "frames", 1)
    for main, flags in ((ev.main, ["--num-sequences", "1"]), (track.main, [str(frames)])):
        out = tmp_path / "out"
        assert main(["--checkpoint", str(bad), "--out", str(out), "--device", "cpu", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert "nan.pt' holds non-finite or diverged weights" in err and "\n" not in err and not out.exists()
