"""Pictures drawn with Pillow and numpy: inpainting (Fig. 3 of the paper), sound-source localisation
(a heat map of audio-visual similarity over the frame) and a run's training curves from its log.jsonl."""

import json
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from data import IMAGE_MEAN, IMAGE_STD

PAD = 6  # pixels between panels
TEXT = 20  # height of a caption line
GREY = 128  # masked patches
FONT = ImageFont.load_default(size=13)
DARK_TO_BRIGHT = np.array([[0, 0, 4], [80, 18, 123], [182, 54, 121], [251, 136, 97], [252, 253, 191]])
BLUE_TO_RED = np.array([[0, 0, 110], [0, 40, 255], [0, 230, 255], [255, 240, 0], [255, 40, 0], [130, 0, 0]])
HEAT_OPACITY = 0.55  # weight of the heat map over the frame
# Okabe-Ito colours, which colour-blind readers tell apart: blue, vermilion, green, purple
SERIES_COLOURS = [(0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167)]


def colorize(values, low, high, colours):
    """(H, W) values -> (H, W, 3) uint8, from colours[0] at low to colours[-1] at high; NaN -> grey."""
    t = np.clip((values - low) / max(high - low, 1e-12), 0, 1)
    anchors = np.linspace(0, 1, len(colours))
    rgb = np.stack([np.interp(t, anchors, colours[:, c]) for c in range(3)], axis=-1)
    rgb[np.isnan(values)] = GREY
    return rgb.round().astype(np.uint8)


def frame_picture(image):
    """(3, S, S) normalised image -> (P, P, 3) uint8, enlarged to about 128 pixels; NaN -> grey."""
    zoom = max(1, 128 // image.shape[-1])
    rgb = image.float().cpu().permute(1, 2, 0).numpy() * IMAGE_STD + IMAGE_MEAN  # (S, S, 3)
    rgb = np.nan_to_num(np.clip(rgb, 0, 1) * 255, nan=GREY).round().astype(np.uint8)
    return rgb.repeat(zoom, 0).repeat(zoom, 1)


def three_rows(model, patches, mask, pred):
    """Input patches (1, L, P); the same with the masked ones NaN; and with the masked ones predicted."""
    pred = model.prediction_to_input_space(pred[None].float(), patches)
    masked = mask.bool()[None, :, None]  # (1, L, 1)
    return [patches, patches.masked_fill(masked, float("nan")), pred.where(masked, patches)]


def inpaint_picture(model, audio, image, mask_a, mask_v, pred_a, pred_v, title):
    """One clip: rows original / masked / reconstruction, columns spectrogram / frame."""
    rows_a = three_rows(model, model.patchify_audio(audio[None]), mask_a, pred_a)
    rows_v = three_rows(model, model.patchify_image(image[None]), mask_v, pred_v)
    low = audio.min().item()
    high = audio.max().item()
    # (F, T): time to the right, low frequencies at the bottom
    spectrograms = [model.unpatchify_audio(x)[0].T.flip(0).numpy() for x in rows_a]
    spectrograms = [colorize(x, low, high, DARK_TO_BRIGHT) for x in spectrograms]
    frames = [frame_picture(model.unpatchify_image(x)[0]) for x in rows_v]
    bins, T = spectrograms[0].shape[:2]
    P = frames[0].shape[0]
    row_height = TEXT + max(bins, P)
    canvas = Image.new("RGB", (PAD + T + PAD + P + PAD, TEXT + 3 * row_height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, 4), title, fill="black", font=FONT)
    ratios = f"{mask_a.float().mean():.0%} of the audio, {mask_v.float().mean():.0%} of the frame"
    captions = ["original", f"masked (grey): {ratios}", "reconstruction"]
    for row in range(3):
        y = TEXT + row * row_height
        draw.text((PAD, y + 4), captions[row], fill="black", font=FONT)
        canvas.paste(Image.fromarray(spectrograms[row]), (PAD, y + TEXT))
        canvas.paste(Image.fromarray(frames[row]), (PAD + T + PAD, y + TEXT))
    return canvas


def localization_picture(image, similarity, title, outlines=()):
    """The frame (3, S, S), and the frame under a heat map of `similarity` (h, w) over its patches with a
    cross on the peak. outlines: (mask, colour) pairs, mask an (S, S) bool array, drawn on both panels."""
    frame = frame_picture(image)  # (P, P, 3)
    P = frame.shape[0]
    grid = similarity.float().cpu().numpy()
    low = grid.min()
    high = grid.max()
    heat = np.asarray(Image.fromarray(grid).resize((P, P), Image.BILINEAR))  # (P, P)
    heat = colorize(heat, low, high, BLUE_TO_RED)
    panels = [frame, (HEAT_OPACITY * heat + (1 - HEAT_OPACITY) * frame).round().astype(np.uint8)]
    for mask, colour in outlines:
        inside = Image.fromarray(np.asarray(mask, np.uint8) * 255).resize((P, P), Image.NEAREST)
        edge = np.asarray(inside.filter(ImageFilter.FIND_EDGES)) > 0
        for panel in panels:
            panel[edge] = colour
    canvas = Image.new("RGB", (PAD + 2 * (P + PAD), 3 * TEXT + P + PAD), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, 4), title, fill="black", font=FONT)
    captions = ["frame", f"cosine similarity\nblue {low:.2f} .. red {high:.2f}"]
    for k in range(2):
        draw.text((PAD + k * (P + PAD), TEXT + 4), captions[k], fill="black", font=FONT)
        canvas.paste(Image.fromarray(panels[k]), (PAD + k * (P + PAD), 3 * TEXT))
    h, w = grid.shape
    row, col = divmod(grid.argmax(), w)  # the peak patch
    x = PAD + P + PAD + (col + 0.5) * P / w  # its centre on the heat panel
    y = 3 * TEXT + (row + 0.5) * P / h
    arm = P / w / 4
    draw.line([(x - arm, y), (x + arm, y)], fill="white", width=3)
    draw.line([(x, y - arm), (x, y + arm)], fill="white", width=3)
    return canvas


