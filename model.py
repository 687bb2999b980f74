"""CAV-MAE: Contrastive Audio-Visual Masked Autoencoder (Gong et al., ICLR 2023), in one file.

Read top to bottom, in the order of the method (as MAE's models_mae.py): configuration, transformer
block, encoder, masking, the pretraining model and its losses, the fine-tuning classifier, per-block
compilation, loading published weights. Numerically identical to the official release (tests/golden
holds its outputs).
"""

import math
import os
import random
import re
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

CONTRASTIVE_TEMPERATURE = 0.05  # Sec. 3: tau in the InfoNCE loss
MASK_RATIO = 0.75  # Sec. 4: the share of each modality's patches masked in pretraining, as MAE's
CONTRASTIVE_WEIGHT = 0.01  # Sec. 3: lambda_c, the contrastive loss's weight beside the MAE loss
TOKEN_INIT_STD = 0.02  # official init: mask and modality tokens ~ N(0, 0.02^2), as MAE's
TF_MASK_SCALE = 0.7  # 'tf' masking: time columns and frequency rows each at 0.7x the mask ratio
NORM_PIX_EPS = 1e-6  # norm_pix_loss: each target patch is normalised by sqrt(var + eps)
# the fine-tuning modes, by their official names
FT_MODES = ("multimodal", "audioonly", "videoonly", "missingaudioonly", "missingvideoonly")
MASK_MODES = ("unstructured", "time", "freq", "tf")
# the suffix of each stream's LayerNorms in a joint block (norm1, norm1_a, ...) and after it (norm_a)
STREAM_NORM_SUFFIX = {"joint": "", "audio": "_a", "visual": "_v"}


@dataclass
class CAVMAEConfig:
    img_size: int = 224
    audio_length: int = 1024  # fbank frames (10 s at a 10 ms hop, padded)
    num_mel_bins: int = 128
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    num_heads: int = 12
    modality_specific_depth: int = 11
    joint_depth: int = 1
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_pix_loss: bool = False
    tr_pos: bool = False  # trainable positional embeddings in pretraining (the paper keeps them fixed)
    # Official quirk, kept for exactness: with joint_depth > 1 the audio-only and visual-only streams
    # of the contrastive loss pass through the last joint block only (no effect at joint_depth=1).
    official_contrastive_streams: bool = True

    def __post_init__(self):
        for name in ("img_size", "audio_length", "num_mel_bins"):
            size = getattr(self, name)
            if size % self.patch_size:
                raise ValueError(f"{name}={size} is not a multiple of patch_size={self.patch_size}")
        for width_name, heads_name in (
            ("embed_dim", "num_heads"),
            ("decoder_embed_dim", "decoder_num_heads"),
        ):
            width = getattr(self, width_name)
            heads = getattr(self, heads_name)
            if (width % heads) or (width % 4):  # a slice per head; sin-cos tables split the width in 4
                raise ValueError(f"{width_name}={width} must be a multiple of {heads_name}={heads} and of 4")

    @property
    def audio_grid(self):  # (frequency bands, time steps): the fbank is laid out frequency-major
        return self.num_mel_bins // self.patch_size, self.audio_length // self.patch_size

    @property
    def visual_grid(self):
        return self.img_size // self.patch_size, self.img_size // self.patch_size


