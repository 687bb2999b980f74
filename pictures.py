"""Pictures drawn with Pillow and numpy: inpainting (Fig. 3), localisation and training curves."""

import json

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from data import IMAGE_MEAN, IMAGE_STD

PAD = 6  # pixels between panels
TEXT = 20  # height of a caption line
GREY = 128  # masked patches
FONT = ImageFont.load_default(size=13)
DARK_TO_BRIGHT = np.array([[0, 0, 4], [80, 18, 123], [182, 54, 121], [251, 136, 97], [252, 253, 191]])
BLUE_TO_RED = np.array([[0, 0, 110], [0, 40, 255], [0, 230, 255], [255, 240, 0], [255, 40, 0], [130, 0, 0]])
SERIES_COLOURS = [(0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167)]  # Okabe-Ito


def colorize(values, reference, colours):
    """(H, W) values -> (H, W, 3) uint8, from colours[0] at min(reference) to colours[-1] at its max."""
    t = np.clip((values - reference.min()) / max(np.ptp(reference), 1e-12), 0, 1)
    anchors = np.linspace(0, 1, len(colours))
    rgb = np.stack([np.interp(t, anchors, colours[:, c]) for c in range(3)], axis=-1)
    rgb[np.isnan(values)] = GREY  # masked patches
    return rgb.round().astype(np.uint8)


def frame_picture(image):
    """(3, S, S) normalised image -> (P, P, 3) uint8, enlarged to about 128 pixels; NaN grey."""
    zoom = max(1, 128 // image.shape[-1])
    rgb = image.float().cpu().permute(1, 2, 0).numpy() * IMAGE_STD + IMAGE_MEAN  # (S, S, 3)
    rgb = np.nan_to_num(np.clip(rgb, 0, 1) * 255, nan=GREY).round().astype(np.uint8)
    return rgb.repeat(zoom, 0).repeat(zoom, 1)


def three_rows(model, patches, mask, pred):
    """Input patches (1, L, P); with the masked ones NaN; with them predicted (MAE's picture)."""
    pred = model.prediction_to_input_space(pred[None].float(), patches)
    masked = mask.bool()[None, :, None]  # (1, L, 1)
    return [patches, patches.masked_fill(masked, float("nan")), pred.where(masked, patches)]


def inpaint_picture(model, audio, image, mask_a, mask_v, pred_a, pred_v, title):
    """One clip: rows original / masked / reconstruction, columns spectrogram (T, F) / frame."""
    rows_a = three_rows(model, model.patchify_audio(audio[None]), mask_a, pred_a)
    rows_v = three_rows(model, model.patchify_image(image[None]), mask_v, pred_v)
    # (F, T): time to the right, low frequencies at the bottom
    spectrograms = [model.unpatchify_audio(x)[0].T.flip(0).numpy() for x in rows_a]
    spectrograms = [colorize(x, audio.cpu().numpy(), DARK_TO_BRIGHT) for x in spectrograms]
    frames = [frame_picture(model.unpatchify_image(x)[0]) for x in rows_v]
    T, bins = audio.shape
    P = frames[0].shape[0]
    row_height = TEXT + max(bins, P)
    canvas = Image.new("RGB", (PAD + T + PAD + P + PAD, TEXT + 3 * row_height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, 4), title, fill="black", font=FONT)
    for row, caption in enumerate(["original", "masked (grey)", "reconstruction"]):
        y = TEXT + row * row_height
        draw.text((PAD, y + 4), caption, fill="black", font=FONT)
        canvas.paste(Image.fromarray(spectrograms[row]), (PAD, y + TEXT))
        canvas.paste(Image.fromarray(frames[row]), (PAD + T + PAD, y + TEXT))
    return canvas


def localization_picture(image, similarity, title, outlines=()):
    """The frame (3, S, S), and the frame under a heat map of `similarity` (h, w) over its patches.
    outlines: (mask, colour) pairs, mask an (S, S) bool array."""
    frame = frame_picture(image)  # (P, P, 3)
    P = frame.shape[0]
    grid = similarity.float().cpu().numpy()
    heat = np.asarray(Image.fromarray(grid).resize((P, P), Image.BILINEAR))  # (P, P)
    heat = 0.55 * colorize(heat, grid, BLUE_TO_RED) + 0.45 * frame  # blended over the frame
    panels = [frame, heat.astype(np.uint8)]
    for mask, colour in outlines:
        inside = Image.fromarray(np.asarray(mask, np.uint8) * 255).resize((P, P), Image.NEAREST)
        edge = np.asarray(inside.filter(ImageFilter.FIND_EDGES)) > 0
        for panel in panels:
            panel[edge] = colour
    canvas = Image.new("RGB", (PAD + 2 * (P + PAD), 3 * TEXT + P + PAD), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, 4), title, fill="black", font=FONT)
    captions = ["frame", f"heat map\nblue {grid.min():.2f} .. red {grid.max():.2f}"]
    for k in range(2):
        draw.text((PAD + k * (P + PAD), TEXT + 4), captions[k], fill="black", font=FONT)
        canvas.paste(Image.fromarray(panels[k]), (PAD + k * (P + PAD), 3 * TEXT))
    return canvas


