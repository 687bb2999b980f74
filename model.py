"""CAV-MAE: Contrastive Audio-Visual Masked Autoencoder (Gong et al., ICLR 2023), in one file.

Read top to bottom, in the order of the method (as MAE's models_mae.py reads): the configuration,
the transformer block, the encoder shared by both models (patch embeddings, fixed sin-cos positions,
modality embeddings, modality-specific and joint blocks), MAE's random masking, then the pretraining
model: forward_encoder, forward_decoder, forward_loss and the contrastive loss, forward. Then the
fine-tuning classifier and the per-block compilation. Reading other people's checkpoints (the
official release, ImageNet MAE) lives with saving and resuming in checkpoint.py; `load_pretrained`
here hands over to it. Numerically identical to the official release (tests/golden holds its
outputs)."""

import math
import random
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
FT_MODES = ("multimodal", "audioonly", "videoonly", "missingaudioonly", "missingvideoonly")  # official names
MASK_MODES = ("unstructured", "time", "freq", "tf")
STRUCTURED_NOISE = 1.1  # above any uniform draw: a token with this noise is masked first
# the suffix of each stream's LayerNorms, in a joint block (norm1, norm1_a, ...) and after it (norm, ...)
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
    # Official pretraining quirk, kept for exactness: with joint_depth > 1 the audio-only and
    # visual-only streams of the contrastive loss pass through the last joint block only (no effect
    # at the paper's joint_depth=1).
    official_contrastive_streams: bool = True

    def __post_init__(self):
        for name in ("img_size", "audio_length", "num_mel_bins", "patch_size", "in_chans", "num_heads"):
            self._check_at_least(name, 1)
        for name in ("modality_specific_depth", "joint_depth", "decoder_depth"):
            self._check_at_least(name, 0)
        if self.mlp_ratio <= 0:
            raise ValueError(f"CAVMAEConfig.mlp_ratio={self.mlp_ratio}: the MLP width must be positive")
        for name in ("img_size", "audio_length", "num_mel_bins"):
            self._check_whole_patches(name)
        self._check_width("embed_dim", "num_heads")
        self._check_width("decoder_embed_dim", "decoder_num_heads")

    def _check_at_least(self, name, low):
        value = getattr(self, name)
        if value < low:
            raise ValueError(f"CAVMAEConfig.{name}={value}: must be at least {low}")

    def _check_whole_patches(self, name):
        value = getattr(self, name)
        if value % self.patch_size:
            raise ValueError(
                f"CAVMAEConfig.{name}={value} is not a multiple of patch_size={self.patch_size}: "
                f"choose a multiple of {self.patch_size} (or another patch_size)"
            )

    def _check_width(self, width_name, heads_name):
        width = getattr(self, width_name)
        heads = getattr(self, heads_name)
        if width % heads:
            raise ValueError(
                f"CAVMAEConfig.{width_name}={width} is not divisible by {heads_name}={heads}: each head "
                f"takes {width_name} / {heads_name} channels, so choose {width_name} a multiple of {heads_name}"
            )
        if width % 4:
            raise ValueError(
                f"CAVMAEConfig.{width_name}={width} is not a multiple of 4: the 2-D sin-cos positions split "
                "the width into sin and cos of rows and of columns; choose a multiple of 4"
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
    """Fixed 2-D sin-cos table (grid_h * grid_w, dim), row-major over the grid, as the official code
    builds it: the first dim/2 channels encode the column (x / time), the last dim/2 the row (y /
    frequency); each half is [sin(pos * w_i), cos(pos * w_i)] with w_i = 1 / 10000^(i / (dim/4)).
    Computed in float64."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )

    def encode(pos):  # (N,) -> (N, dim/2)
        angle = pos.reshape(-1, 1) * omega
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def num_params(module, trainable_only=True):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------------------------------
# Transformer block


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
        # softmax(q k^T / sqrt(Dh)) v in one fused kernel. Measured on the CPU (base model, batch
        # 4): attention 2.0 s instead of 5.2 s per step with the explicit softmax; flash /
        # memory-efficient kernels on GPUs.
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, Dh)
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class Block(nn.Module):
    """Pre-norm ViT block. A joint block (Sec. 3) has three LayerNorm pairs, one per stream: 'joint'
    for the concatenated audio-visual tokens, 'audio' and 'visual' for one modality alone; the
    weights are shared."""

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
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x, stream="joint"):  # (B, L, D) -> (B, L, D)
        suffix = STREAM_NORM_SUFFIX[stream]
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


# --------------------------------------------------------------------------------------------------
# Encoder, shared by the pretraining model and the classifier


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
        self.audio_blocks = nn.ModuleList(self._block() for _ in range(c.modality_specific_depth))
        self.visual_blocks = nn.ModuleList(self._block() for _ in range(c.modality_specific_depth))
        self.joint_blocks = nn.ModuleList(self._block(joint=True) for _ in range(c.joint_depth))
        self.norm = nn.LayerNorm(D)  # after the joint stream
        self.norm_a = nn.LayerNorm(D)  # after the audio-only stream
        self.norm_v = nn.LayerNorm(D)  # after the visual-only stream
        self.reset_parameters()

    def _block(self, joint=False):
        return Block(self.config.embed_dim, self.config.num_heads, self.config.mlp_ratio, joint)

    def reset_parameters(self):
        # the patch projections are initialised as linear layers
        for conv in (self.patch_embed_a, self.patch_embed_v):
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
            nn.init.zeros_(conv.bias)
        nn.init.normal_(self.modality_a, std=TOKEN_INIT_STD)
        nn.init.normal_(self.modality_v, std=TOKEN_INIT_STD)
        for blocks in (self.audio_blocks, self.visual_blocks, self.joint_blocks):
            blocks.apply(init_weights)
        for norm in (self.norm, self.norm_a, self.norm_v):
            init_weights(norm)

    def embed_audio(self, audio):  # (B, T, F) fbank -> (B, La, D), La = F/p * T/p, frequency-major
        x = self.patch_embed_a(audio.transpose(1, 2).unsqueeze(1))  # (B, D, F/p, T/p)
        return x.flatten(2).transpose(1, 2) + self.pos_embed_a + self.modality_a

    def embed_visual(self, image):  # (B, C, H, W) -> (B, Lv, D)
        x = self.patch_embed_v(image)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2) + self.pos_embed_v + self.modality_v

    def joint(self, x, stream, last_block_only=False):
        """Sec. 3 multi-stream pass: the shared joint blocks with the stream's norms, then its norm."""
        final_norm = getattr(self, "norm" + STREAM_NORM_SUFFIX[stream])
        blocks = self.joint_blocks[-1:] if last_block_only else self.joint_blocks
        for block in blocks:
            x = block(x, stream)
        return final_norm(x)

    def audio_tokens(self, audio):  # (B, T, F) -> (B, La, D) after the modality-specific audio blocks
        x = self.embed_audio(audio)
        for block in self.audio_blocks:
            x = block(x)
        return x

    def visual_tokens(self, image):  # (B, C, H, W) -> (B, Lv, D) after the modality-specific visual blocks
        x = self.embed_visual(image)
        for block in self.visual_blocks:
            x = block(x)
        return x

    def embed(self, audio, image):
        """Coordinated per-modality tokens without masking, for retrieval (the official
        forward_feat): (B, La, D), (B, Lv, D). Either input may be None, and then so is its
        output."""
        audio_out = None if audio is None else self.joint(self.audio_tokens(audio), "audio")
        visual_out = None if image is None else self.joint(self.visual_tokens(image), "visual")
        return audio_out, visual_out


# --------------------------------------------------------------------------------------------------
# Masking (Sec. 3: MAE's per-sample random masking)


def random_masking(x, noise, mask_ratio):
    """Keep the int(L * (1 - mask_ratio)) tokens of x (B, L, D) with the lowest noise (B, L), as MAE
    does. Returns the kept tokens (B, L_keep, D) in ascending noise, the mask (B, L) with 1 =
    masked, and ids_restore (B, L): each token's place in that order, which puts the sequence back
    together."""
    B, L, D = x.shape
    num_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the first num_keep stay
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :num_keep]  # (B, L_keep)
    x_kept = torch.gather(x, 1, ids_keep[:, :, None].expand(-1, -1, D))  # (B, L_keep, D)
    mask = (ids_restore >= num_keep).float()  # (B, L): 0 = kept, 1 = masked
    return x_kept, mask, ids_restore