def sincos_pos_embed(dim, grid_h, grid_w):
    """Fixed 2-D sin-cos table (grid_h * grid_w, dim), row-major over the grid, in the official
    layout: the first dim/2 channels encode the column (x / time), the last dim/2 the row (y /
    frequency); each half is [sin(pos * w_i), cos(pos * w_i)], w_i = 1 / 10000^(i / (dim/4))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    rows = torch.arange(grid_h, dtype=torch.float64).repeat_interleave(grid_w)  # (N,) row-major
    cols = torch.arange(grid_w, dtype=torch.float64).repeat(grid_h)  # (N,)

    def encode(pos):  # (N,) -> (N, dim/2)
        angle = pos.reshape(-1, 1) * omega
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def num_params(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# --- Transformer block ----------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, L, Dh)
        # softmax(q k^T / sqrt(Dh)) v in one fused kernel (flash attention on GPUs). Measured on the
        # CPU, base model, batch 4: 2.0 s instead of 5.2 s per step with the explicit softmax.
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, Dh)
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    """Pre-norm ViT block. A joint block (Sec. 3) has a LayerNorm pair per stream: 'joint' for the
    audio and visual tokens together, 'audio' and 'visual' for one modality alone; the attention
    and MLP weights are shared by the three streams."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, joint=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        if joint:
            self.norm1_a = nn.LayerNorm(dim)
            self.norm2_a = nn.LayerNorm(dim)
            self.norm1_v = nn.LayerNorm(dim)
            self.norm2_v = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        hidden = int(dim * mlp_ratio)
        # the MLP: fc1, exact (erf) GELU, fc2, under the official key names
        layers = OrderedDict(fc1=nn.Linear(dim, hidden), gelu=nn.GELU(), fc2=nn.Linear(hidden, dim))
        self.mlp = nn.Sequential(layers)

    def forward(self, x, stream="joint"):  # (B, L, D) -> (B, L, D)
        suffix = STREAM_NORM_SUFFIX[stream]
        x = x + self.attn(getattr(self, "norm1" + suffix)(x))
        return x + self.mlp(getattr(self, "norm2" + suffix)(x))


def init_weights(module):
    """Official init: xavier-uniform linear layers with zero bias, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# --- Encoder, shared by the pretraining model and the classifier ----------------------------------


class Encoder(nn.Module):
    """Patch and modality embeddings with positions, modality-specific blocks, joint blocks, norms."""

    def __init__(self, config, trainable_pos=False):
        super().__init__()
        c = config
        D = c.embed_dim
        self.config = c
        self.patch_embed_a = nn.Conv2d(1, D, c.patch_size, stride=c.patch_size)
        self.patch_embed_v = nn.Conv2d(c.in_chans, D, c.patch_size, stride=c.patch_size)
        self.modality_a = nn.Parameter(torch.zeros(1, 1, D))
        self.modality_v = nn.Parameter(torch.zeros(1, 1, D))
        # fixed 2-D sin-cos positions (Sec. 3); the official fine-tuning model trains them
        audio_table = sincos_pos_embed(D, *c.audio_grid)[None]  # (1, La, D)
        visual_table = sincos_pos_embed(D, *c.visual_grid)[None]  # (1, Lv, D)
        self.pos_embed_a = nn.Parameter(audio_table, requires_grad=trainable_pos)
        self.pos_embed_v = nn.Parameter(visual_table, requires_grad=trainable_pos)
        depth = c.modality_specific_depth
        self.audio_blocks = nn.ModuleList(Block(D, c.num_heads, c.mlp_ratio) for _ in range(depth))
        self.visual_blocks = nn.ModuleList(Block(D, c.num_heads, c.mlp_ratio) for _ in range(depth))
        depth = c.joint_depth
        self.joint_blocks = nn.ModuleList(Block(D, c.num_heads, c.mlp_ratio, True) for _ in range(depth))
        self.norm = nn.LayerNorm(D)  # after the joint stream
        self.norm_a = nn.LayerNorm(D)  # after the audio-only stream
        self.norm_v = nn.LayerNorm(D)  # after the visual-only stream
        self.apply(init_weights)
        for conv in (self.patch_embed_a, self.patch_embed_v):  # initialised as linear layers
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
            nn.init.zeros_(conv.bias)
        nn.init.normal_(self.modality_a, std=TOKEN_INIT_STD)
        nn.init.normal_(self.modality_v, std=TOKEN_INIT_STD)

    def embed_audio(self, audio):  # (B, T, F) fbank -> (B, La, D), La = F/p * T/p frequency-major
        x = self.patch_embed_a(audio.transpose(1, 2).unsqueeze(1))  # (B, D, F/p, T/p)
        return x.flatten(2).transpose(1, 2) + self.pos_embed_a + self.modality_a

    def embed_visual(self, image):  # (B, C, H, W) -> (B, Lv, D)
        x = self.patch_embed_v(image)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2) + self.pos_embed_v + self.modality_v

    def joint(self, x, stream, last_block_only=False):
        """Sec. 3 multi-stream pass: the shared joint blocks with the stream's norms, then its norm."""
        blocks = self.joint_blocks[-1:] if last_block_only else self.joint_blocks
        for block in blocks:
            x = block(x, stream)
        return getattr(self, "norm" + STREAM_NORM_SUFFIX[stream])(x)

    def modality_blocks(self, x, modality):
        """A modality's tokens (B, L, D) through its own blocks ('a' or 'v')."""
        blocks = self.audio_blocks if modality == "a" else self.visual_blocks
        for block in blocks:
            x = block(x)
        return x  # (B, L, D)

    def audio_tokens(self, audio):  # (B, T, F) -> (B, La, D) after the audio blocks
        return self.modality_blocks(self.embed_audio(audio), "a")

    def visual_tokens(self, image):  # (B, C, H, W) -> (B, Lv, D) after the visual blocks
        return self.modality_blocks(self.embed_visual(image), "v")

    def embed(self, audio, image):
        """Coordinated per-modality tokens without masking, for retrieval (the official
        forward_feat): (B, La, D), (B, Lv, D); a missing input (None) gives None."""
        audio_out = None if audio is None else self.joint(self.audio_tokens(audio), "audio")
        visual_out = None if image is None else self.joint(self.visual_tokens(image), "visual")
        return audio_out, visual_out


