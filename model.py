"""CAV-MAE: Contrastive Audio-Visual Masked Autoencoder (Gong et al., ICLR 2023), in one file.

Read top to bottom: configuration, the transformer block, the shared encoder (patch embeddings, fixed
sin-cos positions, modality embeddings, modality-specific and joint blocks), the pretraining model (masking,
encoder streams, decoder, losses), the fine-tuning classifier, and the checkpoint loader that maps the
official release and the ImageNet MAE weights onto these modules.
Numerically identical to the official release (../shared/golden checks it); attention runs through
F.scaled_dot_product_attention, so GPUs use flash / memory-efficient kernels.
"""

import math
import os
import random
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

CONTRASTIVE_TEMPERATURE = 0.05  # Sec. 3: tau in the InfoNCE loss
NORM_PIX_EPS = 1e-6  # norm_pix_loss: each target patch is normalised by sqrt(var + eps)
FT_MODES = ("multimodal", "audioonly", "videoonly", "missingaudioonly", "missingvideoonly")  # official names
MASK_MODES = ("unstructured", "time", "freq", "tf")


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
    # Official pretraining quirk, kept for exactness: with joint_depth > 1 the audio-only and visual-only streams
    # of the contrastive loss pass through the last joint block only (no effect at the paper's joint_depth=1).
    official_contrastive_streams: bool = True

    def __post_init__(self):
        p = self.patch_size
        for name in ("img_size", "audio_length", "num_mel_bins"):
            if getattr(self, name) % p:
                raise ValueError(
                    f"CAVMAEConfig.{name}={getattr(self, name)} is not a multiple of patch_size={p}"
                )
        for width, heads in (
            (self.embed_dim, self.num_heads),
            (self.decoder_embed_dim, self.decoder_num_heads),
        ):
            if width % heads or width % 4:
                raise ValueError(
                    f"width {width} must be divisible by its {heads} heads and by 4 (sin-cos table)"
                )

    @classmethod
    def from_preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def audio_grid(self):  # (frequency bands, time steps): the fbank is laid out frequency-major
        return self.num_mel_bins // self.patch_size, self.audio_length // self.patch_size

    @property
    def visual_grid(self):
        return self.img_size // self.patch_size, self.img_size // self.patch_size


PRESETS = {
    "base": {},  # the paper's model, 189,961,984 trainable parameters
    "tiny": dict(
        img_size=32,
        audio_length=64,
        embed_dim=32,
        num_heads=2,
        modality_specific_depth=1,
        joint_depth=1,
        decoder_embed_dim=16,
        decoder_depth=1,
        decoder_num_heads=2,
    ),  # unit tests
    "small": dict(
        img_size=64,
        audio_length=256,
        embed_dim=192,
        num_heads=3,
        modality_specific_depth=3,
        joint_depth=1,
        decoder_embed_dim=128,
        decoder_depth=2,
        decoder_num_heads=4,
        norm_pix_loss=True,
    ),  # the CPU demo on synthetic data
}


def sincos_pos_embed(dim, grid_h, grid_w):
    """Fixed 2-D sin-cos table (grid_h * grid_w, dim), row-major over the grid, as the official code builds it:
    the first dim/2 channels encode the column (x / time), the last dim/2 the row (y / frequency); each half is
    [sin(pos * w_i), cos(pos * w_i)] with w_i = 1 / 10000^(i / (dim/4)). Computed in float64."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )

    def encode(pos):  # (N,) -> (N, dim/2)
        angle = pos.reshape(-1, 1) * omega
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


# ----------------------------------------------------------------------------------------------------------
# Transformer block


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = (
            self.qkv(x).view(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        )  # (B, H, L, Dh)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(Dh)) v, (B, H, L, Dh)
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class Block(nn.Module):
    """Pre-norm ViT block. A joint block (Sec. 3) has three LayerNorm pairs, one per stream: 'joint' for the
    concatenated audio-visual tokens, 'audio' and 'visual' for one modality alone; the weights are shared."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, joint=False):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        if joint:
            self.norm1_a, self.norm2_a = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.norm1_v, self.norm2_v = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x, stream="joint"):  # (B, L, D) -> (B, L, D)
        suffix = {"joint": "", "audio": "_a", "visual": "_v"}[stream]
        x = x + self.attn(getattr(self, "norm1" + suffix)(x))
        return x + self.mlp(getattr(self, "norm2" + suffix)(x))