# Training curves: train.py's train.png, from the run's log.jsonl
PANEL_WIDTH = 640
PANEL_HEIGHT = 170
RIGHT = PANEL_WIDTH - PAD  # the plots' right edge
PANELS = [  # the series of each panel, {label: the log's key}, drawn in SERIES_COLOURS
    {"loss": "loss"},
    {"reconstruction loss, audio": "loss_mae_a", "visual": "loss_mae_v"},
    {"contrastive loss": "loss_c"},
    {"contrastive accuracy (in batch)": "contrastive_accuracy"},
    {"retrieval R@1, audio->visual": "a2v_R1", "visual->audio": "v2a_R1"},
    {"accuracy, middle frame": "acc", "all frames": "acc_frames"},
    {"mAP, middle frame": "mAP", "all frames": "mAP_frames"},
]


def read_log(path):
    """The records of a log.jsonl without non-finite numbers; of a (split, iter) logged twice (by
    a resumed run), the last. A line that does not parse (cut short by a kill) is skipped."""
    records = {}
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            finite = {k: v for k, v in record.items() if not isinstance(v, float) or np.isfinite(v)}
            records[record.get("split"), record.get("iter")] = finite
    return list(records.values())


def train_picture(log_path):
    """A run's curves, a panel for each quantity in its log.jsonl; None when it has none. Above each
    plot: its series' names in their colours and the range of its values, bottom .. top."""
    records = read_log(log_path)
    logged = {key for record in records for key in record}
    panels = [{label: key for label, key in series.items() if key in logged} for series in PANELS]
    panels = [series for series in panels if series]  # the panels with a quantity the log has
    if not panels:
        return None
    last_iter = max(max(record.get("iter", 0) for record in records), 1)
    canvas = Image.new("RGB", (PANEL_WIDTH, TEXT + len(panels) * PANEL_HEIGHT), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, 4), f"iter 0 .. {last_iter}; lines: training, dots: validation", fill="black", font=FONT)
    for k, series in enumerate(panels):
        top = TEXT + k * PANEL_HEIGHT + 30  # the plot's frame, under its legend
        bottom = top + PANEL_HEIGHT - 40
        values = [r[key] for key in series.values() for r in records if key in r]
        low = min(values)
        high = max(values)
        # pixel = origin + scale * (iter, value): low 8 px above the bottom, high 8 px below the top
        scale = np.array([(RIGHT - PAD) / last_iter, (top - bottom + 16) / max(high - low, 1e-12)])
        origin = np.array([PAD, bottom - 8]) - scale * [0, low]
        draw.rectangle([PAD, top, RIGHT, bottom], outline="black")
        draw.text((RIGHT, top - 22), f"{low:.3g} .. {high:.3g}", fill="black", font=FONT, anchor="ra")
        for j, (label, key) in enumerate(series.items()):
            colour = SERIES_COLOURS[j]
            draw.text((PAD + 230 * j, top - 22), label, fill=colour, font=FONT)  # the legend
            trained = [r for r in records if r.get("split") == "train" and key in r]
            evaluated = [r for r in records if r.get("split") in ("val", "final") and key in r]
            draw.line([tuple(origin + scale * (r["iter"], r[key])) for r in trained], fill=colour, width=2)
            for r in evaluated:
                x, y = origin + scale * (r["iter"], r[key])
                draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour, outline="black")
    return canvas