# --- Masking (Sec. 3: MAE's per-sample random masking) --------------------------------------------


def random_masking(x, noise, mask_ratio):
    """Keep the int(L * (1 - mask_ratio)) tokens of x (B, L, D) with the lowest noise (B, L), as MAE
    does. Returns the kept tokens (B, L_keep, D) in ascending noise, the mask (B, L) with 1 =
    masked, and ids_restore (B, L): each token's place in that order, to undo the shuffle."""
    B, L, D = x.shape
    num_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the first num_keep stay
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :num_keep]  # (B, L_keep)
    x_kept = torch.gather(x, 1, ids_keep[:, :, None].expand(-1, -1, D))  # (B, L_keep, D)
    mask = (ids_restore >= num_keep).float()  # (B, L): 0 = kept, 1 = masked
    return x_kept, mask, ids_restore


def append_mask_tokens_and_unshuffle(x, mask_token, ids_restore):
    """Kept tokens (B, L_keep, D) in masking order -> (B, L, D) in patch order, mask tokens put in."""
    B, num_keep, D = x.shape
    num_masked = ids_restore.shape[1] - num_keep
    x = torch.cat([x, mask_token.expand(B, num_masked, D)], dim=1)  # (B, L, D) in masking order
    return torch.gather(x, 1, ids_restore[:, :, None].expand(-1, -1, D))  # (B, L, D)


# --- Pretraining model ----------------------------------------------------------------------------