# Training curves: train.py's train.png, from the run's log.jsonl

PANEL_WIDTH = 640
PANEL_HEIGHT = 190
MARKER_RADIUS = {"val": 4, "final": 7}  # training records are drawn as lines
PRETRAIN_PANELS = {
    "reconstruction loss (masked patches)": {"audio": "loss_mae_a", "visual": "loss_mae_v"},
    "contrastive loss": {"contrastive": "loss_c"},
    "contrastive accuracy (in batch)": {"accuracy": "contrastive_accuracy"},
    "retrieval R@1": {"audio->visual": "a2v_R1", "visual->audio": "v2a_R1"},
}
FINETUNE_PANELS = {
    "loss": {"loss": "loss"},
    "accuracy": {"middle frame": "acc", "all frames": "acc_frames"},
    "mAP": {"middle frame": "mAP", "all frames": "mAP_frames"},
}


def read_log(path):
    """The records of a log.jsonl; a line that does not parse (cut short by a kill) is skipped."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def series_of(records, key):
    """{(split, iter): value} of the records with a finite `key`. A resumed run logs some iterations
    twice: the last record wins."""
    series = {}
    for record in records:
        value = record.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            series[record["split"], record["iter"]] = value
    return series


def train_picture(log_path):
    """A run's curves, a panel for each quantity its log.jsonl has; None when it has none."""
    records = read_log(log_path)
    pretraining = any("loss_mae_a" in record for record in records)
    panels = []  # (title, {label: series})
    for title, keys in (PRETRAIN_PANELS if pretraining else FINETUNE_PANELS).items():
        found = {label: series_of(records, key) for label, key in keys.items()}
        found = {label: series for label, series in found.items() if series}
        if found:
            panels.append((title, found))
    if not panels:
        return None
    last_iter = max(record.get("iter", 0) for record in records)
    canvas = Image.new("RGB", (PANEL_WIDTH, TEXT + len(panels) * PANEL_HEIGHT), "white")
    draw = ImageDraw.Draw(canvas)
    task = "Pretraining" if pretraining else "Fine-tuning"
    key = "lines: training, dots: validation, large dots: final evaluation"
    draw.text((PAD, 4), f"{task} ({key})", fill="black", font=FONT)
    for k, (title, found) in enumerate(panels):
        draw_panel(draw, TEXT + k * PANEL_HEIGHT, title, found, max(last_iter, 1))
    return canvas


def draw_panel(draw, y0, title, found, last_iter):
    """The panel from height y0: title and legend, the value and iteration ranges, the series."""
    left = 64  # the plot's frame: room on its left for the values, above for the title, under for iterations
    right = PANEL_WIDTH - 16
    top = y0 + 30
    bottom = y0 + PANEL_HEIGHT - 30
    values = [value for series in found.values() for value in series.values()]
    low = min(values)
    high = max(values)

    def pixel(it, value):  # (iteration, value) -> (x, y), the values 8 pixels clear of the frame
        y = bottom - 8 - (value - low) / max(high - low, 1e-12) * (bottom - top - 16)
        return left + it / last_iter * (right - left), y

    draw.rectangle([left, top, right, bottom], outline="black")
    for value in (low, high):
        draw.text((left - 6, pixel(0, value)[1]), f"{value:.3g}", fill="black", font=FONT, anchor="rm")
    draw.text((left, bottom + 4), "0", fill="black", font=FONT, anchor="ma")
    draw.text((right, bottom + 4), f"{last_iter} iterations", fill="black", font=FONT, anchor="ra")
    draw.text((left, y0 + 8), title, fill="black", font=FONT)
    legend_x = left + draw.textlength(title, font=FONT) + 24
    for colour, (label, series) in zip(SERIES_COLOURS, found.items()):
        draw.rectangle([legend_x, y0 + 10, legend_x + 10, y0 + 20], fill=colour)
        draw.text((legend_x + 14, y0 + 8), label, fill="black", font=FONT)
        legend_x += draw.textlength(label, font=FONT) + 34
        train = sorted((it, value) for (split, it), value in series.items() if split == "train")
        draw.line([pixel(it, value) for it, value in train], fill=colour, width=2)
        for (split, it), value in series.items():
            if split in MARKER_RADIUS:
                x, y = pixel(it, value)
                r = MARKER_RADIUS[split]
                draw.ellipse([x - r, y - r, x + r, y + r], fill=colour, outline="black")