def append_mask_tokens_and_unshuffle(x, mask_token, ids_restore):
    """Kept tokens (B, L_keep, D) in masking order -> (B, L, D) in patch order, mask tokens between."""
    B, num_keep, D = x.shape
    num_masked = ids_restore.shape[1] - num_keep
    x = torch.cat([x, mask_token.expand(B, num_masked, D)], dim=1)  # (B, L, D), still in masking order
    return torch.gather(x, 1, ids_restore[:, :, None].expand(-1, -1, D))  # (B, L, D)


@dataclass
class EncoderOutput:
    mask_a: torch.Tensor  # (B, La), 1 = masked
    mask_v: torch.Tensor  # (B, Lv)
    ids_restore_a: torch.Tensor  # (B, La)
    ids_restore_v: torch.Tensor  # (B, Lv)
    num_kept_a: int  # audio tokens at the front of `joint`
    joint: torch.Tensor = None  # (B, La_keep + Lv_keep, D) the joint stream after `norm`: the decoder's input
    audio: torch.Tensor = None  # (B, La_keep, D) the audio-only stream after `norm_a`: contrastive
    visual: torch.Tensor = None  # (B, Lv_keep, D) the visual-only stream after `norm_v`: contrastive


# --------------------------------------------------------------------------------------------------
# Pretraining model


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
        self.decoder_blocks = nn.ModuleList(
            Block(Dd, c.decoder_num_heads, c.mlp_ratio) for _ in range(c.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(Dd)
        self.decoder_pred_a = nn.Linear(Dd, c.patch_size**2)  # one spectrogram patch
        self.decoder_pred_v = nn.Linear(Dd, c.patch_size**2 * c.in_chans)  # one RGB patch
        for token in (self.mask_token, self.decoder_modality_a, self.decoder_modality_v):
            nn.init.normal_(token, std=TOKEN_INIT_STD)
        decoder_layers = (
            self.decoder_embed,
            self.decoder_blocks,
            self.decoder_norm,
            self.decoder_pred_a,
            self.decoder_pred_v,
        )
        for layer in decoder_layers:
            layer.apply(init_weights)

    # --- patches: the reconstruction targets ------------------------------------------------------
    def patchify_audio(self, audio):  # (B, T, F) -> (B, La, p*p), patches frequency-major like the tokens
        p = self.config.patch_size
        x = audio.transpose(1, 2)  # (B, F, T)
        B, Fq, T = x.shape
        x = x.reshape(B, Fq // p, p, T // p, p).permute(0, 1, 3, 2, 4)  # (B, F/p, T/p, p, p)
        return x.reshape(B, (Fq // p) * (T // p), p * p)

    def unpatchify_audio(self, patches):  # (B, La, p*p) -> (B, T, F)
        p = self.config.patch_size
        bands, steps = self.config.audio_grid
        x = patches.reshape(-1, bands, steps, p, p).permute(0, 1, 3, 2, 4)  # (B, F/p, p, T/p, p)
        return x.reshape(-1, bands * p, steps * p).transpose(1, 2)

    def patchify_image(self, image):  # (B, C, H, W) -> (B, Lv, p*p*C), channel last within a patch
        p = self.config.patch_size
        B, C, H, W = image.shape
        x = image.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, H/p, W/p, p, p, C)
        return x.reshape(B, (H // p) * (W // p), p * p * C)

    def unpatchify_image(self, patches):  # (B, Lv, p*p*C) -> (B, C, H, W)
        c = self.config
        p = c.patch_size
        rows, cols = c.visual_grid
        x = patches.reshape(-1, rows, cols, p, p, c.in_chans)  # (B, H/p, W/p, p, p, C)
        x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, H/p, p, W/p, p)
        return x.reshape(-1, c.in_chans, rows * p, cols * p)

    # --- encoder ----------------------------------------------------------------------------------
    def audio_noise(self, batch, mask_ratio, mask_mode, device):
        """Masking noise (B, La) for the audio tokens. 'unstructured': uniform, as MAE. The paper's
        ablation masks whole time columns ('time'), frequency rows ('freq') or both at TF_MASK_SCALE
        of the ratio each ('tf') by giving them noise above any uniform draw. Columns / rows are
        drawn with Python's `random` after the torch noise, as in the official code, so seeding both
        reproduces its masks. They are marked on the CPU and sent in one copy: per-sample indexing
        of a GPU tensor would make the host wait for the GPU twice per sample."""
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
        bands, steps = self.config.audio_grid
        noise = torch.rand(batch, bands, steps, device=device)  # (B, F/p, T/p), frequency-major
        if mask_mode == "unstructured":
            return noise.reshape(batch, bands * steps)
        pinned = torch.device(device).type == "cuda"
        chosen = torch.zeros(batch, bands, steps, dtype=torch.bool, pin_memory=pinned)
        scale = TF_MASK_SCALE if mask_mode == "tf" else 1.0
        if mask_mode in ("time", "tf"):
            for i in range(batch):
                chosen[i, :, random.sample(range(steps), int(steps * mask_ratio * scale))] = True
        if mask_mode in ("freq", "tf"):
            for i in range(batch):
                chosen[i, random.sample(range(bands), int(bands * mask_ratio * scale)), :] = True
        noise = noise.masked_fill(chosen.to(device, non_blocking=True), STRUCTURED_NOISE)
        return noise.reshape(batch, bands * steps)

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
        """Embed all patches, mask them (audio noise drawn first, then visual), run the
        modality-specific blocks, then the joint blocks in the requested streams (Sec. 3): the
        concatenated tokens for the decoder, each modality alone for the contrastive loss."""
        enc = self.encoder
        B = audio.shape[0]
        noise_a = self.audio_noise(B, mask_ratio_a, mask_mode, audio.device)  # (B, La)
        noise_v = torch.rand(B, math.prod(self.config.visual_grid), device=audio.device)  # (B, Lv)
        a, mask_a, ids_restore_a = random_masking(enc.embed_audio(audio), noise_a, mask_ratio_a)
        v, mask_v, ids_restore_v = random_masking(enc.embed_visual(image), noise_v, mask_ratio_v)
        # a: (B, La_keep, D), v: (B, Lv_keep, D)
        for block in enc.audio_blocks:
            a = block(a)
        for block in enc.visual_blocks:
            v = block(v)
        out = EncoderOutput(mask_a, mask_v, ids_restore_a, ids_restore_v, num_kept_a=a.shape[1])
        if joint_stream:  # stream 1: audio and visual tokens together -> decoder
            out.joint = enc.joint(torch.cat([a, v], dim=1), "joint")
        if modality_streams:  # streams 2 and 3: each modality alone -> contrastive loss
            # official quirk: with joint_depth > 1 these streams pass the last joint block only
            last_only = self.config.official_contrastive_streams
            out.audio = enc.joint(a, "audio", last_block_only=last_only)
            out.visual = enc.joint(v, "visual", last_block_only=last_only)
        return out

    def embed(self, audio, image):  # coordinated tokens without masking, see Encoder.embed
        return self.encoder.embed(audio, image)

    # --- decoder ----------------------------------------------------------------------------------
    def forward_decoder(self, x, ids_restore_a, ids_restore_v, num_kept_a):
        """Visible tokens (B, La_keep + Lv_keep, D), audio first -> predicted patches (B, La, p*p),
        (B, Lv, p*p*C): project to the decoder's width, append mask tokens and unshuffle each
        modality, add the decoder's positions and modality embeddings, run the decoder blocks."""
        x = self.decoder_embed(x)  # (B, La_keep + Lv_keep, Dd)
        visible_a = x[:, :num_kept_a]  # (B, La_keep, Dd)
        visible_v = x[:, num_kept_a:]  # (B, Lv_keep, Dd)
        x_a = append_mask_tokens_and_unshuffle(visible_a, self.mask_token, ids_restore_a)  # (B, La, Dd)
        x_v = append_mask_tokens_and_unshuffle(visible_v, self.mask_token, ids_restore_v)  # (B, Lv, Dd)
        x_a = x_a + self.decoder_pos_embed_a + self.decoder_modality_a
        x_v = x_v + self.decoder_pos_embed_v + self.decoder_modality_v
        x = torch.cat([x_a, x_v], dim=1)  # (B, La + Lv, Dd)
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)
        num_audio = ids_restore_a.shape[1]
        return self.decoder_pred_a(x[:, :num_audio]), self.decoder_pred_v(x[:, num_audio:])

    # --- losses -----------------------------------------------------------------------------------
    @staticmethod
    def patch_mean_and_std(patches):  # (B, L, P) -> each patch's mean and sqrt(var + eps), (B, L, 1) each
        mean = patches.mean(dim=-1, keepdim=True)
        var = patches.var(dim=-1, keepdim=True)
        return mean, (var + NORM_PIX_EPS) ** 0.5

    def forward_loss(self, patches, pred, mask):
        """Sec. 3: mean squared error per patch, averaged over the masked patches. patches and pred
        (B, L, P): the input's patches and their prediction; with norm_pix_loss the target is each
        patch normalised by its own mean and std."""
        target = patches
        if self.config.norm_pix_loss:
            mean, std = self.patch_mean_and_std(patches)
            target = (patches - mean) / std
        loss = ((pred.float() - target) ** 2).mean(dim=-1)  # (B, L)
        return (loss * mask).sum() / mask.sum().clamp(min=1)

    def prediction_to_input_space(self, pred, patches):
        """Predicted patches (B, L, P) in the input's units. With norm_pix_loss the prediction is
        per-patch normalised, so it is mapped back with the input patch's own mean and std (as MAE's
        demo does: a picture then shows structure, not the patch's true brightness)."""
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
        gather=None,
    ):
        """One pretraining step's forward. A weight of 0 skips its branch entirely (AV-MAE:
        contrastive_weight=0; CAV: mae_weight=0) and reports 0 for that loss. `gather` adds other
        ranks' clips as negatives."""
        if (mae_weight == 0) and (contrastive_weight == 0):
            raise ValueError("mae_weight and contrastive_weight are both 0: there is nothing to train")
        encoded = self.forward_encoder(
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
            mask_a=encoded.mask_a,
            mask_v=encoded.mask_v,
            loss_mae=zero,
            loss_mae_a=zero,
            loss_mae_v=zero,
            loss_c=zero,
            contrastive_accuracy=zero,
        )
        if mae_weight != 0:
            pred_a, pred_v = self.forward_decoder(
                encoded.joint, encoded.ids_restore_a, encoded.ids_restore_v, encoded.num_kept_a
            )
            out["pred_a"] = pred_a
            out["pred_v"] = pred_v
            out["loss_mae_a"] = self.forward_loss(self.patchify_audio(audio), pred_a, encoded.mask_a)
            out["loss_mae_v"] = self.forward_loss(self.patchify_image(image), pred_v, encoded.mask_v)
            out["loss_mae"] = mae_weight * (out["loss_mae_a"] + out["loss_mae_v"])
        if contrastive_weight != 0:
            audio_rep = encoded.audio.mean(dim=1)  # (B, D)
            visual_rep = encoded.visual.mean(dim=1)  # (B, D)
            loss_c, accuracy = contrastive_loss(audio_rep, visual_rep, bidirectional, gather)
            out["loss_c"] = contrastive_weight * loss_c
            out["contrastive_accuracy"] = accuracy
        out["loss"] = out["loss_mae"] + out["loss_c"]
        return out

    def flops_per_sample(self, mask_ratio_a=MASK_RATIO, mask_ratio_v=MASK_RATIO):
        """Analytic forward FLOPs (2 per multiply-add) of one pretraining sample, both losses on."""
        c = self.config
        D = c.embed_dim
        Dd = c.decoder_embed_dim
        P = c.patch_size**2
        La = math.prod(c.audio_grid)
        Lv = math.prod(c.visual_grid)
        ka = int(La * (1 - mask_ratio_a))
        kv = int(Lv * (1 - mask_ratio_v))

        def block(L, width):  # the linear layers, then q k^T and the weighted sum of v
            return 2 * L * width * width * (4 + 2 * c.mlp_ratio) + 4 * L * L * width

        flops = 2 * (La * P + Lv * P * c.in_chans) * D  # patch embeddings
        flops += c.modality_specific_depth * (block(ka, D) + block(kv, D))
        # three streams; under the official quirk the single-modality ones pass the last joint block
        modality_joint_depth = min(c.joint_depth, 1) if c.official_contrastive_streams else c.joint_depth
        flops += c.joint_depth * block(ka + kv, D) + modality_joint_depth * (block(ka, D) + block(kv, D))
        flops += 2 * (ka + kv) * D * Dd + c.decoder_depth * block(La + Lv, Dd)
        flops += 2 * Dd * (La * P + Lv * P * c.in_chans)  # prediction heads
        return flops


def pooled_representation(tokens):
    """Sec. 3 coordinated representation: tokens (B, L, D) mean-pooled, L2-normalised -> (B, D)."""
    return F.normalize(tokens.float().mean(dim=1), dim=-1)


def contrastive_loss(audio_rep, visual_rep, bidirectional=False, gather=None):
    """Sec. 3 InfoNCE on pooled representations (B, D). Official default: one direction, softmax
    over the audio axis for each visual column. `gather` (B, D) -> (N, D) adds other ranks' clips as
    negatives. Returns (loss, accuracy of picking the paired clip)."""
    # float32 even under autocast, which would run the similarity product in bf16 / fp16 whatever
    # its inputs' dtype: measured, the bf16 product put the gradient off by 1.4-3.3%.
    with torch.autocast(audio_rep.device.type, enabled=False):
        audio_unit = F.normalize(audio_rep.float(), dim=-1)
        visual_unit = F.normalize(visual_rep.float(), dim=-1)
        if gather is not None:
            audio_unit = gather(audio_unit)  # (N, D)
            visual_unit = gather(visual_unit)
        # (N, N): rows audio, columns visual
        similarity = audio_unit @ visual_unit.T / CONTRASTIVE_TEMPERATURE
        loss, accuracy = _infonce_one_direction(similarity)
        if bidirectional:
            loss_other, accuracy_other = _infonce_one_direction(similarity.T)
            loss = (loss + loss_other) / 2
            accuracy = (accuracy + accuracy_other) / 2
    return loss, accuracy


def _infonce_one_direction(similarity):  # (N, N) -> (loss, accuracy) of a softmax over dim 0 for each column
    target = torch.arange(similarity.shape[0], device=similarity.device)
    loss = -torch.diagonal(F.log_softmax(similarity, dim=0)).mean()
    accuracy = (similarity.argmax(dim=0) == target).float().mean()
    return loss, accuracy


# --------------------------------------------------------------------------------------------------
# Fine-tuning classifier


class CAVMAEClassifier(nn.Module):
    """The encoder without the decoder; tokens of the mode's stream mean-pooled -> LayerNorm ->
    Linear. Positions are trainable, as in the official fine-tuning model."""

    def __init__(self, config, num_classes, trainable_pos=True):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config, trainable_pos=trainable_pos)
        self.head = nn.Sequential(nn.LayerNorm(config.embed_dim), nn.Linear(config.embed_dim, num_classes))
        self.head.apply(init_weights)

    def features(self, audio, image, mode="multimodal"):  # -> pooled representation (B, D)
        enc = self.encoder
        if mode not in FT_MODES:
            raise ValueError(f"mode must be one of {FT_MODES}, got {mode!r}")
        if mode == "multimodal":
            x = torch.cat([enc.audio_tokens(audio), enc.visual_tokens(image)], dim=1)
            return enc.joint(x, "joint").mean(dim=1)
        if mode in ("audioonly", "missingaudioonly"):
            x = enc.audio_tokens(audio)
            stream = "audio"
        else:
            x = enc.visual_tokens(image)
            stream = "visual"
        pooled = enc.joint(x, stream).mean(dim=1)
        if mode.startswith("missing"):  # a multimodal model given one modality: average joint and own norms
            pooled = (enc.joint(x, "joint").mean(dim=1) + pooled) / 2
        return pooled

    def forward(self, audio, image, mode="multimodal"):  # -> logits (B, num_classes)
        return self.head(self.features(audio, image, mode))

    def embed(self, audio, image):  # coordinated tokens without masking, see Encoder.embed
        return self.encoder.embed(audio, image)


# --------------------------------------------------------------------------------------------------
# Speed: each transformer block compiled on its own


def apply_compile(model, **options):
    """torch.compile each transformer Block of a CAVMAE or CAVMAEClassifier in place (`options` go
    to torch.compile); returns the model. Parameters and state-dict keys are unchanged (checkpoints
    as eager), and the masking noise stays eager, so a seed draws the same masks as in eager
    mode."""
    # Measured on one H100 (base model, bf16): the whole model compiled took ~107 s and crashed at
    # batch >= 128; block by block 29-37 s of compilation and 1090 / 1130 samples/s at batch 128 /
    # 256 against 815-875 / 914 eager (LayerNorm, residual adds, GELU and weight casts fuse).
    for module in model.modules():
        if isinstance(module, Block):
            module.compile(**options)
    return model


# --------------------------------------------------------------------------------------------------
# Loading pretrained weights


def load_pretrained(model, source):
    """Load `source` (a checkpoint path, a state dict, or a checkpoint dict with the state dict
    under 'model') into a CAVMAE or CAVMAEClassifier: this project's checkpoints, the official
    release's and an ImageNet MAE ViT-B. Returns the load report. This only hands over to
    checkpoint.load_pretrained, where reading checkpoints lives (imported here, not at the top, as
    checkpoint.py imports this file)."""
    import checkpoint

    return checkpoint.load_pretrained(model, source)