class CAVMAE(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = config
        Dd = c.decoder_embed_dim
        self.config = c
        self.encoder = Encoder(c, trainable_pos=c.tr_pos)
        self.decoder_embed = nn.Linear(c.embed_dim, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_modality_a = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_modality_v = nn.Parameter(torch.zeros(1, 1, Dd))
        audio_table = sincos_pos_embed(Dd, *c.audio_grid)[None]
        visual_table = sincos_pos_embed(Dd, *c.visual_grid)[None]
        self.decoder_pos_embed_a = nn.Parameter(audio_table, requires_grad=c.tr_pos)
        self.decoder_pos_embed_v = nn.Parameter(visual_table, requires_grad=c.tr_pos)
        depth = c.decoder_depth
        self.decoder_blocks = nn.ModuleList(Block(Dd, c.decoder_num_heads, c.mlp_ratio) for _ in range(depth))
        self.decoder_norm = nn.LayerNorm(Dd)
        self.decoder_pred_a = nn.Linear(Dd, c.patch_size**2)  # one spectrogram patch
        self.decoder_pred_v = nn.Linear(Dd, c.patch_size**2 * c.in_chans)  # one RGB patch
        self.apply(init_weights)  # the encoder's linear layers drawn again: the same distribution
        for token in (self.mask_token, self.decoder_modality_a, self.decoder_modality_v):
            nn.init.normal_(token, std=TOKEN_INIT_STD)

    # --- patches: the reconstruction targets ------------------------------------------------------
    def patchify_image(self, image):  # (B, C, H, W) -> (B, Lv, p*p*C), channel last within a patch
        p = self.config.patch_size
        B, C, H, W = image.shape
        x = image.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, H/p, W/p, p, p, C)
        return x.reshape(B, (H // p) * (W // p), p * p * C)

    def unpatchify_image(self, patches, grid=None):  # (B, rows * cols, p*p*C) -> (B, C, H, W)
        p = self.config.patch_size
        rows, cols = grid or self.config.visual_grid
        C = patches.shape[-1] // (p * p)
        x = patches.reshape(-1, rows, cols, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, H/p, p, W/p, p)
        return x.reshape(-1, C, rows * p, cols * p)

    # the fbank is patched as a one-channel picture (F, T): frequency-major, as the tokens
    def patchify_audio(self, audio):  # (B, T, F) -> (B, La, p*p)
        return self.patchify_image(audio.transpose(1, 2).unsqueeze(1))

    def unpatchify_audio(self, patches):  # (B, La, p*p) -> (B, T, F)
        return self.unpatchify_image(patches, self.config.audio_grid)[:, 0].transpose(1, 2)

    # --- encoder ----------------------------------------------------------------------------------
    def audio_noise(self, batch, mask_ratio, mask_mode, device):
        """Masking noise (B, La) of the audio tokens. 'unstructured': uniform, as MAE. The paper's
        ablation masks whole time columns ('time'), frequency rows ('freq') or both at TF_MASK_SCALE
        of the ratio each ('tf'), by giving them noise 1.1, above any uniform draw. The columns and
        rows are drawn with Python's `random` after the torch noise, as the official code does."""
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
        bands, steps = self.config.audio_grid
        noise = torch.rand(batch, bands, steps, device=device)  # (B, F/p, T/p), frequency-major
        if mask_mode != "unstructured":
            chosen = torch.zeros(batch, bands, steps, dtype=torch.bool)  # CPU: no GPU sync per sample
            scale = TF_MASK_SCALE if mask_mode == "tf" else 1.0
            if mask_mode in ("time", "tf"):
                for i in range(batch):
                    chosen[i, :, random.sample(range(steps), int(steps * mask_ratio * scale))] = True
            if mask_mode in ("freq", "tf"):
                for i in range(batch):
                    chosen[i, random.sample(range(bands), int(bands * mask_ratio * scale)), :] = True
            if torch.device(device).type == "cuda":  # pinned: the copy does not wait for the GPU
                chosen = chosen.pin_memory()
            noise = noise.masked_fill(chosen.to(device, non_blocking=True), 1.1)
        return noise.reshape(batch, bands * steps)

    def forward_encoder(self, audio, image, mask_ratio_a, mask_ratio_v, mask_mode="unstructured"):
        """Embed all patches, mask them (audio noise drawn first, then visual) and run the
        modality-specific blocks. -> the kept audio tokens (B, La_keep, D), visual tokens
        (B, Lv_keep, D), the masks (B, La), (B, Lv) and ids_restore (B, La), (B, Lv)."""
        enc = self.encoder
        B = audio.shape[0]
        noise_a = self.audio_noise(B, mask_ratio_a, mask_mode, audio.device)  # (B, La)
        noise_v = torch.rand(B, math.prod(self.config.visual_grid), device=audio.device)  # (B, Lv)
        a, mask_a, ids_restore_a = random_masking(enc.embed_audio(audio), noise_a, mask_ratio_a)
        v, mask_v, ids_restore_v = random_masking(enc.embed_visual(image), noise_v, mask_ratio_v)
        a = enc.modality_blocks(a, "a")
        v = enc.modality_blocks(v, "v")
        return a, v, mask_a, mask_v, ids_restore_a, ids_restore_v

    def embed(self, audio, image):  # coordinated tokens without masking, see Encoder.embed
        return self.encoder.embed(audio, image)

    # --- decoder ----------------------------------------------------------------------------------
    def forward_decoder(self, x, ids_restore_a, ids_restore_v, num_kept_a):
        """The joint stream's tokens (B, La_keep + Lv_keep, D), audio first -> predicted patches
        (B, La, p*p), (B, Lv, p*p*C): project to the decoder's width, put the mask tokens in and
        unshuffle each modality, add the decoder's positions and modality embeddings, decode."""
        La = ids_restore_a.shape[1]
        x = self.decoder_embed(x)  # (B, La_keep + Lv_keep, Dd)
        x_a = append_mask_tokens_and_unshuffle(x[:, :num_kept_a], self.mask_token, ids_restore_a)
        x_v = append_mask_tokens_and_unshuffle(x[:, num_kept_a:], self.mask_token, ids_restore_v)
        x_a = x_a + self.decoder_pos_embed_a + self.decoder_modality_a  # (B, La, Dd)
        x_v = x_v + self.decoder_pos_embed_v + self.decoder_modality_v  # (B, Lv, Dd)
        x = torch.cat([x_a, x_v], dim=1)  # (B, La + Lv, Dd)
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)
        return self.decoder_pred_a(x[:, :La]), self.decoder_pred_v(x[:, La:])

    # --- losses -----------------------------------------------------------------------------------
    @staticmethod
    def patch_mean_and_std(patches):  # (B, L, P) -> mean, sqrt(var + eps) of each patch, (B, L, 1)
        mean = patches.mean(dim=-1, keepdim=True)
        var = patches.var(dim=-1, keepdim=True)
        return mean, (var + NORM_PIX_EPS) ** 0.5

    def forward_loss(self, patches, pred, mask):
        """Sec. 3: the mean squared error of each patch, averaged over the masked patches. patches,
        pred (B, L, P); with norm_pix_loss the target is each patch normalised by its mean and std."""
        target = patches
        if self.config.norm_pix_loss:
            mean, std = self.patch_mean_and_std(patches)
            target = (patches - mean) / std
        loss = ((pred.float() - target) ** 2).mean(dim=-1)  # (B, L)
        return (loss * mask).sum() / mask.sum().clamp(min=1)

    def prediction_to_input_space(self, pred, patches):
        """Predicted patches (B, L, P) in the input's units: with norm_pix_loss they are mapped back
        with the input patch's own mean and std, as MAE's demo does."""
        if not self.config.norm_pix_loss:
            return pred
        mean, std = self.patch_mean_and_std(patches)
        return pred * std + mean

    def forward(
        self,
        audio,
        image,
        mask_ratio_a=MASK_RATIO,
        mask_ratio_v=MASK_RATIO,
        mae_weight=1.0,
        contrastive_weight=CONTRASTIVE_WEIGHT,
        mask_mode="unstructured",
        bidirectional=False,
    ):
        """One pretraining forward (Sec. 3). A weight of 0 skips its branch (AV-MAE:
        contrastive_weight=0; CAV: mae_weight=0) and reports 0 for that loss; the losses it returns
        are weighted: loss = loss_mae + loss_c."""
        if (mae_weight == 0) and (contrastive_weight == 0):
            raise ValueError("mae_weight and contrastive_weight are both 0: there is nothing to train")
        a, v, mask_a, mask_v, ids_restore_a, ids_restore_v = self.forward_encoder(
            audio, image, mask_ratio_a, mask_ratio_v, mask_mode
        )
        zero = torch.zeros((), device=audio.device)
        out = dict(mask_a=mask_a, mask_v=mask_v, loss_mae=zero, loss_mae_a=zero, loss_mae_v=zero)
        out.update(loss_c=zero, contrastive_accuracy=zero)
        if mae_weight != 0:  # stream 1: audio and visual tokens together through the joint blocks
            joint = self.encoder.joint(torch.cat([a, v], dim=1), "joint")
            pred_a, pred_v = self.forward_decoder(joint, ids_restore_a, ids_restore_v, a.shape[1])
            out.update(pred_a=pred_a, pred_v=pred_v)
            out["loss_mae_a"] = self.forward_loss(self.patchify_audio(audio), pred_a, mask_a)
            out["loss_mae_v"] = self.forward_loss(self.patchify_image(image), pred_v, mask_v)
            out["loss_mae"] = mae_weight * (out["loss_mae_a"] + out["loss_mae_v"])
        if contrastive_weight != 0:  # streams 2 and 3: each modality alone, with its own norms
            last_only = self.config.official_contrastive_streams
            audio_rep = self.encoder.joint(a, "audio", last_only).mean(dim=1)  # (B, D)
            visual_rep = self.encoder.joint(v, "visual", last_only).mean(dim=1)  # (B, D)
            loss_c, accuracy = contrastive_loss(audio_rep, visual_rep, bidirectional)
            out["loss_c"] = contrastive_weight * loss_c
            out["contrastive_accuracy"] = accuracy
        out["loss"] = out["loss_mae"] + out["loss_c"]
        return out


def pooled_representation(tokens):
    """Sec. 3 coordinated representation: tokens (B, L, D) mean-pooled, L2-normalised -> (B, D)."""
    return F.normalize(tokens.float().mean(dim=1), dim=-1)


def contrastive_loss(audio_rep, visual_rep, bidirectional=False):
    """Sec. 3 InfoNCE at temperature 0.05 between pooled audio representations (B, D) and pooled
    visual ones (B, D). Official default: one direction, a softmax over the audio clips for each
    visual clip. Returns (loss, accuracy of picking the paired clip)."""
    # float32 even under autocast, which would run the product in bf16: measured, the bf16 product
    # put the gradient off by 1.4-3.3%.
    with torch.autocast(audio_rep.device.type, enabled=False):
        audio_unit = F.normalize(audio_rep.float(), dim=-1)  # (B, D)
        visual_unit = F.normalize(visual_rep.float(), dim=-1)  # (B, D)
        similarity = audio_unit @ visual_unit.T / CONTRASTIVE_TEMPERATURE  # (B, B), rows audio
        target = torch.arange(len(similarity), device=similarity.device)
        directions = (similarity, similarity.T) if bidirectional else (similarity,)
        losses = [F.cross_entropy(s.T, target) for s in directions]  # a softmax down each column
        accuracies = [(s.argmax(dim=0) == target).float().mean() for s in directions]
    return sum(losses) / len(losses), sum(accuracies) / len(accuracies)


# --- Fine-tuning classifier -----------------------------------------------------------------------


class CAVMAEClassifier(nn.Module):
    """The encoder without the decoder; the tokens of the mode's stream mean-pooled -> LayerNorm ->
    Linear. Positions are trainable, as in the official fine-tuning model."""

    def __init__(self, config, num_classes, trainable_pos=True):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config, trainable_pos=trainable_pos)
        D = config.embed_dim
        self.head = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, num_classes))
        self.head.apply(init_weights)

    def forward(self, audio, image, mode="multimodal"):  # -> logits (B, num_classes)
        enc = self.encoder
        if mode not in FT_MODES:
            raise ValueError(f"mode must be one of {FT_MODES}, got {mode!r}")
        if mode == "multimodal":
            x = torch.cat([enc.audio_tokens(audio), enc.visual_tokens(image)], dim=1)
            return self.head(enc.joint(x, "joint").mean(dim=1))
        stream = "audio" if mode in ("audioonly", "missingaudioonly") else "visual"
        x = enc.audio_tokens(audio) if stream == "audio" else enc.visual_tokens(image)
        pooled = enc.joint(x, stream).mean(dim=1)
        if mode.startswith("missing"):  # a multimodal model given one modality: both norms averaged
            pooled = (enc.joint(x, "joint").mean(dim=1) + pooled) / 2
        return self.head(pooled)


