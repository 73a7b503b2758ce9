"""track.py: whole videos through the model in windows with the state handed across; tracks and masks in
the video's pixels, read back and scored; bad input refused before anything is written."""
import contextlib
import dataclasses
import json
import re
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import evaluate as ev
import track
from common import small_config
from data import load_frame, make_sprites, write_to_disk
from scalor import SCALOR
from scripts.sprite_videos import write_sprite_videos
from checkpoints import save_checkpoint
from utils import unique_names


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny models run fastest on one thread


def read_lines(path):
    with open(path) as f:
        return [line.strip().split(",") for line in f if line.strip()]


def leftovers(folder):
    return [p for p in os.listdir(folder) if ".partial-" in p]


# ------------------------------------------------------------------------------------------------
# The pipeline with an oracle model
# ------------------------------------------------------------------------------------------------

class OracleSCALOR:
    """Stands in for SCALOR with its forward(seq, step, tau, keep_records, state) interface: frame t of
    the video (counted from the handed state's frames_seen) gives the ground truth objects of that
    frame as records (z_where of the tight box, alpha 1 over the glimpse, z_pres 1). It numbers the
    objects as the model does, by first appearance from the state's next id, so ids survive a window
    border only when the state is handed across. It checks that it is shown the video's frames, in
    order, resized as the training data is. From frame `duplicates_from` on, it also follows every
    object with a second track (a new id, the same box), as a model that let a duplicate through.
    `forgetful`: a new id for every object in every frame, as a model that has not learned to track."""

    def __init__(self, cfg, truth, expected_frames, width, height, duplicates_from=None, forgetful=False):
        self.cfg, self.truth, self.expected = cfg, truth, expected_frames
        self.width, self.height = width, height
        self.duplicates_from = duplicates_from
        self.forgetful = forgetful
        self.windows = []

    def to(self, device):
        return self

    def __call__(self, seq, step, tau, keep_records=False, state=None):
        assert keep_records and seq.shape[0] == 1 and seq.shape[-2:] == (self.cfg.img_h, self.cfg.img_w)
        start = 0 if state is None else state.frames_seen
        numbering = {} if state is None else dict(state.numbering)
        next_id = 1 if state is None else state.next_id
        self.windows.append(seq.shape[1])
        records = []
        W, H = self.width, self.height
        for t in range(seq.shape[1]):
            assert torch.equal(seq[0, t], self.expected[start + t])
            gt = self.truth[start + t]
            tracks = [((gt_id, start + t) if self.forgetful else gt_id, box)
                      for gt_id, box in zip(gt.ids.tolist(), gt.xywh.tolist())]
            if self.duplicates_from is not None and start + t >= self.duplicates_from:
                tracks = [(("twin", gt_id), box) for gt_id, box in tracks] + tracks    # listed first
            R = max(1, len(tracks))
            z_where, z_pres, ids = torch.zeros(1, R, 4), torch.zeros(1, R), torch.zeros(1, R, dtype=torch.long)
            for r, (key, (x, y, w, h)) in enumerate(tracks):
                if key not in numbering:
                    numbering[key], next_id = next_id, next_id + 1
                z_where[0, r] = torch.tensor([w / W, h / H, (x + w / 2) / W * 2 - 1, (y + h / 2) / H * 2 - 1])
                z_pres[0, r], ids[0, r] = 1.0, numbering[key]
            records.append(SimpleNamespace(z_where=z_where, z_pres=z_pres, ids=ids, z_depth=torch.zeros(1, R),
                                           alpha_glimpse=torch.ones(1, R, 1, 8, 8),
                                           glimpse=torch.full((1, R, 3, 8, 8), 0.5)))      # one colour: no say
        new_state = SimpleNamespace(frames_seen=start + seq.shape[1], numbering=numbering, next_id=next_id)
        return SimpleNamespace(records=records, state=new_state)


@pytest.fixture(scope="module")
def sprite_video(tmp_path_factory):
    """One 60-frame 96x96 'easy' sprite video on disk and its ground truth (a MOTChallenge file)."""
    root = tmp_path_factory.mktemp("sprites")
    written = write_sprite_videos(root, "easy", num=1, length=60, size=(96, 96), seed=3)
    data = make_sprites("easy", img_h=96, img_w=96, seq_len=60, num_sequences=1, seed=3)
    return SimpleNamespace(frames=written["videos"] / "000000", gt=written["gt"],
                           truth=ev.ground_truth_frames(data.ground_truth(0)))


def oracle_run(monkeypatch, video, out, *flags, duplicates_from=None, forgetful=False):
    cfg = small_config()                                                    # the model sees 64x64 frames
    paths = sorted(video.frames.iterdir())
    expected = torch.stack([load_frame(p, None, cfg.img_h, cfg.img_w) for p in paths])
    oracle = OracleSCALOR(cfg, video.truth, expected, 96, 96, duplicates_from, forgetful)
    monkeypatch.setattr(track, "load_model_checked", lambda args: (oracle, {"step": 0}))
    code = track.main([str(video.frames), "--checkpoint", "oracle", "--out", str(out), "--window", "5",
                       "--device", "cpu", *flags])
    assert code == 0
    return oracle


