"""
Pictures of what a model does, drawn with Pillow and numpy (no plotting library): inpainting (Fig. 3 of the
paper: original / masked / reconstructed spectrogram and frame) and sound-source localisation (a heat map of
audio-visual similarity over the frame). eval.py's `inpaint` and `localize` commands write them; train.py draws
its loss curve here too.
"""

import json

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import data

PAD, TEXT = 4, 14  # pixels between panels, height of a caption line
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
    """(H, W) values -> (H, W, 3) uint8 through `colormap` between low and high; NaN (masked) -> grey."""
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
    T, bins, S = audio.shape[0], audio.shape[1], image.shape[-1]
    zoom = zoom_for(S)
    panel = max(bins, S * zoom)
    canvas = Image.new("RGB", (PAD + T + PAD + S * zoom + PAD, TEXT + 3 * (TEXT + panel) + PAD), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, 1), title, fill="black")
    low, high = audio.min().item(), audio.max().item()
    ratio = mask_a.mean().item(), mask_v.mean().item()
    for row, caption in enumerate(("original", f"masked {ratio[0]:.0%} / {ratio[1]:.0%}", "reconstruction")):
        y = TEXT + row * (TEXT + panel)
        draw.text((PAD, y + 1), caption, fill="black")
        canvas.paste(Image.fromarray(spectrogram_picture(spectrograms[row], low, high)), (PAD, y + TEXT))
        canvas.paste(Image.fromarray(image_picture(images[row], zoom)), (2 * PAD + T, y + TEXT))
    return canvas


# -----------------------------------------------------------------------------
# Sound-source localisation


def heat_overlay(frame_rgb, similarity):
    """(P, P, 3) uint8 frame and an (h, w) similarity grid -> the grid upsampled bilinearly to the frame, coloured
    with HEATMAP from its minimum (blue) to its maximum (red), blended over the frame."""
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
    """One clip: the frame, and the frame under the heat map of `similarity` (h, w) with a cross on the `peak`
    patch (row, col). inside: optional function (x, y) -> bool array for points in frame pixels (of the (3, S, S)
    image the model saw): where the sounding objects are, outlined in white on both panels."""
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
    low, high = float(similarity.min()), float(similarity.max())
    for k, (panel, caption) in enumerate(zip(panels, ("frame", f"cosine {low:.2f} .. {high:.2f}"))):
        draw.text((PAD + k * (P + PAD), TEXT + 1), caption, fill="black")
        canvas.paste(Image.fromarray(panel), (PAD + k * (P + PAD), 2 * TEXT))
    x = PAD + P + PAD + (peak[1] + 0.5) * patch_size * zoom  # the peak patch's centre on the heat panel
    y = 2 * TEXT + (peak[0] + 0.5) * patch_size * zoom
    arm = max(3, patch_size * zoom // 4)
    for width, colour in ((3, "black"), (1, "white")):
        draw.line([(x - arm, y), (x + arm, y)], fill=colour, width=width)
        draw.line([(x, y - arm), (x, y + arm)], fill=colour, width=width)
    return canvas


def loss_picture(log_path, width=720, height=420, margin=(70, 20, 30, 50)):
    """train.py's loss.png: the training loss per logged iteration (blue line) and the validation loss (red
    dots) of a log.jsonl; None with fewer than two points."""
    records = [json.loads(line) for line in open(log_path)]
    train = [(r["iter"], r["loss"]) for r in records if r["split"] == "train"]
    val = [(r["iter"], r["loss"]) for r in records if r["split"] == "val"]
    if len(train + val) < 2:
        return None
    left, right, top, bottom = margin
    (x0, y0), (x1, y1) = [tuple(f(p[i] for p in train + val) for i in (0, 1)) for f in (min, max)]
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1e-3)
    px = lambda x, y: (
        left + (x - x0) / (x1 - x0) * (width - left - right),  # noqa: E731
        height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom),
    )
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(5):  # axis ticks with their values
        x, y = round(x0 + (x1 - x0) * i / 4), y0 + (y1 - y0) * i / 4
        draw.text((px(x, y0)[0] - 10, height - bottom + 6), str(x), fill="black")
        draw.text((8, px(x0, y)[1] - 6), f"{y:.3g}", fill="black")
    draw.text(((width - left) // 2, height - 20), "iteration", fill="black")
    draw.text((8, 8), "loss      train (blue), validation (red)", fill="black")
    if len(train) > 1:
        draw.line([px(*p) for p in train], fill=(30, 90, 200), width=2)
    for p in val:
        draw.ellipse([px(*p)[0] - 3, px(*p)[1] - 3, px(*p)[0] + 3, px(*p)[1] + 3], fill=(210, 40, 40))
    return img