# --- Speed: each transformer block compiled on its own --------------------------------------------


def apply_compile(model):
    """torch.compile each transformer Block in place (parameters and state-dict keys unchanged; the
    masking stays eager, so a seed draws the same masks). Measured on one H100, base model, bf16:
    the whole model took ~107 s to compile and crashed at batch >= 128; block by block 29-37 s and
    1,090 / 1,130 samples/s at batch 128 / 256 against 815-875 / 914 eager."""
    for module in model.modules():
        if isinstance(module, Block):
            module.compile()
    return model


# --- Loading published weights: ours, the official release's, ImageNet MAE ViT-B (the paper's init)

OFFICIAL_RENAMES = [  # official CAVMAE / CAVMAEFT key -> ours
    (r"^blocks_a\.", "encoder.audio_blocks."),
    (r"^blocks_v\.", "encoder.visual_blocks."),
    (r"^blocks_u\.", "encoder.joint_blocks."),
    (r"^patch_embed_([av])\.proj\.", r"encoder.patch_embed_\1."),
    (r"^(modality_[av]|pos_embed_[av])$", r"encoder.\1"),
    (r"^(norm|norm_a|norm_v)\.", r"encoder.\1."),
    (r"^mlp_head\.", "head."),
]


def imagenet_mae_to_ours(state, config):
    """The official adaptation of an ImageNet MAE ViT-B: its first modality_specific_depth blocks
    go to both modality branches, the next to the joint blocks (each norm copied to all three
    streams), the final norm to norm, norm_a and norm_v; the audio patch kernel is the RGB kernel
    summed over channels; positions lose the cls position; the audio prediction head takes the first
    p*p rows of the visual one. Keys without a place keep their names (reported as unexpected)."""
    specific = config.modality_specific_depth
    mapped = {}
    for key, value in state.items():
        block = re.match(r"^blocks\.(\d+)\.(.*)$", key)
        if block and int(block[1]) < specific:
            mapped[f"encoder.audio_blocks.{block[1]}.{block[2]}"] = value
            mapped[f"encoder.visual_blocks.{block[1]}.{block[2]}"] = value
        elif block and int(block[1]) < specific + config.joint_depth:
            prefix = f"encoder.joint_blocks.{int(block[1]) - specific}."
            for suffix in ("", "_a", "_v") if block[2].startswith("norm") else ("",):
                mapped[prefix + block[2].replace(".", suffix + ".", 1)] = value
        elif key.startswith("norm."):
            for name in ("norm", "norm_a", "norm_v"):
                mapped[f"encoder.{name}.{key[len('norm.') :]}"] = value
        elif key.startswith("patch_embed.proj."):
            parameter = key.removeprefix("patch_embed.proj.")
            mapped["encoder.patch_embed_v." + parameter] = value
            summed = value.sum(dim=1, keepdim=True) if parameter == "weight" else value  # RGB -> 1
            mapped["encoder.patch_embed_a." + parameter] = summed
        elif key in ("pos_embed", "decoder_pos_embed"):
            prefix = "encoder." if key == "pos_embed" else ""
            mapped[prefix + key + "_v"] = value[:, 1:]  # without the cls position
        elif key.startswith("decoder_pred."):
            parameter = key.removeprefix("decoder_pred.")
            mapped["decoder_pred_v." + parameter] = value
            mapped["decoder_pred_a." + parameter] = value[: config.patch_size**2]
        else:
            mapped[key] = value  # mask_token and the decoder keep their names
    return mapped