def init_weights(module):
    """Official init: xavier-uniform linear layers with zero bias, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def take_tokens(x, ids):  # x (B or 1, L, D), ids (B, K) -> (B, K, D): each sample's tokens at ids
    return torch.gather(x.expand(ids.shape[0], -1, -1), 1, ids[:, :, None].expand(-1, -1, x.shape[-1]))


def num_params(module, trainable_only=True):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# ----------------------------------------------------------------------------------------------------------
# Encoder, shared by the pretraining model and the classifier


class Encoder(nn.Module):
    """Patch embeddings + positions + modality embeddings, modality-specific blocks, joint blocks, final norms."""

    def __init__(self, config, trainable_pos=False):
        super().__init__()
        c, D = config, config.embed_dim
        self.config = c
        self.patch_embed_a = nn.Conv2d(1, D, c.patch_size, stride=c.patch_size)
        self.patch_embed_v = nn.Conv2d(c.in_chans, D, c.patch_size, stride=c.patch_size)
        self.modality_a = nn.Parameter(torch.zeros(1, 1, D))
        self.modality_v = nn.Parameter(torch.zeros(1, 1, D))
        # fixed 2-D sin-cos positions (Sec. 3); the official fine-tuning model trains them
        self.pos_embed_a = nn.Parameter(sincos_pos_embed(D, *c.audio_grid)[None], requires_grad=trainable_pos)
        self.pos_embed_v = nn.Parameter(
            sincos_pos_embed(D, *c.visual_grid)[None], requires_grad=trainable_pos
        )
        block = lambda joint=False: Block(D, c.num_heads, c.mlp_ratio, joint)
        self.audio_blocks = nn.ModuleList(block() for _ in range(c.modality_specific_depth))
        self.visual_blocks = nn.ModuleList(block() for _ in range(c.modality_specific_depth))
        self.joint_blocks = nn.ModuleList(block(joint=True) for _ in range(c.joint_depth))
        self.norm, self.norm_a, self.norm_v = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.reset_parameters()

    def reset_parameters(self):
        for conv in (
            self.patch_embed_a,
            self.patch_embed_v,
        ):  # the patch projection initialised as a linear layer
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
            nn.init.zeros_(conv.bias)
        nn.init.normal_(self.modality_a, std=0.02)
        nn.init.normal_(self.modality_v, std=0.02)
        for blocks in (self.audio_blocks, self.visual_blocks, self.joint_blocks):
            blocks.apply(init_weights)
        for norm in (self.norm, self.norm_a, self.norm_v):
            init_weights(norm)

    def embed_audio(
        self, audio, ids_keep=None
    ):  # (B, T, F) fbank -> (B, La, D), La = F/p * T/p, frequency-major
        x = self.patch_embed_a(audio.transpose(1, 2).unsqueeze(1))  # (B, D, F/p, T/p)
        return self.add_positions(x.flatten(2).transpose(1, 2), self.pos_embed_a, self.modality_a, ids_keep)

    def embed_visual(self, image, ids_keep=None):  # (B, C, H, W) -> (B, Lv, D)
        x = self.patch_embed_v(image)  # (B, D, H/p, W/p)
        return self.add_positions(x.flatten(2).transpose(1, 2), self.pos_embed_v, self.modality_v, ids_keep)

    @staticmethod
    def add_positions(x, pos, modality, ids_keep=None):
        """Patch embeddings (B, L, D) + positions + modality embedding; with ids_keep (B, L_keep) the kept tokens
        only. The additions are elementwise, so masking before them gives the same values as masking after,
        and the masked tokens are never written out in float32 (fewer copies; issue 10's profile)."""
        if ids_keep is not None:
            x, pos = take_tokens(x, ids_keep), take_tokens(pos, ids_keep)  # (B, L_keep, D)
        return x + pos + modality

    @staticmethod
    def run(blocks, x, stream="joint"):
        for blk in blocks:
            x = blk(x, stream)
        return x

    def joint(self, x, stream, last_block_only=False):
        """Sec. 3 multi-stream forward: the shared joint blocks with the stream's norms, then its final norm."""
        final = {"joint": self.norm, "audio": self.norm_a, "visual": self.norm_v}[stream]
        return final(self.run(self.joint_blocks[-1:] if last_block_only else self.joint_blocks, x, stream))

    def audio_tokens(self, audio):  # (B, T, F) -> (B, La, D) after the modality-specific audio blocks
        return self.run(self.audio_blocks, self.embed_audio(audio))

    def visual_tokens(self, image):  # (B, C, H, W) -> (B, Lv, D) after the modality-specific visual blocks
        return self.run(self.visual_blocks, self.embed_visual(image))

    def embed(self, audio, image):
        """Coordinated per-modality tokens without masking, for retrieval (the official forward_feat):
        (B, La, D), (B, Lv, D). Either input may be None, and then so is its output."""
        a = None if audio is None else self.joint(self.audio_tokens(audio), "audio")
        v = None if image is None else self.joint(self.visual_tokens(image), "visual")
        return a, v


# ----------------------------------------------------------------------------------------------------------
# Pretraining model


class CAVMAE(nn.Module):
    def __init__(self, config):
        super().__init__()
        c, Dd = config, config.decoder_embed_dim
        self.config = c
        self.encoder = Encoder(c, trainable_pos=c.tr_pos)
        self.decoder_embed = nn.Linear(c.embed_dim, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_modality_a = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_modality_v = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed_a = nn.Parameter(
            sincos_pos_embed(Dd, *c.audio_grid)[None], requires_grad=c.tr_pos
        )
        self.decoder_pos_embed_v = nn.Parameter(
            sincos_pos_embed(Dd, *c.visual_grid)[None], requires_grad=c.tr_pos
        )
        self.decoder_blocks = nn.ModuleList(
            Block(Dd, c.decoder_num_heads, c.mlp_ratio) for _ in range(c.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(Dd)
        self.decoder_pred_a = nn.Linear(Dd, c.patch_size**2)  # one spectrogram patch
        self.decoder_pred_v = nn.Linear(Dd, c.patch_size**2 * c.in_chans)  # one RGB patch
        for p in (self.mask_token, self.decoder_modality_a, self.decoder_modality_v):
            nn.init.normal_(p, std=0.02)
        for m in (
            self.decoder_embed,
            self.decoder_blocks,
            self.decoder_norm,
            self.decoder_pred_a,
            self.decoder_pred_v,
        ):
            m.apply(init_weights)

    # --- patches (the reconstruction targets) ---------------------------------------------------------------
    def patchify_audio(self, audio):  # (B, T, F) -> (B, La, p*p), patches frequency-major like the tokens
        p = self.config.patch_size
        x = audio.transpose(1, 2)  # (B, F, T)
        B, Fq, T = x.shape
        x = x.reshape(B, Fq // p, p, T // p, p).permute(0, 1, 3, 2, 4)  # (B, F/p, T/p, p, p)
        return x.reshape(B, (Fq // p) * (T // p), p * p)

    def unpatchify_audio(self, patches):  # (B, La, p*p) -> (B, T, F)
        p, (h, w) = self.config.patch_size, self.config.audio_grid
        x = patches.reshape(-1, h, w, p, p).permute(0, 1, 3, 2, 4)  # (B, F/p, p, T/p, p)
        return x.reshape(-1, h * p, w * p).transpose(1, 2)

    def patchify_image(self, image):  # (B, C, H, W) -> (B, Lv, p*p*C), channel last within a patch
        p = self.config.patch_size
        B, C, H, W = image.shape
        x = image.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, H/p, W/p, p, p, C)
        return x.reshape(B, (H // p) * (W // p), p * p * C)

    def unpatchify_image(self, patches):  # (B, Lv, p*p*C) -> (B, C, H, W)
        c = self.config
        p, (h, w) = c.patch_size, c.visual_grid
        x = patches.reshape(-1, h, w, p, p, c.in_chans).permute(0, 5, 1, 3, 2, 4)  # (B, C, H/p, p, W/p, p)
        return x.reshape(-1, c.in_chans, h * p, w * p)

    # --- masking (Sec. 3: MAE's per-sample random masking) ------------------------------------------------
    @staticmethod
    def masking_order(noise, mask_ratio):
        """Keep the int(L * (1 - mask_ratio)) tokens with the lowest noise (B, L). Returns ids_keep (B, L_keep)
        in ascending noise, mask (B, L) with 1 = masked, ids_restore (B, L): each token's place in that order."""
        keep = int(noise.shape[1] * (1 - mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the first `keep` stay
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        return ids_shuffle[:, :keep], (ids_restore >= keep).float(), ids_restore

    def structured_noise(self, B, mask_ratio, mode, device):
        """The paper's audio masking ablation: noise above 1 for whole time columns ('time'), frequency rows
        ('freq') or both at 0.7x the ratio each ('tf'). Columns/rows are drawn with Python's `random` after the
        torch noise, as in the official code, so seeding both `random` and torch reproduces its masks. They are
        marked on the CPU and sent in one non-blocking copy: indexing a GPU tensor with per-sample Python lists
        would make the host wait for the GPU twice per sample (issue 10, item 4)."""
        f, t = self.config.audio_grid
        noise = torch.rand(B, f, t, device=device)  # (B, F/p, T/p), frequency-major like the tokens
        chosen = torch.zeros(B, f, t, dtype=torch.bool, pin_memory=torch.device(device).type == "cuda")
        scale = 0.7 if mode == "tf" else 1.0
        if mode in ("time", "tf"):
            for i in range(B):
                chosen[i, :, random.sample(range(t), int(t * mask_ratio * scale))] = True
        if mode in ("freq", "tf"):
            for i in range(B):
                chosen[i, random.sample(range(f), int(f * mask_ratio * scale)), :] = True
        noise = noise.masked_fill(chosen.to(device, non_blocking=True), 1.1)  # above any uniform draw
        return noise.reshape(B, f * t)

    # --- encoder streams ------------------------------------------------------------------------------------
    def forward_encoder(
        self,
        audio,
        image,
        mask_ratio_a,
        mask_ratio_v,
        mask_mode="unstructured",
        joint_stream=True,
        modality_streams=True,
    ):
        """Mask (audio noise drawn first, then visual), embed the kept patches, run the modality-specific blocks,
        then the joint blocks in the requested streams. Returns a dict with x (B, La_keep + Lv_keep, D) after
        `norm`, ca / cv (the audio / visual coordinated tokens after norm_a / norm_v), masks and ids_restore."""
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
        enc, B, device = self.encoder, audio.shape[0], audio.device
        La, Lv = math.prod(self.config.audio_grid), math.prod(self.config.visual_grid)
        noise_a = (
            torch.rand(B, La, device=device)
            if mask_mode == "unstructured"
            else self.structured_noise(B, mask_ratio_a, mask_mode, device)
        )  # (B, La), uniform in [0, 1)
        keep_a, mask_a, restore_a = self.masking_order(noise_a, mask_ratio_a)
        keep_v, mask_v, restore_v = self.masking_order(torch.rand(B, Lv, device=device), mask_ratio_v)
        a = enc.run(enc.audio_blocks, enc.embed_audio(audio, keep_a))  # (B, La_keep, D)
        v = enc.run(enc.visual_blocks, enc.embed_visual(image, keep_v))  # (B, Lv_keep, D)
        out = dict(mask_a=mask_a, mask_v=mask_v, restore_a=restore_a, restore_v=restore_v, keep_a=a.shape[1])
        if joint_stream:  # stream 1: concatenated tokens -> decoder
            out["x"] = enc.joint(torch.cat([a, v], dim=1), "joint")
        if modality_streams:  # streams 2 and 3: each modality alone -> contrastive loss
            last_only = self.config.official_contrastive_streams
            out["ca"], out["cv"] = enc.joint(a, "audio", last_only), enc.joint(v, "visual", last_only)
        return out

    def embed(self, audio, image):  # coordinated tokens without masking, see Encoder.embed
        return self.encoder.embed(audio, image)

    # --- decoder --------------------------------------------------------------------------------------------
    def decoder_input(self, x, restore_a, restore_v, keep_a):
        """Visible tokens (B, keep_a + keep_v, D) -> decoder tokens (B, La + Lv, Dd): projected, a mask token at
        each masked place, plus the decoder's positions and modality embeddings. One gather from [visible tokens,
        mask token] writes the sequence once, where per-modality concatenations, gathers and a final
        concatenation copied it four times (same values; issue 10's profile: copies)."""
        x = self.decoder_embed(x)  # (B, keep_a + keep_v, Dd)
        B, keep, Dd = x.shape
        (La, Lv), keep_v = (restore_a.shape[1], restore_v.shape[1]), keep - keep_a
        source = torch.cat(
            [
                torch.where(restore_a < keep_a, restore_a, keep),  # row of x, or `keep`: the mask token
                torch.where(restore_v < keep_v, restore_v + keep_a, keep),
            ],
            dim=1,
        )  # (B, La + Lv)
        x = torch.cat([x, self.mask_token.expand(B, 1, Dd)], dim=1)  # (B, keep + 1, Dd)
        pos = torch.cat([self.decoder_pos_embed_a, self.decoder_pos_embed_v], dim=1)  # (1, La + Lv, Dd)
        modality = torch.cat(
            [self.decoder_modality_a.expand(-1, La, -1), self.decoder_modality_v.expand(-1, Lv, -1)], dim=1
        )  # (1, La + Lv, Dd)
        return take_tokens(x, source) + pos + modality

    def forward_decoder(self, x, restore_a, restore_v, keep_a):
        """(B, keep_a + keep_v, D) -> predicted patches (B, La, p*p), (B, Lv, p*p*C)."""
        x = self.decoder_input(x, restore_a, restore_v, keep_a)  # (B, La + Lv, Dd)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        La = restore_a.shape[1]
        return self.decoder_pred_a(x[:, :La]), self.decoder_pred_v(x[:, La:])

    # --- losses ---------------------------------------------------------------------------------------------
    def mae_loss(self, target, pred, mask):
        """Sec. 3: mean squared error per patch, averaged over the masked patches. target/pred: (B, L, P)."""
        if self.config.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
        loss = ((pred.float() - target) ** 2).mean(dim=-1)  # (B, L)
        return (loss * mask).sum() / mask.sum().clamp(min=1)

    def reconstruction_loss(self, audio, image, pred_a, pred_v, mask_a, mask_v):
        """The MAE loss of each modality against its patchified input: (loss_a, loss_v)."""
        return (
            self.mae_loss(self.patchify_audio(audio), pred_a, mask_a),
            self.mae_loss(self.patchify_image(image), pred_v, mask_v),
        )

    def forward(
        self,
        audio,
        image,
        mask_ratio_a=0.75,
        mask_ratio_v=0.75,
        mae_weight=1.0,
        contrastive_weight=0.01,
        mask_mode="unstructured",
        bidirectional=False,
        gather=None,
    ):
        """One pretraining step's forward. A weight of 0 skips its branch entirely (AV-MAE: contrastive_weight=0;
        CAV: mae_weight=0) and reports 0 for that loss."""
        if mae_weight == 0 and contrastive_weight == 0:
            raise ValueError("mae_weight and contrastive_weight are both 0: there is nothing to train")
        enc = self.forward_encoder(
            audio,
            image,
            mask_ratio_a,
            mask_ratio_v,
            mask_mode,
            joint_stream=mae_weight != 0,
            modality_streams=contrastive_weight != 0,
        )
        zero = torch.zeros((), device=audio.device)
        out = dict(
            mask_a=enc["mask_a"],
            mask_v=enc["mask_v"],
            loss_mae=zero,
            loss_mae_a=zero,
            loss_mae_v=zero,
            loss_c=zero,
            c_acc=zero,
        )
        if mae_weight != 0:
            pred_a, pred_v = self.forward_decoder(enc["x"], enc["restore_a"], enc["restore_v"], enc["keep_a"])
            out["loss_mae_a"], out["loss_mae_v"] = self.reconstruction_loss(
                audio, image, pred_a, pred_v, enc["mask_a"], enc["mask_v"]
            )
            out.update(
                pred_a=pred_a, pred_v=pred_v, loss_mae=mae_weight * (out["loss_mae_a"] + out["loss_mae_v"])
            )
        if contrastive_weight != 0:
            nce, out["c_acc"] = contrastive_loss(
                enc["ca"].mean(dim=1), enc["cv"].mean(dim=1), bidirectional, gather
            )
            out["loss_c"] = contrastive_weight * nce
        out["loss"] = out["loss_mae"] + out["loss_c"]
        return out

    def flops_per_sample(self, mask_ratio_a=0.75, mask_ratio_v=0.75):
        """Analytic forward FLOPs (2 per multiply-add) of one pretraining sample with both losses on."""
        c = self.config
        D, Dd, P = c.embed_dim, c.decoder_embed_dim, c.patch_size**2
        La, Lv = math.prod(c.audio_grid), math.prod(c.visual_grid)
        ka, kv = int(La * (1 - mask_ratio_a)), int(Lv * (1 - mask_ratio_v))
        block = lambda L, width: 2 * L * width * width * (4 + 2 * c.mlp_ratio) + 4 * L * L * width
        flops = 2 * (La * P + Lv * P * c.in_chans) * D  # patch embeddings
        flops += c.modality_specific_depth * (block(ka, D) + block(kv, D))
        # three streams; the single-modality ones pass the last joint block only under the official quirk
        modality_joint_depth = min(c.joint_depth, 1) if c.official_contrastive_streams else c.joint_depth
        flops += c.joint_depth * block(ka + kv, D) + modality_joint_depth * (block(ka, D) + block(kv, D))
        flops += 2 * (ka + kv) * D * Dd + c.decoder_depth * block(La + Lv, Dd)
        flops += 2 * Dd * (La * P + Lv * P * c.in_chans)  # prediction heads
        return flops


def pooled_representation(tokens):
    """Sec. 3.2 coordinated representation: tokens (B, L, D) mean-pooled and L2-normalised -> (B, D)."""
    return F.normalize(tokens.float().mean(dim=1), dim=-1)


def contrastive_loss(audio_rep, visual_rep, bidirectional=False, gather=None):
    """Sec. 3 InfoNCE on pooled representations (B, D). Official default: one direction, softmax over the
    audio axis for each visual column. `gather` (B, D) -> (N, D) adds other ranks' clips as negatives.
    Returns (loss, accuracy of picking the paired clip). Computed in float32 even under autocast, which would
    otherwise run the similarity product in bf16/fp16 whatever its inputs' dtype (a 1-3% gradient error in bf16)."""
    with torch.autocast(audio_rep.device.type, enabled=False):
        a, v = F.normalize(audio_rep.float(), dim=-1), F.normalize(visual_rep.float(), dim=-1)
        if gather is not None:
            a, v = gather(a), gather(v)
        sim = a @ v.T / CONTRASTIVE_TEMPERATURE  # (N, N), rows = audio, columns = visual
        loss, acc = _infonce_one_direction(sim)
        if bidirectional:
            loss_t, acc_t = _infonce_one_direction(sim.T)
            loss, acc = (loss + loss_t) / 2, (acc + acc_t) / 2
    return loss, acc


def _infonce_one_direction(sim):  # (N, N) -> (loss, accuracy) of a softmax over dim 0 for each column
    target = torch.arange(sim.shape[0], device=sim.device)
    return -torch.diagonal(F.log_softmax(sim, dim=0)).mean(), (sim.argmax(dim=0) == target).float().mean()


# ----------------------------------------------------------------------------------------------------------
# Fine-tuning classifier


class CAVMAEClassifier(nn.Module):
    """The encoder without the decoder; tokens of the mode's stream mean-pooled -> LayerNorm -> Linear.
    Positions are trainable, as in the official fine-tuning model."""

    def __init__(self, config, num_classes, trainable_pos=True):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config, trainable_pos=trainable_pos)
        self.head = nn.Sequential(nn.LayerNorm(config.embed_dim), nn.Linear(config.embed_dim, num_classes))
        self.head.apply(init_weights)

    def features(self, audio, image, mode="multimodal"):  # -> pooled representation (B, D)
        enc = self.encoder
        if mode == "multimodal":
            x = torch.cat([enc.audio_tokens(audio), enc.visual_tokens(image)], dim=1)
            return enc.joint(x, "joint").mean(dim=1)
        if mode in ("audioonly", "missingaudioonly"):
            x, stream = enc.audio_tokens(audio), "audio"
        elif mode in ("videoonly", "missingvideoonly"):
            x, stream = enc.visual_tokens(image), "visual"
        else:
            raise ValueError(f"mode must be one of {FT_MODES}, got {mode!r}")
        pooled = enc.joint(x, stream).mean(dim=1)
        if mode.startswith(
            "missing"
        ):  # a multimodal model given one modality: average joint- and own-norm passes
            pooled = (enc.joint(x, "joint").mean(dim=1) + pooled) / 2
        return pooled

    def forward(self, audio, image, mode="multimodal"):  # -> logits (B, num_classes)
        return self.head(self.features(audio, image, mode))

    def embed(self, audio, image):  # coordinated tokens without masking, see Encoder.embed
        return self.encoder.embed(audio, image)


# ----------------------------------------------------------------------------------------------------------
# Speed: regional compilation (issue 10)

COMPILED_REGIONS = {Encoder: ("add_positions",), CAVMAE: ("decoder_input", "reconstruction_loss")}


def apply_compile(model, regions=True, **options):
    """torch.compile each transformer Block on its own, in place, and with `regions` the RNG-free code around the
    blocks (COMPILED_REGIONS). `options` go to torch.compile. For CAVMAE and CAVMAEClassifier; returns the model.
    The masking noise (torch.rand, Python's random) stays eager, so a seed draws the same masks as in eager mode and
    the losses agree within float tolerance; parameters and state-dict keys are unchanged (checkpoints as eager)."""
    # What it buys (one H100, base model, bf16, measured before this change): the whole model compiled takes
    # ~107 s and crashes at batch >= 128 (an inductor NameError); block by block, each layer reuses the graph of its
    # shape: 29-37 s, 1090 / 1130 samples/s at batch 128 / 256 against 815-875 / 914 eager (LayerNorm, residual
    # adds, GELU and weight casts fuse). The regions fuse ~110 small eager ops per step (~5 GB of traffic at batch
    # 256): expected 2-3%, more at batch 48; static shapes (dynamic=False: six block shapes, each compiled once) give
    # LayerNorm and reductions their static tuning: expected a few %. Both to be measured (bench.py --compile_scope
    # blocks, --dynamic). The patch-embedding convolutions stay eager: their compiled gradients upset DDP's buckets.
    options = {"dynamic": False, **options}
    for module in model.modules():
        if isinstance(module, Block):
            module.compile(**options)
        for cls, names in COMPILED_REGIONS.items():
            if regions and isinstance(module, cls):
                for name in names:
                    setattr(module, name, torch.compile(getattr(module, name), **options))
    return model


# ----------------------------------------------------------------------------------------------------------
# Loading checkpoints: ours, the official release, and the ImageNet MAE ViT-B initialisation


@dataclass
class LoadReport:
    source_format: str  # "ours" | "official" | "imagenet-mae"
    loaded: list = field(default_factory=list)  # model keys that received a tensor
    missing: list = field(default_factory=list)  # model keys left as initialised
    ignored: list = field(default_factory=list)  # checkpoint keys with no place in the model
    adapted: list = field(
        default_factory=list
    )  # what was changed to fit, e.g. audio positions cut to a shorter clip

    def __str__(self):
        is_unused_norm = lambda k: re.search(r"blocks\.\d+\.norm[12]_[av]\.", k) is not None
        unused = [k for k in self.ignored if is_unused_norm(k)]
        other = [k for k in self.ignored if not is_unused_norm(k)]
        lines = [f"{self.source_format} checkpoint: loaded {len(self.loaded)} tensors"]
        if unused:
            lines.append(
                f"ignored {len(unused)} per-modality norms of non-joint blocks (the official model never uses them)"
            )
        if other:
            lines.append(f"ignored {len(other)}: {_summary(other)}")
        lines.append(
            f"missing {len(self.missing)} (left as initialised): {_summary(self.missing)}"
            if self.missing
            else "missing: none"
        )
        return "; ".join(lines + self.adapted)


def _summary(keys, n=6):
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


OFFICIAL_RENAMES = [  # official CAVMAE / CAVMAEFT key -> ours
    (r"^blocks_a\.", "encoder.audio_blocks."),
    (r"^blocks_v\.", "encoder.visual_blocks."),
    (r"^blocks_u\.", "encoder.joint_blocks."),
    (r"^patch_embed_([av])\.proj\.", r"encoder.patch_embed_\1."),
    (r"^(modality_[av]|pos_embed_[av])$", r"encoder.\1"),
    (r"^(norm|norm_a|norm_v)\.", r"encoder.\1."),
    (r"^mlp_head\.", "head."),
]


def _official_to_ours(state):
    out = {}
    for key, value in state.items():
        for pattern, replacement in OFFICIAL_RENAMES:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


def _mae_to_ours(state, config):
    """The official adaptation of an ImageNet MAE ViT-B: layers < modality_specific_depth -> both modality
    branches, the next joint_depth layers -> joint blocks with all three norm sets copied from their norms, the
    final norm -> norm, norm_a and norm_v, audio patch kernel = RGB kernel summed over channels, encoder and
    decoder positions from the MAE grid without the cls position, the decoder by name, the visual prediction
    head as is and the audio one from the first p*p rows. Returns (mapped, ignored keys)."""
    S, J = config.modality_specific_depth, config.joint_depth
    out, ignored = {}, []
    for key, value in state.items():
        m = re.match(r"^blocks\.(\d+)\.(.*)$", key)
        if m and int(m[1]) < S:
            out[f"encoder.audio_blocks.{m[1]}.{m[2]}"] = value
            out[f"encoder.visual_blocks.{m[1]}.{m[2]}"] = value
        elif m and int(m[1]) < S + J:
            prefix = f"encoder.joint_blocks.{int(m[1]) - S}."
            out[prefix + m[2]] = value
            if re.match(r"norm[12]\.", m[2]):
                for suffix in ("_a", "_v"):
                    out[prefix + m[2].replace(".", suffix + ".", 1)] = value
        elif key.startswith("norm."):
            for name in ("norm", "norm_a", "norm_v"):
                out[f"encoder.{name}.{key[5:]}"] = value
        elif key == "patch_embed.proj.weight":
            out["encoder.patch_embed_v.weight"] = value
            out["encoder.patch_embed_a.weight"] = value.sum(dim=1, keepdim=True)
        elif key == "patch_embed.proj.bias":
            out["encoder.patch_embed_v.bias"] = out["encoder.patch_embed_a.bias"] = value
        elif key in ("pos_embed", "decoder_pos_embed"):
            out[{"pos_embed": "encoder.pos_embed_v"}.get(key, "decoder_pos_embed_v")] = value[:, 1:]
        elif key == "decoder_pred.weight" or key == "decoder_pred.bias":
            out["decoder_pred_v." + key.split(".")[1]] = value
            out["decoder_pred_a." + key.split(".")[1]] = value[: config.patch_size**2]
        elif key == "mask_token" or key.startswith(("decoder_embed.", "decoder_blocks.", "decoder_norm.")):
            out[key] = value
        else:
            ignored.append(key)
    return out, ignored


def infer_architecture(state):
    """The CAVMAEConfig fields a state dict's shapes determine, ours or official (all but the head counts
    and mlp_ratio): what eval.py needs to rebuild a model around an official checkpoint."""

    def count(prefix):  # distinct block indices under prefix
        return len({k[len(prefix) + 1 :].split(".")[0] for k in state if k.startswith(prefix + ".")})

    arch = {}
    pos_a = state.get("pos_embed_a", state.get("encoder.pos_embed_a"))
    pos_v = state.get("pos_embed_v", state.get("encoder.pos_embed_v"))
    patch = state.get("patch_embed_a.proj.weight", state.get("encoder.patch_embed_a.weight"))
    if patch is not None and pos_a is not None and pos_v is not None:
        p, bands = (
            patch.shape[-1],
            CAVMAEConfig.num_mel_bins // patch.shape[-1],
        )  # audio grid: bands x time steps
        arch.update(
            patch_size=p,
            embed_dim=pos_a.shape[-1],
            audio_length=pos_a.shape[1] // bands * p,
            img_size=math.isqrt(pos_v.shape[1]) * p,
        )
    for official, ours, name in (
        ("blocks_a", "encoder.audio_blocks", "modality_specific_depth"),
        ("blocks_u", "encoder.joint_blocks", "joint_depth"),
        ("decoder_blocks", "decoder_blocks", "decoder_depth"),
    ):
        if count(official) or count(ours):
            arch[name] = count(official) or count(ours)
    if "decoder_embed.weight" in state:
        arch["decoder_embed_dim"] = state["decoder_embed.weight"].shape[0]
    return arch


AUDIO_POSITION_KEYS = ("encoder.pos_embed_a", "decoder_pos_embed_a")


def _cut_audio_positions(mapped, own, bands):
    """Clips shorter than the checkpoint's (official issue #8, e.g. ESC-50's 5 s): each audio position table
    (1, bands * T/p, D), frequency-major, keeps its first T'/p time columns, so every kept token has the position
    it was trained with. A model longer than its checkpoint is an error: positions it never saw would have to be
    invented (interpolating a trained table would also change what every column means), so we do not guess.
    Returns (mapped with the cut tables, notes for the load report)."""
    cut, notes = dict(mapped), []
    for key in AUDIO_POSITION_KEYS:
        have, want = mapped.get(key), own.get(key)
        if have is None or want is None or have.shape == want.shape:
            continue
        if have.ndim != 3 or have.shape[::2] != want.shape[::2] or have.shape[1] % bands:
            continue  # not a difference in clip length: load_pretrained's shape check reports it
        steps, keep = have.shape[1] // bands, want.shape[1] // bands
        if keep > steps:
            raise ValueError(
                f"{key}: checkpoint has {steps} audio time steps ({bands}x{steps} positions), the model "
                f"{keep}: a model may take shorter clips than its checkpoint (the table is cut), not "
                "longer ones; build it with audio_length <= the checkpoint's"
            )
        cut[key] = have.reshape(1, bands, steps, -1)[:, :, :keep].reshape(
            1, bands * keep, -1
        )  # (1, F/p * T'/p, D)
        notes.append(f"{key}: audio positions cut from {bands}x{steps} to {bands}x{keep} time steps")
    return cut, notes


def load_pretrained(model, source):
    """Load `source` (a path, a state dict, or a checkpoint dict with the state dict under 'model') into a
    CAVMAE or CAVMAEClassifier. Formats: this project's, the official release's (with or without the
    'module.' prefix of nn.DataParallel), and an ImageNet MAE ViT-B. A pretraining checkpoint loads into the
    classifier (decoder ignored, head left newly initialised). A model with a shorter audio_length than the
    checkpoint gets the first time columns of its audio position tables (_cut_audio_positions; the report says so).
    Raises ValueError on any other shape mismatch.
    Paths are unpickled with torch.load(weights_only=False): load only checkpoints you trust."""
    is_path = isinstance(source, (str, os.PathLike))
    state = torch.load(source, map_location="cpu", weights_only=False) if is_path else source
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{source if is_path else 'the given object'}: no state dict found")
    state = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state.items()}
    if any(k.startswith("encoder.") for k in state):
        fmt, (mapped, ignored) = "ours", (state, [])
    elif any(k.startswith(("blocks_a.", "blocks_u.")) for k in state):
        fmt, (mapped, ignored) = "official", (_official_to_ours(state), [])
    elif "patch_embed.proj.weight" in state and any(k.startswith("blocks.") for k in state):
        fmt, (mapped, ignored) = "imagenet-mae", _mae_to_ours(state, model.config)
    else:
        raise ValueError(
            f"unrecognised checkpoint format (first keys: {_summary(list(state))}); expected this "
            "project's, the official CAV-MAE release's, or an ImageNet MAE ViT-B state dict"
        )
    own = model.state_dict()
    ignored += [k for k in mapped if k not in own]
    mapped = {k: v for k, v in mapped.items() if k in own}
    mapped, adapted = _cut_audio_positions(mapped, own, model.config.audio_grid[0])
    bad = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in mapped.items()
        if v.shape != own[k].shape
    ]
    if bad:
        raise ValueError(
            f"{fmt} checkpoint does not fit this model config ({len(bad)} shape mismatches): "
            + "; ".join(bad[:5])
        )
    model.load_state_dict(mapped, strict=False)
    return LoadReport(fmt, list(mapped), [k for k in own if k not in mapped], ignored, adapted)