@pytest.mark.parametrize("box", ["tight", "glimpse"])
def test_oracle_video_tracks_exactly_across_windows(tmp_path, monkeypatch, sprite_video, box, capsys):
    """The oracle's alpha fills its box, so each object's own alpha (--masks alpha) gives back the exact
    ground-truth boxes (the visible reading, where boxes of objects overlap, is tested on its own)."""
    out = tmp_path / "tracks"
    oracle = oracle_run(monkeypatch, sprite_video, out, "--box", box, "--masks", "alpha", "--score", str(sprite_video.gt))
    assert oracle.windows == [5] * 12                                       # 60 frames in windows of 5
    assert sorted(os.listdir(out)) == ["000000.txt", "000000_masks.json", "score.json", "track.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask          # a folder as mkdir makes it

    lines = read_lines(out / "000000.txt")
    assert all(len(line) == 10 and line[7:] == ["-1", "-1", "-1"] for line in lines)
    frames = sorted({int(line[0]) for line in lines})
    assert frames == list(range(1, 61))                                      # one numbering over the video
    # an object visible in all 60 frames keeps one id across the 11 window borders
    always = [i for i in sprite_video.truth[0].ids.tolist() if all(i in f.ids.tolist() for f in sprite_video.truth)]
    assert always
    for gt_id in always:
        ids = set()
        for t, f in enumerate(sprite_video.truth):
            box_gt = f.xywh[f.ids.tolist().index(gt_id)]
            ids |= {int(line[1]) for line in lines if int(line[0]) == t + 1
                    and np.allclose([float(v) for v in line[2:6]], box_gt, atol=0.01)}
        assert len(ids) == 1
    # boxes in the video's 96x96 pixels: exactly the ground truth's
    for t, f in enumerate(sprite_video.truth):
        got = sorted(tuple(float(v) for v in line[2:6]) for line in lines if int(line[0]) == t + 1)
        assert np.allclose(got, sorted(map(tuple, f.xywh.tolist())), atol=0.01)

    score = track.score_folder(str(out), str(sprite_video.gt))["overall"]
    assert score["mota"] == 1.0 and score["id_switches"] == 0 and score["motp_iou"] == pytest.approx(1.0, abs=1e-4)
    assert score["num_objects"] == sum(f.count for f in sprite_video.truth)
    with open(out / "score.json") as f:
        assert json.load(f)["overall"]["mota"] == 1.0
    out_text = capsys.readouterr().out
    assert "MOTA 1.0000" in out_text and "finds objects anew" not in out_text

    with open(out / "000000_masks.json") as f:
        masks = json.load(f)
    assert (masks["width"], masks["height"], masks["num_frames"]) == (96, 96, 60)
    assert [e["frame"] for e in masks["frames"]] == list(range(60))
    entry = masks["frames"][7]
    for obj_id, rle in zip(entry["ids"], entry["masks"]):
        line = next(line for line in lines if int(line[0]) == 8 and int(line[1]) == obj_id)
        assert ev.mask_boxes(ev.rle_decode(rle, 96, 96)[None])[0].tolist() == [float(v) for v in line[2:6]]


def test_a_model_that_finds_objects_anew_in_every_frame_is_named(tmp_path, monkeypatch, sprite_video, capsys):
    oracle_run(monkeypatch, sprite_video, tmp_path / "tracks", forgetful=True)
    with open(tmp_path / "tracks" / "track.json") as f:
        video = json.load(f)["videos"]["000000"]
    lines = read_lines(tmp_path / "tracks" / "000000.txt")
    later = sum(int(line[0]) > 1 for line in lines)
    assert (video["continued_detections"], video["detections_after_first_frame"]) == (0, later) and later > 200
    assert video["objects"] == video["detections"]                          # a new id for every detection
    assert f"notice: only 0 of the {later} detections after the first frames continue a track" in capsys.readouterr().out
    both = {"a": dict(detections_after_first_frame=100, continued_detections=19),
            "b": dict(detections_after_first_frame=100, continued_detections=21)}
    assert track.tracking_notice(both) is None                               # 40 of 200: at the threshold
    assert track.tracking_notice({"a": both["a"]}).startswith("notice: only 19 of the 100 detections")
    assert track.tracking_notice({"a": dict(detections_after_first_frame=9, continued_detections=0)}) is None


def test_second_tracks_of_an_object_are_left_out(tmp_path, monkeypatch, sprite_video):
    """From frame 10 the oracle follows every object twice; the younger track is left out where its
    mask overlaps the older's (--duplicate-iou 0.5, the default): the files are those of the oracle
    without second tracks. With --duplicate-iou 0 and each object's own alpha (--masks alpha) every
    second track is a false positive."""
    gt_count = sum(f.count for f in sprite_video.truth)
    twins = sum(f.count for f in sprite_video.truth[10:])
    oracle_run(monkeypatch, sprite_video, tmp_path / "single")
    out = tmp_path / "dedup"
    oracle_run(monkeypatch, sprite_video, out, duplicates_from=10)
    assert (out / "000000.txt").read_text() == (tmp_path / "single" / "000000.txt").read_text()
    assert (out / "000000_masks.json").read_text() == (tmp_path / "single" / "000000_masks.json").read_text()
    with open(out / "track.json") as f:
        assert json.load(f)["duplicate_iou"] == 0.5

    out = tmp_path / "kept"
    oracle_run(monkeypatch, sprite_video, out, "--duplicate-iou", "0", "--masks", "alpha", duplicates_from=10)
    score = track.score_folder(str(out), str(sprite_video.gt))["overall"]
    assert score["false_positives"] == twins and score["mota"] == pytest.approx(1 - twins / gt_count)
    assert len(read_lines(out / "000000.txt")) == gt_count + twins


def frame_of(boxes_by_id: dict, size: int = 30) -> ev.Objects:
    """One frame's objects with square masks: {id: (x, y, side)}."""
    masks = np.zeros((len(boxes_by_id), size, size), dtype=bool)
    for n, (x, y, side) in enumerate(boxes_by_id.values()):
        masks[n, y:y + side, x:x + side] = True
    return ev.Objects(ids=np.array(list(boxes_by_id)), xywh=np.zeros((len(masks), 4)), masks=masks,
                      conf=np.ones(len(masks)))


def test_duplicate_filter_drops_second_tracks_not_crossing_objects():
    """Known answers. Id 9 is born on top of id 4 (IoU 1, then 80 / 120) and is left out
    while it overlaps; id 2 (older) and id 7 go their ways for 3 frames, then overlap in 2 (IoU 1):
    they cross, both stay. Between 4 and 9 the younger goes; 9 alone is kept."""
    filt = track.DuplicateFilter(0.5)
    assert filt(frame_of({4: (0, 0, 10), 2: (20, 20, 5)})).ids.tolist() == [4, 2]
    assert filt(frame_of({4: (0, 0, 10), 9: (0, 0, 10), 2: (20, 20, 5), 7: (0, 20, 5)})).ids.tolist() == [4, 2, 7]
    kept = filt(frame_of({9: (0, 0, 10), 4: (0, 2, 10), 2: (20, 20, 5), 7: (10, 20, 5)}))
    assert kept.ids.tolist() == [4, 2, 7] and kept.tight.tolist()[0] == [0, 2, 10, 10]   # 9 left out, masks follow
    assert filt(frame_of({4: (0, 0, 10), 2: (20, 20, 5), 7: (20, 20, 5)})).ids.tolist() == [4, 2, 7]  # 1 of 3
    assert filt(frame_of({4: (0, 0, 10), 2: (20, 20, 5), 7: (20, 20, 5)})).ids.tolist() == [4, 2, 7]  # 2 of 4
    assert filt(frame_of({9: (0, 0, 10)})).ids.tolist() == [9]                  # its older one gone: 9 is kept
    assert filt(frame_of({4: (0, 0, 10), 9: (0, 0, 10)})).ids.tolist() == [4]  # still a second track
    # the same frames with max_iou 0 keep every object
    off = track.DuplicateFilter(0.0)
    assert off(frame_of({4: (0, 0, 10), 9: (0, 0, 10)})).ids.tolist() == [4, 9]
    # born in the same frame: the smaller id is the older track
    same = track.DuplicateFilter(0.5)
    assert same(frame_of({8: (0, 0, 10), 3: (0, 0, 10)})).ids.tolist() == [3]



def test_chunked_exports_of_before_would_fail(sprite_video):
    """The scorer sees what issue 23 was about: ids restarting every 5 frames cost MOTA."""
    gt = track.read_mot(sprite_video.gt / "000000.txt", ground_truth=True)
    pred = {t: (ids + 100 * ((t - 1) // 5), xywh) for t, (ids, xywh) in gt.items()}   # new ids each chunk
    acc = ev.accumulate(track.mot_frames(gt, 60), track.mot_frames(pred, 60))
    assert ev.summarize([acc])["id_switches"] > 0 and ev.summarize([acc])["mota"] < 1


def test_video_objects_map_boxes_and_masks_to_the_video_and_crop():
    """A glimpse box covering the model's left half, on a 64x64 model frame of a 200x100 video
    (x scaled by 200/64, y by 100/64), and the same inside a crop at (40, 10)."""
    record = SimpleNamespace(z_where=torch.tensor([[[0.5, 0.5, -0.5, 0.0], [0.5, 0.5, 0.5, 0.0]]]),
                             z_pres=torch.tensor([[0.9, 0.3]]), ids=torch.tensor([[4, 5]]),
                             alpha_glimpse=torch.ones(1, 2, 1, 8, 8))
    whole = track.video_objects(record, track.Region(0, 0, 200, 100), 200, 100, 0.5)
    assert whole.ids.tolist() == [4]                                        # z_pres 0.3 is not reported
    np.testing.assert_allclose(whole.xywh, [[0, 25, 100, 50]])
    assert whole.masks.shape == (1, 100, 200) and whole.tight.tolist() == [[0, 25, 100, 50]]
    low = track.video_objects(record, track.Region(0, 0, 200, 100), 200, 100, 0.2)
    assert low.ids.tolist() == [4, 5]
    crop = track.video_objects(record, track.Region(40, 10, 100, 80), 200, 100, 0.5)
    np.testing.assert_allclose(crop.xywh, [[40, 30, 50, 40]])
    assert crop.masks.shape == (1, 100, 200) and crop.tight.tolist() == [[40, 30, 50, 40]]
    old = track.PLACED_PIXELS
    try:                                                                   # one object placed at a time
        track.PLACED_PIXELS = 1
        chunked = track.video_objects(record, track.Region(0, 0, 200, 100), 200, 100, 0.2)
    finally:
        track.PLACED_PIXELS = old
    assert chunked.ids.tolist() == [4, 5] and np.array_equal(chunked.masks, low.masks)


def box_record(objects, size=20, colours=None):
    """A FrameRecord of batch 1 whose objects fill their boxes with a constant alpha: objects
    [(id, (x, y, w, h), alpha, z_pres, z_depth)], colours [(r, g, b)] per object (default all grey); a
    32x32 glimpse places exactly on whole pixels."""
    z_where = torch.tensor([[[w / size, h / size, (x + w / 2) / size * 2 - 1, (y + h / 2) / size * 2 - 1]
                             for _, (x, y, w, h), _, _, _ in objects]])
    colours = torch.tensor(colours or [(0.5, 0.5, 0.5)] * len(objects))
    return SimpleNamespace(z_where=z_where, ids=torch.tensor([[o[0] for o in objects]]),
                           glimpse=colours.reshape(1, -1, 3, 1, 1).expand(-1, -1, 3, 32, 32),
                           alpha_glimpse=torch.tensor([o[2] for o in objects]).reshape(1, -1, 1, 1, 1).expand(-1, -1, 1, 32, 32),
                           z_pres=torch.tensor([[o[3] for o in objects]]), z_depth=torch.tensor([[o[4] for o in objects]]))


def test_visible_masks_give_each_pixel_to_the_object_in_front(monkeypatch):
    """--masks visible on a known frame (20x20): B (in front) covers the right third of A, so A keeps
    x 2..7 and B all of its box; D, behind B and inside it, shows nowhere and is left out; C (alpha 0.6,
    z_pres 0.7: alpha_map 0.42 < the background's 0.58) is left out; E alone at z_pres 0.6 shows. The
    same with one object placed at a time, and inside a crop of a larger video. Every object has the
    frame's colour, so colour has no say here."""
    record = box_record([(1, (2, 2, 10, 10), 1.0, 1.0, 2.0),       # A, far
                         (2, (8, 2, 10, 10), 1.0, 1.0, -2.0),      # B, near
                         (3, (2, 14, 5, 5), 0.6, 0.7, 0.0),        # C
                         (4, (12, 4, 4, 4), 1.0, 1.0, 2.0),        # D, behind B
                         (5, (13, 14, 5, 5), 1.0, 0.6, 0.0)])      # E
    region = track.Region(0, 0, 20, 20)
    alpha = track.video_objects(record, region, 20, 20, 0.5)
    assert alpha.ids.tolist() == [1, 2, 3, 4, 5] and alpha.masks.sum() == 100 + 100 + 25 + 16 + 25   # overlapping
    frame = torch.full((3, 20, 20), 0.5)
    visible = track.visible_objects(record, alpha, frame, region, 20, 20)
    assert visible.ids.tolist() == [1, 2, 5] and visible.invisible == 2
    assert visible.tight.tolist() == [[2, 2, 6, 10], [8, 2, 10, 10], [13, 14, 5, 5]]
    assert visible.masks.sum(axis=(1, 2)).tolist() == [60, 100, 25] and visible.masks.sum(axis=0).max() == 1
    with monkeypatch.context() as m:
        m.setattr(track, "PLACED_PIXELS", 1)                                # one object placed at a time
        chunked = track.visible_objects(record, alpha, frame, region, 20, 20)
    assert chunked.ids.tolist() == [1, 2, 5] and np.array_equal(chunked.masks, visible.masks)
    crop = track.Region(7, 3, 20, 20)                                       # the model's frame at (7, 3) of 40x30
    inside = track.visible_objects(record, track.video_objects(record, crop, 40, 30, 0.5), frame, crop, 40, 30)
    assert inside.masks.shape == (3, 30, 40) and np.array_equal(inside.masks[:, 3:23, 7:27], visible.masks)
    assert track.visible_objects(record, alpha.__class__(ids=np.zeros(0, np.int64), xywh=np.zeros((0, 4)),
                                 masks=np.zeros((0, 20, 20), bool)), frame, region, 20, 20).ids.tolist() == []


def test_visible_masks_give_a_neighbour_of_another_colour_the_pixels_that_show_it(monkeypatch):
    """A glimpse in front that reaches over a neighbour (B, near, decoded blue over x 6..17) does not take
    the neighbour's pixels where the frame shows the neighbour's colour (red over x 2..9, A's decoded
    colour): A keeps x 2..9. When the front glimpse's colour there is within COLOUR_MARGIN of the best
    match (B decoded dark red, squared distance 0.06), the one in front keeps the overlap, as in the
    composite. The same with one object placed at a time, and on a region twice the model's input (the
    frame sampled up with half-pixel centres, as data.resize_frame samples down: the edge stays at x 20)."""
    boxes = [(1, (2, 2, 8, 10), 1.0, 1.0, 2.0), (2, (6, 2, 12, 10), 1.0, 1.0, -2.0)]     # A far, B near
    frame = torch.zeros(3, 20, 20)
    frame[0, 2:12, 2:10] = 1.0                                               # A's red sprite
    frame[2, 2:12, 10:18] = 1.0                                              # B's blue sprite
    region = track.Region(0, 0, 20, 20)
    for colour_b, a_columns in (((0.0, 0.0, 1.0), (2, 10)), ((0.8, 0.1, 0.1), (2, 6))):
        record = box_record(boxes, colours=[(1.0, 0.0, 0.0), colour_b])
        objects = track.video_objects(record, region, 20, 20, 0.5)
        x0, x1 = a_columns
        for placed in (track.PLACED_PIXELS, 1):
            monkeypatch.setattr(track, "PLACED_PIXELS", placed)
            visible = track.visible_objects(record, objects, frame, region, 20, 20)
            assert visible.ids.tolist() == [1, 2]
            assert visible.tight.tolist() == [[x0, 2, x1 - x0, 10], [x1, 2, 18 - x1, 10]]
            assert visible.masks.sum(axis=0).max() == 1
        large = track.Region(0, 0, 40, 40)
        visible = track.visible_objects(record, track.video_objects(record, large, 40, 40, 0.5), frame, large, 40, 40)
        assert visible.tight.tolist() == [[2 * x0, 4, 2 * (x1 - x0), 20], [2 * x1, 4, 2 * (18 - x1), 20]]


def first_object(objects):
    """The first of `objects` alone: a previous frame that showed only it, whole."""
    return dataclasses.replace(objects, ids=objects.ids[:1], xywh=objects.xywh[:1], masks=objects.masks[:1])


def test_visible_masks_leave_two_tracks_overlap_to_the_one_that_showed_it_before(monkeypatch):
    """Two tracks over one object (masks at IoU 90/110 >= 0.5): B in front takes x 3..12 and A keeps x 2
    in the first frame; when the frame before showed A there (a hidden track slid onto its occluder, or the
    other way round), A keeps the overlap x 3..11 and B only x 12. Equal holdings (neither shown before),
    --duplicate-iou 0 and pairs overlapping less (the first test's A and B, IoU 0.25) are left to the other
    rules; so are pixels where the one shown before does not match the frame's colour (A decoded blue, the
    frame red over B's box: two objects that really cross). The same with one object placed at a time, and
    inside a crop of a larger video."""
    record = box_record([(1, (2, 2, 10, 10), 1.0, 1.0, 2.0), (2, (3, 2, 10, 10), 1.0, 1.0, -2.0)])  # A far, B near
    region, frame = track.Region(0, 0, 20, 20), torch.full((3, 20, 20), 0.5)
    objects = track.video_objects(record, region, 20, 20, 0.5)
    first = track.visible_objects(record, objects, frame, region, 20, 20)
    assert first.tight.tolist() == [[2, 2, 1, 10], [3, 2, 10, 10]]
    a_before = first_object(objects)
    for placed in (track.PLACED_PIXELS, 1):
        monkeypatch.setattr(track, "PLACED_PIXELS", placed)
        kept = track.visible_objects(record, objects, frame, region, 20, 20, previous=a_before)
        assert kept.ids.tolist() == [1, 2] and kept.tight.tolist() == [[2, 2, 10, 10], [12, 2, 1, 10]]
        assert kept.masks.sum(axis=0).max() == 1
        assert track.visible_objects(record, objects, frame, region, 20, 20, previous=first).tight.tolist() == \
            first.tight.tolist()                                             # B showed more of it: B keeps it
        assert track.visible_objects(record, objects, frame, region, 20, 20, previous=a_before,
                                     shared_iou=0).tight.tolist() == first.tight.tolist()
    nobody = dataclasses.replace(a_before, ids=np.array([7]))                   # an object no longer here
    assert track.visible_objects(record, objects, frame, region, 20, 20, previous=nobody).tight.tolist() == \
        first.tight.tolist()
    crop = track.Region(7, 3, 20, 20)                                           # the model's frame at (7, 3) of 40x30
    inside = track.video_objects(record, crop, 40, 30, 0.5)
    before = first_object(inside)
    moved = track.visible_objects(record, inside, frame, crop, 40, 30, previous=before)
    assert np.array_equal(moved.masks[:, 3:23, 7:27], kept.masks) and moved.masks.sum() == kept.masks.sum()
    apart = box_record([(1, (2, 2, 10, 10), 1.0, 1.0, 2.0), (2, (8, 2, 10, 10), 1.0, 1.0, -2.0)])
    apart_objects = track.video_objects(apart, region, 20, 20, 0.5)
    whole_a = first_object(apart_objects)
    assert track.visible_objects(apart, apart_objects, frame, region, 20, 20, previous=whole_a).tight.tolist() == \
        [[2, 2, 6, 10], [8, 2, 10, 10]]
    crossing = box_record([(1, (2, 2, 10, 10), 1.0, 1.0, 2.0), (2, (3, 2, 10, 10), 1.0, 1.0, -2.0)],
                          colours=[(0.0, 0.0, 1.0), (1.0, 0.0, 0.0)])
    red = torch.zeros(3, 20, 20)
    red[2, 2:12, 2] = 1.0                                                       # A's blue column
    red[0, 2:12, 3:13] = 1.0                                                    # B's red sprite over the rest
    assert track.visible_objects(crossing, objects, red, region, 20, 20, previous=a_before).tight.tolist() == \
        [[2, 2, 1, 10], [3, 2, 10, 10]]


# ------------------------------------------------------------------------------------------------
# A real model
# ------------------------------------------------------------------------------------------------

def test_windows_of_two_write_the_files_of_one_window(tmp_path, checkpoint):
    frames = write_to_disk(make_sprites("easy", img_h=48, img_w=80, seq_len=7, num_sequences=1, seed=1),
                           tmp_path / "frames", 1) / "000000"
    outs = {}
    for window in ("2", "7"):
        outs[window] = tmp_path / f"w{window}"
        assert track.main([str(frames), "--checkpoint", checkpoint, "--out", str(outs[window]), "--window", window,
                           "--device", "cpu", "--seed", "3"]) == 0
    assert (outs["2"] / "000000_masks.json").read_bytes() == (outs["7"] / "000000_masks.json").read_bytes()
    two, seven = read_lines(outs["2"] / "000000.txt"), read_lines(outs["7"] / "000000.txt")
    # frames, ids and boxes identical; conf (z_pres, printed to 4 places) equal up to float rounding: the
    # convolutions of a 2-frame and a 7-frame batch may round differently on some CPUs
    assert [line[:6] + line[7:] for line in two] == [line[:6] + line[7:] for line in seven]
    np.testing.assert_allclose([float(line[6]) for line in two], [float(line[6]) for line in seven], rtol=0, atol=2e-4)
    assert two and {int(line[0]) for line in two} <= set(range(1, 8))
    with open(outs["2"] / "000000_masks.json") as f:
        masks = json.load(f)
    assert (masks["width"], masks["height"], masks["num_frames"]) == (80, 48, 7)
    with open(outs["2"] / "track.json") as f:
        summary = json.load(f)
    assert summary["window"] == 2 and summary["first_frame_rejection"] is True and summary["box"] == "tight"
    assert summary["videos"]["000000"]["frames"] == 7


def write_video(path, frames, codec, **extra):
    import imageio_ffmpeg
    T, H, W, _ = frames.shape
    writer = imageio_ffmpeg.write_frames(str(path), (W, H), fps=10, codec=codec, macro_block_size=1, **extra)
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame).tobytes())
    writer.close()


def test_video_files_are_tracked(tmp_path, checkpoint):
    pytest.importorskip("imageio_ffmpeg")
    import imageio_ffmpeg
    pixels = (make_sprites("easy", seq_len=6, num_sequences=1, seed=2)[0].permute(0, 2, 3, 1).numpy() * 255)
    pixels = pixels.round().astype(np.uint8)                                # (6, 64, 64, 3)
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "clip.mp4", pixels, "libx264", pix_fmt_out="yuv420p")
    write_video(videos / "clip.avi", pixels, "mjpeg", pix_fmt_out="yuvj420p")
    out = tmp_path / "tracks"
    assert track.main([str(videos), "--checkpoint", checkpoint, "--out", str(out), "--device", "cpu",
                       "--video-out", "mp4"]) == 0
    # both files are named 'clip': the names are made unique (utils.unique_names)
    names = unique_names(["clip", "clip"])
    assert len(set(names)) == 2
    assert sorted(os.listdir(out)) == sorted([f"{n}{ext}" for n in names for ext in (".mp4", ".txt", "_masks.json")]
                                             + ["track.json"])
    for name in names:
        with open(out / f"{name}_masks.json") as f:
            assert json.load(f)["num_frames"] == 6
        reader = imageio_ffmpeg.read_frames(str(out / f"{name}.mp4"))
        assert next(reader)["size"] == (256, 256) and sum(1 for _ in reader) == 6     # 64x64 upscaled 4x


def test_evaluate_track_is_an_alias(tmp_path, checkpoint, capsys):
    frames = write_to_disk(make_sprites("easy", seq_len=4, num_sequences=1), tmp_path / "frames", 1)
    out = tmp_path / "tracks"
    assert ev.main(["--track", "--data-dir", str(frames), "--checkpoint", checkpoint, "--out", str(out),
                    "--device", "cpu", "--gif", "1"]) == 0
    assert sorted(os.listdir(out)) == ["000000.gif", "000000.txt", "000000_masks.json", "track.json"]
    assert ev.main(["--track", "--data-dir", str(frames), "--checkpoint", checkpoint, "--out", str(tmp_path / "neg"),
                    "--gif", "-1"]) == 2 and not (tmp_path / "neg").exists()
    assert ev.main(["--track", "--data-dir", str(frames), "--checkpoint", checkpoint, "--seed", "abc"]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("evaluate.py --track: error: argument --seed")


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("problem", ["garbage_video", "empty_folder", "not_a_checkpoint", "other_architecture",
                                     "missing_video", "text_file", "no_ground_truth", "crop_outside",
                                     "unwritable_out", "bad_ground_truth", "binary_ground_truth",
                                     "empty_ground_truth"])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, checkpoint, tiny_cfg, capsys, problem):
    frames = write_to_disk(make_sprites("easy", seq_len=3, num_sequences=1), tmp_path / "frames", 1)
    video, ckpt = str(frames), checkpoint
    if problem == "garbage_video":
        video = str(tmp_path / "clip.mp4")
        (tmp_path / "clip.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    elif problem == "empty_folder":
        (tmp_path / "empty").mkdir()
        video = str(tmp_path / "empty")
    elif problem == "not_a_checkpoint":
        ckpt = str(tmp_path / "junk.pt")
        (tmp_path / "junk.pt").write_text("not a checkpoint")
    elif problem == "other_architecture":
        ckpt = str(tmp_path / "other.pt")
        save_checkpoint(ckpt, SCALOR(tiny_cfg.replace(z_what_dim=16)), step=1, cfg=tiny_cfg)
    elif problem == "missing_video":
        video = str(tmp_path / "nope")
    elif problem == "text_file":
        video = str(tmp_path / "notes.txt")
        (tmp_path / "notes.txt").write_text("hello")
    flags = []
    if problem == "no_ground_truth":                                      # none named as the tracks will be
        (tmp_path / "gt").mkdir()
        (tmp_path / "gt" / "other.txt").write_text("1,1,0,0,4,4,1,-1,-1,-1\n")
        flags = ["--score", str(tmp_path / "gt")]
    if problem.endswith("_ground_truth") and problem != "no_ground_truth":   # found before any tracking
        (tmp_path / "gt").mkdir()
        (tmp_path / "gt" / "000000.txt").write_bytes({"bad": b"garbage,line\n", "binary": b"\xff\xfe1\x00,\x00",
                                                      "empty": b"1,1,0,0,4,4,0,-1,-1,-1\n"}[problem.split("_")[0]])
        flags = ["--score", str(tmp_path / "gt")]
    if problem == "crop_outside":
        flags = ["--crop", "10,10,60,20"]                                  # the frames are 64x64
    out = tmp_path / "out"
    if problem == "unwritable_out":                                       # its parent is a file, not a folder
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
    assert track.main([video, "--checkpoint", ckpt, "--out", str(out), "--device", "cpu", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("track.py: error: ") and err.count("\n") == 1, err
    expected = {"garbage_video": "cannot be read by ffmpeg", "empty_folder": "is empty",
                "not_a_checkpoint": "not a readable SCALOR checkpoint", "other_architecture": "another architecture",
                "missing_video": "does not exist", "text_file": "is not a video file",
                "no_ground_truth": "holds no ground truth for these videos", "crop_outside": "does not fit",
                "unwritable_out": "cannot write into", "bad_ground_truth": "line 1 is not a MOTChallenge line",
                "binary_ground_truth": "is not a UTF-8 text file", "empty_ground_truth": "holds no objects"}[problem]
    assert expected in err
    if problem == "garbage_video":                                        # ffmpeg's reason, not its banner
        assert "ffmpeg version" not in err and "Invalid data" in err
    assert not out.exists() and not leftovers(tmp_path)


def test_out_holding_an_input_or_not_empty_is_refused_and_overwrite_replaces_it(tmp_path, checkpoint, capsys,
                                                                                  monkeypatch):
    """An --out that holds a video, the checkpoint or the ground truth is refused even with --overwrite (its
    files would be replaced); a non-empty --out needs --overwrite, which replaces it whole."""
    frames = write_to_disk(make_sprites("easy", seq_len=3, num_sequences=1), tmp_path / "data" / "frames", 1)
    before = sorted(p.name for p in (frames / "000000").iterdir())
    base = ["--checkpoint", checkpoint, "--device", "cpu"]
    for out in (tmp_path / "data", frames, tmp_path):                       # holds the video; holds the checkpoint
        assert track.main([str(frames), *base, "--out", str(out), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "holds the input" in err and "pass an --out outside the inputs" in err
    assert sorted(p.name for p in (frames / "000000").iterdir()) == before
    here = tmp_path / "here"                                                # --out . would replace the shell's folder
    here.mkdir()
    monkeypatch.chdir(here)
    for out in (".", str(tmp_path)):
        assert track.main([str(frames), *base, "--out", out, "--overwrite"]) == 2
    assert "--out '.' holds the current folder" in capsys.readouterr().err and here.exists()
    out = tmp_path / "tracks"
    out.mkdir()
    (out / "old.gif").write_text("a file of an earlier run")
    assert track.main([str(frames), *base, "--out", str(out)]) == 2
    assert "exists and is not empty: pass --overwrite" in capsys.readouterr().err
    assert track.main([str(frames), *base, "--out", str(out), "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["000000.txt", "000000_masks.json", "track.json"] and not leftovers(tmp_path)


def test_written_ids_count_from_one_in_order_of_first_appearance(tmp_path, checkpoint):
    """The model numbers every object it draws; the files number the written ones 1, 2, ... (the masks
    file too), in order of first appearance."""
    frames = write_to_disk(make_sprites("easy", seq_len=6, num_sequences=1, seed=4), tmp_path / "frames", 1)
    out = tmp_path / "tracks"
    assert track.main([str(frames), "--checkpoint", checkpoint, "--out", str(out), "--device", "cpu",
                       "--z-pres-threshold", "0.05"]) == 0
    first_seen = []
    for line in read_lines(out / "000000.txt"):
        if int(line[1]) not in first_seen:
            first_seen.append(int(line[1]))
    assert len(first_seen) > 3 and first_seen == list(range(1, len(first_seen) + 1))
    with open(out / "000000_masks.json") as f:
        assert {i for e in json.load(f)["frames"] for i in e["ids"]} == set(first_seen)


def test_interrupted_tracking_writes_nothing(tmp_path, checkpoint, monkeypatch, capsys):
    """Ctrl-C or SIGTERM (utils.sigterm_as_interrupt) while tracking: exit 130, one line, no --out, no work folder."""
    frames = write_to_disk(make_sprites("easy", seq_len=3, num_sequences=1), tmp_path / "frames", 1)

    def stopped(model, source, name, out_dir, *rest):
        (Path(out_dir) / f"{name}.txt").write_text("half")
        raise KeyboardInterrupt("SIGTERM")
    monkeypatch.setattr(track, "track_video", stopped)
    out = tmp_path / "a" / "tracks"
    assert track.main([str(frames), "--checkpoint", checkpoint, "--out", str(out), "--device", "cpu"]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == f"track.py: interrupted (SIGTERM): nothing written to --out '{out}'"
    assert not (tmp_path / "a").exists()


def test_sigterm_raises_keyboard_interrupt_inside_only():
    import signal
    from utils import sigterm_as_interrupt
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        with sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)                                                  # the handler runs before this ends
    assert signal.getsignal(signal.SIGTERM) is before


def test_scoring_needs_tracks_named_as_the_ground_truth(tmp_path, capsys):
    gt, tracks = tmp_path / "gt", tmp_path / "tracks"
    gt.mkdir(), tracks.mkdir()
    for name in ("a", "b"):
        (gt / f"{name}.txt").write_text("1,1,0,0,4,4,1,-1,-1,-1\n")
    (tracks / "other.txt").write_text("1,1,0,0,4,4,1,-1,-1,-1\n")
    assert track.main(["--score", str(gt), "--out", str(tracks)]) == 2
    assert "no tracks in" in capsys.readouterr().err
    (tracks / "a.txt").write_text("1,1,0,0,4,4,1,-1,-1,-1\n")
    assert track.main(["--score", str(gt), "--out", str(tracks)]) == 0
    out = capsys.readouterr().out
    assert "notice: no tracks for 1 of the 2 ground-truth videos (b): scored as no detections" in out
    assert "MOTA 0.5000" in out


def test_a_video_file_ending_early_is_named():
    video = {"source": "cut.mp4", "frames": 17, "frames_announced": 40}
    assert track.cut_off_notice(video).startswith("notice: 'cut.mp4' ended after 17 frames where its header announces about 40")
    assert track.cut_off_notice(dict(video, frames=37)) is None              # within 10% of the header's count
    assert track.cut_off_notice(dict(video, frames_announced=None)) is None  # a folder of frames


def test_a_frame_corrupt_inside_leaves_no_out(tmp_path, checkpoint, capsys):
    """Found while tracking (after the header checks): exit 2, the partial folder removed; an --out
    that exists keeps only what it had."""
    from PIL import Image
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for t in range(5):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(frames / f"{t:04d}.png")
    data = bytearray((frames / "0003.png").read_bytes())
    data[200:len(data) - 100] = bytes(len(data) - 300)
    (frames / "0003.png").write_bytes(bytes(data))
    out = tmp_path / "out"
    assert track.main([str(frames), "--checkpoint", checkpoint, "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "0003.png' is truncated or corrupt" in err and "pass --skip-bad-frames" in err
    assert not out.exists() and not leftovers(tmp_path)
    skipped = tmp_path / "skipped"                                  # the fix the message names works
    assert track.main([str(frames), "--checkpoint", checkpoint, "--out", str(skipped), "--device", "cpu",
                       "--skip-bad-frames"]) == 0
    assert "skipped 1 unreadable frame" in capsys.readouterr().out
    written = {t for t in track.read_mot(skipped / "frames.txt")}                 # the skipped frame's number stays unused
    assert 4 not in written and written <= {1, 2, 3, 5}
    masks = json.loads((skipped / "frames_masks.json").read_text())
    assert [f["frame"] for f in masks["frames"]] == [0, 1, 2, 4]
    shutil.rmtree(skipped)
    nested = tmp_path / "new" / "deeper" / "out"                  # folders made for --out go too
    assert track.main([str(frames), "--checkpoint", checkpoint, "--out", str(nested), "--device", "cpu"]) == 2
    assert not (tmp_path / "new").exists()
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert track.main([str(frames), "--checkpoint", checkpoint, "--out", str(out), "--device", "cpu", "--overwrite"]) == 2
    assert "0003.png' is truncated or corrupt" in capsys.readouterr().err.strip().splitlines()[-1]
    assert os.listdir(out) == ["mine.txt"] and not leftovers(tmp_path)


def test_sprite_videos_script_writes_out_whole_and_refuses_bad_arguments(tmp_path, capsys):
    from scripts.sprite_videos import main as sprite_videos
    out = tmp_path / "sv"
    assert sprite_videos([str(out), "--num", "2", "--length", "3"]) == 0
    assert sprite_videos([str(out), "--num", "1", "--length", "2"]) == 2
    assert "exists and is not empty: pass --overwrite" in capsys.readouterr().err
    assert sprite_videos([str(out), "--num", "1", "--length", "2", "--overwrite"]) == 0  # replaced whole
    assert os.listdir(out / "videos") == ["000000"] and len(os.listdir(out / "videos" / "000000")) == 2
    assert os.listdir(out / "gt") == ["000000.txt"]
    (tmp_path / "afile").write_text("x")
    for out, flags, message in (("bad", ["--preset", "nope"], "unknown sprite preset 'nope'"),
                                ("bad", ["--num", "0"], "must be positive"),
                                ("bad", ["--seed", "-1"], "must lie in [0, 2**32 - 1]"),
                                ("afile/sub", [], "cannot write OUT")):
        with pytest.raises(SystemExit) if "--seed" in flags else contextlib.nullcontext():   # argparse: exit 2
            assert sprite_videos([str(tmp_path / out), *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("sprite_videos.py: error: ") and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "sv"]


def test_read_mot_and_score_known_answers(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    (gt / "a.txt").write_text("1,1,0,0,10,10,1,-1,-1,-1\n2,1,2,0,10,10,1,-1,-1,-1\n2,2,50,50,5,5,0,-1,-1,-1\n"
                              "3,1,4,0,10,10,1,-1,-1,-1\n")
    (pred / "a.txt").write_text("1,7,0,0,10,10,0.9,-1,-1,-1\n2,7,2,0,10,10,0.9,-1,-1,-1\n3,8,4,0,10,10,0.9,-1,-1,-1\n"
                                "3,9,40,40,10,10,0.8,-1,-1,-1\n")
    rows = track.read_mot(gt / "a.txt", ground_truth=True)
    assert sorted(rows) == [1, 2, 3] and rows[2][0].tolist() == [1]            # conf 0: ignored
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + (gt / "a.txt").read_bytes())   # a byte-order mark first
    assert {t: v[0].tolist() for t, v in track.read_mot(tmp_path / "bom.txt", ground_truth=True).items()} == \
        {t: v[0].tolist() for t, v in rows.items()}
    score = track.score_folder(str(pred), str(gt))["overall"]
    assert (score["matches"], score["id_switches"], score["false_positives"], score["misses"]) == (2, 1, 1, 0)   # the switch is not a MATCH
    assert score["mota"] == pytest.approx(1 - 2 / 3)
    (pred / "a.txt").write_text("1,7,0,0,10\n")
    with pytest.raises(track.DataError, match="line 1"):
        track.score_folder(str(pred), str(gt))
    with pytest.raises(track.TrackError, match="objects up to frame 3, but video 'a' has 2 frames"):
        track.check_ground_truth(str(gt), ["a"], {"a": 2})
    track.check_ground_truth(str(gt), ["a"], {"a": 3})


@pytest.mark.parametrize("line, message", [("inf,1,0,0,10,10,1", "is not a MOTChallenge line"),
                                           ("1.5,1,0,0,10,10,1", "is not a MOTChallenge line"),
                                           ("1,1e20,0,0,10,10,1", "an integer id"),
                                           ("1000000000,1,0,0,10,10,1", "a frame 1..10,000,000"),
                                           ("1,1,nan,0,10,10,1", "four finite box values"),
                                           ("1,1,0,0,-10,10,1", "w, h >= 0"),
                                           ("1,1,0,0,10,10,1\n1,1,5,5,10,10,1", "id 1 appears twice in frame 1")])
def test_read_mot_refuses_lines_no_video_has(tmp_path, line, message):
    """Values that would crash scoring, exhaust memory or give impossible metrics are one-line errors."""
    path = tmp_path / "a.txt"
    path.write_text(line + "\n")
    with pytest.raises(track.DataError, match=re.escape(message)) as err:
        track.read_mot(path, ground_truth=True)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------
# Scripts
# ------------------------------------------------------------------------------------------------

def test_compare_script_export_equals_internal_scoring(tmp_path, checkpoint, capsys):
    """The exported files of the model's own reading (alpha masks, every track kept) score as its
    predictions scored in memory (same draws); leaving second tracks out only removes false positives."""
    from scripts.compare_track_export import main as compare
    out = tmp_path / "cmp"
    assert compare(["--checkpoint", checkpoint, "--num", "1", "--length", "5", "--out", str(out), "--device", "cpu",
                    "--window", "2", "--no-evaluate"]) == 0
    with open(out / "compare.json") as f:
        result = json.load(f)
    assert result["export_mota"]["tight_raw"] == pytest.approx(result["internal_whole_video_mota"]["box_tight"])
    assert result["export_false_positives"]["tight_alpha"] <= result["export_false_positives"]["tight_raw"]
    assert result["export_misses"]["tight_alpha"] >= result["export_misses"]["tight_raw"]
    assert set(result["export_mota"]) == {"tight", "glimpse", "tight_alpha", "tight_raw"}
    assert set(result["internal_seq_len_chunks_mota"]) == {"box", "box_tight", "mask"}
    # a second run into the same folder: refused without --overwrite; with it, the old videos are gone
    again = ["--checkpoint", checkpoint, "--num", "1", "--length", "3", "--out", str(out), "--device", "cpu",
             "--window", "2", "--no-evaluate"]
    assert compare(again) == 2 and "--overwrite" in capsys.readouterr().err
    assert compare(again + ["--overwrite"]) == 0
    with open(out / "compare.json") as f:
        result = json.load(f)
    assert result["length"] == 3 and len(list((out / "data" / "videos" / "000000").glob("*.png"))) == 3
    assert result["export_mota"]["tight_raw"] == pytest.approx(result["internal_whole_video_mota"]["box_tight"])
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".cmp")]   # no work folder left beside it


def test_compare_script_out_under_a_file_is_one_line(tmp_path, checkpoint, capsys, monkeypatch):
    import scripts.compare_track_export as script
    (tmp_path / "afile").write_text("x")
    assert script.main(["--checkpoint", checkpoint, "--out", str(tmp_path / "afile" / "cmp"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot write --out" in err and "\n" not in err
    # a disk that fills up midway: the work folder and the folders made for --out are removed

    def disk_full(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(script, "compare", disk_full)
    assert script.main(["--checkpoint", checkpoint, "--out", str(tmp_path / "new" / "cmp"), "--device", "cpu"]) == 2
    assert "No space left" in capsys.readouterr().err and not (tmp_path / "new").exists()


@pytest.mark.parametrize("flags, message", [(["--thresholds", "abc"], "--thresholds"), (["--num", "0"], "--num 0"),
                                            (["--duplicate-iou", "nan"], "--duplicate-iou"),
                                            (["--length", "0"], "--length 0"), (["--preset", "bogus"], "bogus")])
def test_compare_script_bad_arguments(tmp_path, checkpoint, capsys, flags, message):
    from scripts.compare_track_export import main as compare
    assert compare(["--checkpoint", checkpoint, "--out", str(tmp_path / "cmp"), "--device", "cpu"] + flags) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not [p.name for p in tmp_path.iterdir() if "cmp" in p.name]         # nothing written


def test_demo_folder(tmp_path):
    from scripts.sprite_videos import write_demo
    folder = write_demo(tmp_path / "demo")
    frames = sorted(p.name for p in folder.glob("*.png"))
    assert frames == [f"{t:04d}.png" for t in range(40)]
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 300_000
    assert max(int(line[0]) for line in read_lines(folder / "ground_truth" / "demo.txt")) == 40


@pytest.mark.parametrize("seed", [str(2**70), "-1", "x"])
def test_a_seed_out_of_numpy_range_is_refused_by_argparse(seed, capsys):
    with pytest.raises(SystemExit) as exit_:
        track.parse_args(["demo", "--checkpoint", "c.pt", "--seed", seed])
    assert exit_.value.code == 2 and "argument --seed" in capsys.readouterr().err


def test_the_bundled_model_tracks_the_demo(tmp_path):
    """The README's quick start: the bundled spmot model on demo/ through track.py's defaults scores
    (README, Measured: MOTA 93.9%, no ID switch) far above what a broken export gives, and the
    written masks of a frame are disjoint, each box the tight box of its mask."""
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "tracks"
    assert track.main([str(root / "demo"), "--checkpoint", str(root / "checkpoints" / "sprites_small.pt"),
                       "--out", str(out), "--device", "cpu", "--score", str(root / "demo" / "ground_truth")]) == 0
    score = json.loads((out / "score.json").read_text())["overall"]
    assert score["mota"] >= 0.85 and score["id_switches"] <= 2          # margins for other CPUs' rounding
    masks = json.loads((out / "demo_masks.json").read_text())
    boxes = {}
    for line in read_lines(out / "demo.txt"):
        boxes.setdefault(int(line[0]) - 1, []).append([float(v) for v in line[2:6]])
    for entry in masks["frames"]:
        decoded = np.stack([ev.rle_decode(rle, 64, 64) for rle in entry["masks"]]) if entry["masks"] else \
            np.zeros((0, 64, 64), bool)
        assert decoded.sum(axis=0).max(initial=0) <= 1
        assert ev.mask_boxes(decoded).tolist() == boxes.get(entry["frame"], [])


def test_a_folder_of_frames_names_what_it_leaves_out_and_refuses_a_frame_twice(tmp_path, checkpoint, capsys):
    """Frames with a frame folder beside them: the frames are the video, the folder is named in a notice;
    0001.png with 0001.jpg (each frame read twice): exit 2, one line."""
    from PIL import Image
    folder = tmp_path / "video"
    (folder / "sub").mkdir(parents=True)
    for t in range(2):
        Image.new("RGB", (64, 64)).save(folder / f"{t:04d}.png")
        Image.new("RGB", (64, 64)).save(folder / "sub" / f"{t:04d}.png")
    assert track.main([str(folder), "--checkpoint", checkpoint, "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    assert "frame folders beside them (sub) are not: pass them as VIDEO arguments" in capsys.readouterr().out
    Image.new("RGB", (64, 64)).save(folder / "0001.jpg")
    assert track.main([str(folder), "--checkpoint", checkpoint, "--out", str(tmp_path / "out2"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "'0001.jpg' and '0001.png' in" in err and "two frames of one name" in err and "\n" not in err
    assert not (tmp_path / "out2").exists()


def test_sprite_videos_script_stopped_by_sigterm_leaves_nothing(tmp_path):
    import signal
    import subprocess
    import sys
    script = Path(__file__).resolve().parents[1] / "scripts" / "sprite_videos.py"
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "o"), "--num", "500", "--length", "50"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not any(p.name.startswith(".o") for p in tmp_path.iterdir()) and time.time() < deadline:
        time.sleep(0.05)                                         # its work folder exists: it is writing
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1].strip()
    assert proc.returncode == 130 and err == f"sprite_videos.py: interrupted (SIGTERM): nothing written to OUT '{tmp_path / 'o'}'"
    assert list(tmp_path.iterdir()) == []