def cut_audio_positions(state, model, checkpoint_mel_bins, where=""):
    """A model for shorter clips than its checkpoint's (e.g. ESC-50's 5 s): each audio position
    table (1, bands * T/p, D), frequency-major, keeps its first T'/p time columns, so every token
    keeps the position it was trained with. The checkpoint's mel bins are its model_args' (ours),
    else the paper's 128. Other mel bins (their bands would be cut as time steps) or a longer model
    (its positions were never trained) are errors; `where` names the file."""
    own = model.state_dict()
    bands, steps = model.config.audio_grid
    checkpoint_bands = checkpoint_mel_bins // model.config.patch_size
    for key in ("encoder.pos_embed_a", "decoder_pos_embed_a"):
        if (key not in state) or (key not in own) or (state[key].shape == own[key].shape):
            continue
        checkpoint_steps = state[key].shape[1] // checkpoint_bands
        if (checkpoint_bands != bands) or (checkpoint_steps < steps):
            raise ValueError(
                f"{where}{key}: the checkpoint has {checkpoint_bands} x {checkpoint_steps} audio "
                f"positions (bands x time steps), the model {bands} x {steps}: only time can be cut"
            )
        table = state[key].reshape(1, bands, checkpoint_steps, -1)  # (1, F/p, T/p, D)
        state[key] = table[:, :, :steps].reshape(1, bands * steps, -1)  # (1, F/p * T'/p, D)
    return state


