"""Drawing for TensorBoard panels: image grids and object boxes labelled by id.

Every function takes and returns float tensors with values in [0, 1] (CHW for one image) and
leaves its inputs untouched. Boxes come from a `scalor.FrameRecord`: z_where = (sx, sy, tx, ty) in
normalised coordinates, drawn where z_pres > 0.5; propagated objects get a solid outline,
newly discovered ones a dashed outline, both in the colour of their id with the id as text.
"""
from __future__ import annotations

import colorsys

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

GOLDEN_RATIO = 0.618033988749895
MIN_LABELLED_SIDE = 128   # boxes panels are upscaled (nearest) to at least this many pixels a side


def tile(frames: torch.Tensor, border: int = 1) -> torch.Tensor:
    """(N, T, C, H, W) with C in {1, 3} -> one (3, N*H + (N+1)*border, T*W + (T+1)*border) image.

    Rows are sequences, columns frames, separated and framed by `border` white pixels."""
    frames = frames.detach().float().cpu().clamp(0, 1)
    if frames.shape[2] == 1:
        frames = frames.expand(-1, -1, 3, -1, -1)
    n, t, _, h, w = frames.shape
    grid = torch.ones(3, n * h + (n + 1) * border, t * w + (t + 1) * border)
    for i in range(n):
        for j in range(t):
            y, x = border + i * (h + border), border + j * (w + border)
            grid[:, y:y + h, x:x + w] = frames[i, j]
    return grid


def id_color(obj_id: int, color_num: int = 500) -> tuple:
    """A distinct, bright RGB colour (0-255) for an object id; ids repeat every color_num."""
    hue = ((int(obj_id) % color_num) * GOLDEN_RATIO) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.9, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def box_pixels(z_where, height: int, width: int) -> tuple:
    """(sx, sy, tx, ty) normalised -> (x0, y0, x1, y1) pixels: x0 = (tx - sx + 1) / 2 * W, ..."""
    sx, sy, tx, ty = (float(v) for v in z_where)
    return ((tx - sx + 1) / 2 * width, (ty - sy + 1) / 2 * height,
            (tx + sx + 1) / 2 * width, (ty + sy + 1) / 2 * height)


def dashed_rectangle(draw: ImageDraw.ImageDraw, box, color, dash: int = 3, gap: int = 2) -> None:
    x0, y0, x1, y1 = box
    for a, b, fixed, horizontal in ((x0, x1, y0, True), (x0, x1, y1, True), (y0, y1, x0, False), (y0, y1, x1, False)):
        start = a
        while start < b:
            end = min(start + dash, b)
            draw.line((start, fixed, end, fixed) if horizontal else (fixed, start, fixed, end), fill=color)
            start = end + gap


def to_pil(image: torch.Tensor, scale: int) -> Image.Image:
    """(3, H, W) float in [0, 1] -> RGB PIL image, upscaled by `scale` (nearest)."""
    pixels = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    pil = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST) if scale > 1 else pil


def draw_boxes(image: torch.Tensor, z_where, z_pres, ids, propagated, color_num: int = 500,
               scale: int = 1) -> torch.Tensor:
    """Boxes of one frame on a copy of image (3, H, W): z_where (R, 4), z_pres (R,), ids (R,),
    propagated (R,) bool. Entries with z_pres <= 0.5 or non-finite boxes are skipped.

    Returns (3, H*scale, W*scale): propagated objects solid, discovered ones dashed."""
    pil = to_pil(image, scale)
    draw = ImageDraw.Draw(pil)
    font = ImageFont.load_default()
    height, width = pil.height, pil.width
    for where, pres, obj_id, prop in zip(z_where.tolist(), z_pres.tolist(), ids.tolist(), propagated.tolist()):
        if not pres > 0.5 or not all(np.isfinite(where)):
            continue
        x0, y0, x1, y1 = box_pixels(where, height, width)
        x0, x1 = max(x0, 0), min(x1, width - 1)
        y0, y1 = max(y0, 0), min(y1, height - 1)
        if x1 <= x0 or y1 <= y0:
            continue   # entirely outside the frame
        color = id_color(obj_id, color_num)
        if prop:
            draw.rectangle((x0, y0, x1, y1), outline=color)
        else:
            dashed_rectangle(draw, (x0, y0, x1, y1), color)
        draw.text((x0 + 2, y0 + 1), str(obj_id), fill=color, font=font)
    pixels = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0)
    return pixels.permute(2, 0, 1)


def boxes_panel(frames: torch.Tensor, records: list, num: int, color_num: int = 500) -> torch.Tensor:
    """Grid (rows = the first `num` sequences, columns = frames) of frames (B, T, 3, H, W) with the
    boxes of the per-frame FrameRecords drawn on them. Small frames are upscaled so ids stay legible."""
    num = min(num, frames.shape[0])
    scale = max(1, MIN_LABELLED_SIDE // min(frames.shape[-2:]))
    rows = []
    for b in range(num):
        row = [draw_boxes(frames[b, t], rec.z_where[b], rec.z_pres[b], rec.ids[b], rec.propagated[b],
                          color_num, scale) for t, rec in enumerate(records)]
        rows.append(torch.stack(row))
    return tile(torch.stack(rows))


def record_panel(records: list, field: str, num: int) -> torch.Tensor:
    """Grid of one per-frame image field of the records ('background', 'alpha_map', 'foreground')."""
    frames = torch.stack([getattr(rec, field)[:num] for rec in records], dim=1)   # (num, T, C, H, W)
    return tile(frames)


def export_panels(summary_dir: str, out_dir: str, tags=None) -> list:
    """Write the newest image of each TensorBoard image tag in `summary_dir` as PNG files.

    `python viz.py RUN/summary OUT_DIR [TAG ...]` -- e.g. to put panels in a report."""
    import io
    import os

    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    acc = EventAccumulator(summary_dir, size_guidance={IMAGES: 0})
    acc.Reload()
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for tag in tags or acc.Tags()[IMAGES]:
        event = acc.Images(tag)[-1]
        path = os.path.join(out_dir, f"{tag.replace('/', '_')}_step{event.step}.png")
        Image.open(io.BytesIO(event.encoded_image_string)).save(path)
        written.append(path)
    return written


if __name__ == "__main__":
    import sys

    if len(sys.argv) < 3:
        sys.exit("usage: python viz.py SUMMARY_DIR OUT_DIR [TAG ...]")
    for written_path in export_panels(sys.argv[1], sys.argv[2], sys.argv[3:] or None):
        print(written_path)
