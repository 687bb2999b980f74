"""
Pictures of what a model does, drawn with Pillow and numpy (no plotting library): inpainting (Fig. 3
of the paper: original / masked / reconstructed spectrogram and frame) and sound-source localisation
(a heat map of audio-visual similarity over the frame). eval.py's `inpaint` and `localize` commands
write them. train.py draws a run's training curves here too (`train_picture`: losses, contrastive
accuracy, validation metrics).
"""

import dataclasses
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import data

PAD = 4  # pixels between panels
TEXT = 14  # height of a caption line
GREY = 128
# a dark-to-bright colormap (black, purple, red, orange, pale yellow) for spectrograms
COLORMAP = np.array(
    [[0, 0, 4], [80, 18, 123], [182, 54, 121], [251, 136, 97], [252, 253, 191]], dtype=np.float64
)
# a cold-to-hot colormap (dark blue, blue, cyan, yellow, red, dark red) for similarity heat maps
HEATMAP = np.array(
    [[0, 0, 110], [0, 40, 255], [0, 230, 255], [255, 240, 0], [255, 40, 0], [130, 0, 0]], dtype=np.float64
)
HEAT_OPACITY = 0.55  # weight of the heat map over the frame


def colorize(values, low, high, colormap=COLORMAP):
    """(H, W) values -> (H, W, 3) uint8 through `colormap` from low to high; NaN (masked) -> grey."""
    t = np.clip((values - low) / max(high - low, 1e-12), 0, 1)
    anchors = np.linspace(0, 1, len(colormap))
    rgb = np.stack([np.interp(t, anchors, colormap[:, c]) for c in range(3)], axis=-1)
    rgb[np.isnan(values)] = GREY
    return rgb.round().astype(np.uint8)


def spectrogram_picture(fbank, low, high):
    """(T, F) fbank -> (F, T, 3) picture: time to the right, low frequencies at the bottom."""
    return colorize(fbank.T.flip(0).numpy(), low, high)


def zoom_for(size):
    """Small frames are enlarged to about 128 pixels, by pixel repetition."""
    return max(1, 128 // size)


def image_picture(image, zoom):
    """(3, S, S) ImageNet-normalised image -> (S*zoom, S*zoom, 3) uint8; NaN (masked) -> grey."""
    image = image.float().cpu()
    rgb = image * torch.tensor(data.IMAGE_STD)[:, None, None] + torch.tensor(data.IMAGE_MEAN)[:, None, None]
    rgb = (rgb.clamp(0, 1) * 255).round().nan_to_num(GREY).byte().permute(1, 2, 0).numpy()  # clamp keeps NaN
    return rgb.repeat(zoom, 0).repeat(zoom, 1)


# -----------------------------------------------------------------------------
# Inpainting


def reconstruct(model, target, pred, mask):
    """Visible patches from the input, masked ones from the prediction (MAE's visualisation); the prediction
    in the input's units (model.prediction_to_input_space undoes norm_pix_loss). Returns (visible, recon)."""
    pred = model.prediction_to_input_space(pred, target)
    masked = mask[..., None].bool()  # (B, L, 1)
    visible = target.masked_fill(masked, float("nan"))
    return visible, torch.where(masked, pred, target)


def inpaint_picture(model, audio, image, mask_a, mask_v, pred_a, pred_v, title):
    """One clip: rows original / masked / reconstruction, columns spectrogram / frame."""
    masked_a, recon_a = reconstruct(model, model.patchify_audio(audio[None]), pred_a[None], mask_a[None])
    masked_v, recon_v = reconstruct(model, model.patchify_image(image[None]), pred_v[None], mask_v[None])
    spectrograms = [audio, model.unpatchify_audio(masked_a)[0], model.unpatchify_audio(recon_a)[0]]
    images = [image, model.unpatchify_image(masked_v)[0], model.unpatchify_image(recon_v)[0]]
    T = audio.shape[0]  # fbank frames
    bins = audio.shape[1]  # mel bins
    S = image.shape[-1]  # frame size
    zoom = zoom_for(S)
    panel = max(bins, S * zoom)
    canvas = Image.new("RGB", (PAD + T + PAD + S * zoom + PAD, TEXT + 3 * (TEXT + panel) + PAD), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, 1), title, fill="black")
    low = audio.min().item()
    high = audio.max().item()
    audio_ratio = mask_a.mean().item()
    visual_ratio = mask_v.mean().item()
    captions = ("original", f"masked {audio_ratio:.0%} / {visual_ratio:.0%}", "reconstruction")
    for row, caption in enumerate(captions):
        y = TEXT + row * (TEXT + panel)
        draw.text((PAD, y + 1), caption, fill="black")
        canvas.paste(Image.fromarray(spectrogram_picture(spectrograms[row], low, high)), (PAD, y + TEXT))
        canvas.paste(Image.fromarray(image_picture(images[row], zoom)), (2 * PAD + T, y + TEXT))
    return canvas