def read_checkpoint(path):
    """The dict a checkpoint file holds; a file that is missing, unreadable or holds something else
    is a ValueError naming it."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a missing, empty, truncated or foreign file
        raise ValueError(f"cannot read checkpoint {path}: {error}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {path}: a {type(ckpt).__name__} is not a state dict")
    return ckpt


def load_pretrained(model, source):
    """Load `source` (a checkpoint path, a state dict, or our checkpoint dict: weights under
    'model', settings under 'model_args') into a CAVMAE or CAVMAEClassifier: ours, the official
    release's (nn.DataParallel's `module.` prefix stripped, the unused norms its blocks carry
    outside the joint blocks left out) or an ImageNet MAE ViT-B. A pretraining checkpoint loads
    into the classifier (its decoder unexpected, the head new); shorter clips get cut audio
    positions. Returns torch's (missing_keys, unexpected_keys); a shape that does not fit raises.
    Reads with weights_only=False (our checkpoints hold settings): load only files you trust."""
    where = ""  # the file, in the errors about its content
    if isinstance(source, (str, os.PathLike)):
        where = f"checkpoint {source}: "
        source = read_checkpoint(source)
    state = source["model"] if isinstance(source.get("model"), dict) else source
    mel_bins = source.get("model_args", {}).get("num_mel_bins", CAVMAEConfig.num_mel_bins)
    state = {re.sub(r"^(module\.|_orig_mod\.)+", "", key): value for key, value in state.items()}
    if any(key.startswith("blocks_u.") for key in state):  # the official release
        for pattern, replacement in OFFICIAL_RENAMES:
            state = {re.sub(pattern, replacement, key): value for key, value in state.items()}
        unused = r"^(encoder\.audio_|encoder\.visual_|decoder_)blocks\.\d+\.norm[12]_[av]\."
        state = {key: value for key, value in state.items() if not re.match(unused, key)}
    elif "patch_embed.proj.weight" in state:
        state = imagenet_mae_to_ours(state, model.config)
    elif not any(key.startswith("encoder.") for key in state):
        raise ValueError(f"{where}not a CAV-MAE or ImageNet MAE state dict (keys {list(state)[:3]} ...)")
    return model.load_state_dict(cut_audio_positions(state, model, mel_bins, where), strict=False)