# -----------------------------------------------------------------------------
# Sound-source localisation


def heat_overlay(frame_rgb, similarity):
    """(P, P, 3) uint8 frame and an (h, w) similarity grid -> the grid upsampled bilinearly to the
    frame, coloured with HEATMAP from its minimum (blue) to its maximum (red), blended over the
    frame."""
    P = frame_rgb.shape[0]
    grid = similarity.float().cpu()[None, None]  # (1, 1, h, w)
    heat = F.interpolate(grid, size=(P, P), mode="bilinear", align_corners=False)[0, 0].numpy()  # (P, P)
    colours = colorize(heat, float(grid.min()), float(grid.max()), HEATMAP)
    return (HEAT_OPACITY * colours + (1 - HEAT_OPACITY) * frame_rgb).round().astype(np.uint8)


def outline(inside):
    """(P, P) boolean mask -> its boundary pixels (inside, with a 4-neighbour outside)."""
    padded = np.pad(inside, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return inside & ~interior


def localization_picture(image, similarity, peak, patch_size, title, inside=None):
    """One clip: the frame, and the frame under the heat map of `similarity` (h, w) with a cross on
    the `peak` patch (row, col). inside: optional function (x, y) -> bool array for points in frame
    pixels (of the (3, S, S) image the model saw): where the sounding objects are, outlined in white
    on both panels."""
    S = image.shape[-1]
    zoom = zoom_for(S)
    P = S * zoom
    frame = image_picture(image, zoom)  # (P, P, 3)
    panels = [frame, heat_overlay(frame, similarity)]
    if inside is not None:
        centres = (np.arange(P) + 0.5) / zoom  # picture pixels -> frame pixels
        edge = outline(inside(centres[None, :], centres[:, None]))
        for panel in panels:
            panel[edge] = 255
    canvas = Image.new("RGB", (PAD + 2 * (P + PAD), 2 * TEXT + P + PAD), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, 1), title, fill="black")
    low = float(similarity.min())
    high = float(similarity.max())
    captions = ("frame", f"cosine {low:.2f} .. {high:.2f}")
    for k, (panel, caption) in enumerate(zip(panels, captions)):
        draw.text((PAD + k * (P + PAD), TEXT + 1), caption, fill="black")
        canvas.paste(Image.fromarray(panel), (PAD + k * (P + PAD), 2 * TEXT))
    x = PAD + P + PAD + (peak[1] + 0.5) * patch_size * zoom  # the peak patch's centre on the heat panel
    y = 2 * TEXT + (peak[0] + 0.5) * patch_size * zoom
    arm = max(3, patch_size * zoom // 4)
    for width, colour in ((3, "black"), (1, "white")):
        draw.line([(x - arm, y), (x + arm, y)], fill=colour, width=width)
        draw.line([(x, y - arm), (x, y + arm)], fill=colour, width=width)
    return canvas


# -----------------------------------------------------------------------------
# Training curves: train.py's train.png, from the run's log.jsonl

CHART_WIDTH = 560  # one panel, in pixels
CHART_HEIGHT = 320
# the plot area's margins inside a panel
CHART_LEFT = 62
CHART_RIGHT = 18
CHART_TOP = 52
CHART_BOTTOM = 44
CHART_HEADER = 34  # the picture's title and marker key
MAX_TICKS = 7  # round tick values per axis, at most
FONT_SIZE = 13
GRID = (225, 225, 225)
# colours that colour-blind readers tell apart (Okabe-Ito): blue, vermilion, green, purple
SERIES_COLOURS = [(0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167)]
DOT_RADIUS = 4  # a validation point
DIAMOND_RADIUS = 7  # the final evaluation


@dataclasses.dataclass
class Series:
    """One quantity in a panel: its training line, validation points and final value, as (iter, value)."""

    label: str
    train: list
    val: list
    final: tuple | None


@dataclasses.dataclass
class Panel:
    title: str
    series: list
    from_zero: bool = False  # rates and accuracies: the y axis starts at 0


# What a person reads to judge a run, by task: (panel title, from_zero, [(series label, log keys)]).
# A series is read from the first of its keys that a record has (older logs say c_acc).
PRETRAIN_PANELS = [
    (
        "reconstruction loss (MSE on masked patches)",
        False,
        [("audio", ["loss_mae_a"]), ("visual", ["loss_mae_v"])],
    ),
    ("contrastive loss", False, [("contrastive", ["loss_c"])]),
    ("contrastive accuracy (in batch)", True, [("accuracy", ["contrastive_accuracy", "c_acc"])]),
    (
        "retrieval R@1 on the validation set",
        True,
        [("audio->visual", ["a2v_R1"]), ("visual->audio", ["v2a_R1"])],
    ),
]
FINETUNE_PANELS = [
    ("loss", False, [("loss", ["loss"])]),
    ("validation accuracy", True, [("middle frame", ["acc"]), ("all frames", ["acc_frames"])]),
    ("validation mAP", True, [("middle frame", ["mAP"]), ("all frames", ["mAP_frames"])]),
]


def nice_steps(span):
    """Round spacings (1, 2 or 5 times a power of ten), from a tenth of `span`'s power of ten up."""
    power = 10.0 ** (math.floor(math.log10(span)) - 1)
    while True:
        for nice in (1, 2, 5):
            yield nice * power
        power *= 10


def nice_ticks(low, high, max_ticks=MAX_TICKS):
    """Round tick values ("nice numbers") from at or below `low` to at or above `high`, at the
    smallest round spacing that needs at most max_ticks of them: (0, 1488) -> [0, 500, 1000, 1500];
    (0, 120) -> [0, 20, .., 120]. The first and last are the axis limits."""
    if high <= low:  # one value: a small range around it
        spread = abs(low) * 0.1 if low else 1.0
        low = low - spread
        high = high + spread
    for step in nice_steps(high - low):
        first = math.floor(low / step + 1e-9)
        last = math.ceil(high / step - 1e-9)
        if last - first + 1 <= max_ticks:
            break
    decimals = tick_decimals(step)
    return [round(k * step, decimals) + 0.0 for k in range(first, last + 1)]  # + 0.0: no -0.0


def tick_decimals(step):
    """Digits after the point that a tick label at this spacing needs: 500 -> 0, 0.05 -> 2."""
    return max(0, -math.floor(math.log10(step) + 1e-9))


def tick_label(value, step):
    return f"{value:.{tick_decimals(step)}f}"


def read_log(log_path):
    """The records of a log.jsonl. A line cut short (a run killed while writing) is skipped."""
    records = []
    with open(log_path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def is_number(value):
    """A finite int or float (the NaN loss that stopped a run has no place on an axis)."""
    if isinstance(value, bool) or (not isinstance(value, int | float)):
        return False
    return math.isfinite(value)


def first_value(record, keys):
    """The record's value under the first of `keys` it has, or None."""
    for key in keys:
        if is_number(record.get(key)):
            return float(record[key])
    return None


def points(records, split, keys):
    """[(iter, value)] of the records of `split` that hold one of `keys`, by iteration. A resumed
    run logs some iterations again: the last record of an iteration wins."""
    by_iter = {}
    for record in records:
        if record.get("split") != split:
            continue
        value = first_value(record, keys)
        if (value is not None) and ("iter" in record):
            by_iter[record["iter"]] = value
    return sorted(by_iter.items())


def is_pretraining(records):
    """A pretraining log holds reconstruction losses; a fine-tuning log does not."""
    return any("loss_mae_a" in record for record in records)


def panels_of(records):
    """The panels this log has data for, each with the series it has data for."""
    panels = []
    for title, from_zero, specs in PRETRAIN_PANELS if is_pretraining(records) else FINETUNE_PANELS:
        series = []
        for label, keys in specs:
            finals = points(records, "final", keys)
            final = finals[-1] if finals else None
            train = points(records, "train", keys)
            found = Series(label, train, points(records, "val", keys), final)
            if found.train or found.val or found.final:
                series.append(found)
        if series:
            panels.append(Panel(title, series, from_zero))
    return panels


def chart_font(size=FONT_SIZE):
    """Pillow's own scalable font (Pillow >= 10.1 with FreeType), else its small bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def text_size(draw, text, font):
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def all_points(series):
    found = list(series.train) + list(series.val)
    if series.final is not None:
        found.append(series.final)
    return found


def draw_marker(draw, kind, x, y, colour):
    """A validation dot or a final-evaluation diamond, outlined in black to stand out from lines."""
    if kind == "dot":
        r = DOT_RADIUS
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour, outline="black")
    else:
        r = DIAMOND_RADIUS
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=colour, outline="black")


def draw_legend(draw, panel, x, y, font):
    """Colour keys on a line from (x, y); a series' final value beside its name."""
    for colour, series in zip(SERIES_COLOURS, panel.series):
        label = series.label
        if series.final is not None:
            label += f" (final {series.final[1]:.3f})"
        draw.rectangle([x, y + 3, x + 11, y + 12], fill=colour)
        draw.text((x + 16, y), label, fill="black", font=font)
        x += 16 + text_size(draw, label, font)[0] + 20


@dataclasses.dataclass
class Axes:
    """A panel's plot area in canvas pixels and the tick values that are its limits."""

    left: float
    right: float
    top: float
    bottom: float
    x_ticks: list
    y_ticks: list

    def pixel(self, it, value):
        """(iteration, value) -> canvas (x, y)."""
        fx = (it - self.x_ticks[0]) / (self.x_ticks[-1] - self.x_ticks[0])
        fy = (value - self.y_ticks[0]) / (self.y_ticks[-1] - self.y_ticks[0])
        x = self.left + fx * (self.right - self.left)
        y = self.bottom - fy * (self.bottom - self.top)
        return x, y


def panel_axes(panel, x0, y0, last_iter):
    """The plot area of the panel with top-left corner (x0, y0); the axes span the panel's values."""
    values = [value for series in panel.series for _, value in all_points(series)]
    low = min(values)
    if panel.from_zero:
        low = min(low, 0.0)
    return Axes(
        left=x0 + CHART_LEFT,
        right=x0 + CHART_WIDTH - CHART_RIGHT,
        top=y0 + CHART_TOP,
        bottom=y0 + CHART_HEIGHT - CHART_BOTTOM,
        x_ticks=nice_ticks(0, max(last_iter, 1)),
        y_ticks=nice_ticks(low, max(values)),
    )


def draw_grid(draw, axes, font):
    """Grid lines at the ticks, their values beside the axes, the x axis' name and the frame."""
    y_step = axes.y_ticks[1] - axes.y_ticks[0]
    for value in axes.y_ticks:
        _, y = axes.pixel(axes.x_ticks[0], value)
        draw.line([(axes.left, y), (axes.right, y)], fill=GRID)
        label = tick_label(value, y_step)
        width, height = text_size(draw, label, font)
        draw.text((axes.left - 6 - width, y - height / 2 - 2), label, fill="black", font=font)
    x_step = axes.x_ticks[1] - axes.x_ticks[0]
    for it in axes.x_ticks:
        x, _ = axes.pixel(it, axes.y_ticks[0])
        draw.line([(x, axes.top), (x, axes.bottom)], fill=GRID)
        label = tick_label(it, x_step)
        width, _ = text_size(draw, label, font)
        draw.text((x - width / 2, axes.bottom + 5), label, fill="black", font=font)
    width, _ = text_size(draw, "iteration", font)
    x_name = ((axes.left + axes.right - width) / 2, axes.bottom + 22)
    draw.text(x_name, "iteration", fill="black", font=font)
    draw.rectangle([axes.left, axes.top, axes.right, axes.bottom], outline="black")


def draw_series(draw, axes, series, colour):
    """The training line (a dot for a single record), the validation dots, the final diamond."""
    if len(series.train) > 1:
        draw.line([axes.pixel(*p) for p in series.train], fill=colour, width=2)
    if len(series.train) == 1:
        draw_marker(draw, "dot", *axes.pixel(*series.train[0]), colour)
    if (not series.train) and (len(series.val) > 1):  # validation alone: joined, to show its trend
        draw.line([axes.pixel(*p) for p in series.val], fill=colour, width=1)
    for p in series.val:
        draw_marker(draw, "dot", *axes.pixel(*p), colour)
    if series.final is not None:
        draw_marker(draw, "diamond", *axes.pixel(*series.final), colour)


def draw_panel(draw, panel, x0, y0, last_iter, font):
    """The panel with top-left corner (x0, y0): title, legend, grid and ticks, then each series."""
    axes = panel_axes(panel, x0, y0, last_iter)
    draw.text((axes.left, y0 + 8), panel.title, fill="black", font=font)
    draw_legend(draw, panel, axes.left, y0 + 28, font)
    draw_grid(draw, axes, font)
    for colour, series in zip(SERIES_COLOURS, panel.series):
        draw_series(draw, axes, series, colour)


MARKER_KEY = [
    ("line", "training (mean over each log interval)"),
    ("dot", "validation"),
    ("diamond", "final evaluation"),
]


def draw_key(draw, title, font):
    """The picture's title and what its lines and markers mean."""
    draw.text((10, 10), title, fill="black", font=font)
    x = 10 + text_size(draw, title, font)[0] + 30
    for kind, meaning in MARKER_KEY:
        if kind == "line":
            draw.line([(x - 12, 17), (x + 12, 17)], fill="black", width=2)
        else:
            draw_marker(draw, kind, x, 17, "white")
        draw.text((x + 18, 10), meaning, fill="black", font=font)
        x += 18 + text_size(draw, meaning, font)[0] + 36


def train_picture(log_path):
    """Curves of a run from its log.jsonl, drawn with Pillow: for pretraining the audio and visual
    reconstruction losses, the contrastive loss and accuracy, retrieval R@1 both ways; for
    fine-tuning the loss, accuracy and mAP. Lines are training records, dots evaluations, diamonds
    the final evaluation. A quantity the log lacks is left out; None when the log has nothing to
    draw."""
    records = read_log(log_path)
    panels = panels_of(records)
    if not panels:
        return None
    every_series = [series for panel in panels for series in panel.series]
    last_iter = max(it for series in every_series for it, _ in all_points(series))
    columns = 1 if len(panels) == 1 else 2
    rows = math.ceil(len(panels) / columns)
    canvas = Image.new("RGB", (columns * CHART_WIDTH, CHART_HEADER + rows * CHART_HEIGHT), "white")
    font = chart_font()
    run_name = os.path.basename(os.path.dirname(os.path.abspath(log_path)))
    task = "pretraining" if is_pretraining(records) else "fine-tuning"
    draw = ImageDraw.Draw(canvas)
    draw_key(draw, f"{run_name}: {task}", font)
    for k, panel in enumerate(panels):
        x0 = (k % columns) * CHART_WIDTH
        y0 = CHART_HEADER + (k // columns) * CHART_HEIGHT
        draw_panel(draw, panel, x0, y0, last_iter, font)
    return canvas
