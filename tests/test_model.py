"""Specification of model.py: configuration, shapes, masking, attention, positions, losses, per-block
compilation, exactness to the golden vectors of the official release, and loading published weights
(ours, the official release's, ImageNet MAE, a shorter audio length)."""

import copy
import math
import random
import re
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY

from model import (
    CAVMAE,
    FT_MODES,
    Attention,
    CAVMAEClassifier,
    CAVMAEConfig,
    append_mask_tokens_and_unshuffle,
    apply_compile,
    contrastive_loss,
    load_pretrained,
    num_params,
    random_masking,
    sincos_pos_embed,
)

B = 4
HEAD_KEYS = ["head.0.bias", "head.0.weight", "head.1.bias", "head.1.weight"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run far faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides):
    return CAVMAEConfig(**dict(TINY, **overrides))


def tiny(**overrides):
    torch.manual_seed(0)
    return CAVMAE(tiny_config(**overrides))


def inputs(config, batch=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    audio = torch.randn(batch, config.audio_length, config.num_mel_bins, generator=g)
    image = torch.randn(batch, config.in_chans, config.img_size, config.img_size, generator=g)
    return audio, image


def load(golden, name):
    return torch.load(f"{golden}/model/{name}", map_location="cpu", weights_only=False)


def golden_config(c, pretrain=True):
    keys = ["img_size", "audio_length", "patch_size", "in_chans", "embed_dim", "num_heads", "mlp_ratio"]
    if pretrain:
        keys += ["decoder_embed_dim", "decoder_depth", "decoder_num_heads", "norm_pix_loss", "tr_pos"]
    return CAVMAEConfig(
        **{k: c[k] for k in keys},
        modality_specific_depth=c["modality_specific_depth"],
        joint_depth=12 - c["modality_specific_depth"],
    )


# --- configuration and size -----------------------------------------------------------------------


def test_config_rejects_sizes_that_are_not_whole_patches():
    with pytest.raises(ValueError, match="audio_length=1000 is not a multiple of patch_size=16"):
        CAVMAEConfig(audio_length=1000)
    with pytest.raises(ValueError, match="img_size=100 is not a multiple of patch_size=16"):
        CAVMAEConfig(img_size=100)


def test_config_rejects_a_width_its_heads_do_not_divide_and_names_both_fields():
    with pytest.raises(ValueError, match="embed_dim=40 must be a multiple of num_heads=12 and of 4"):
        CAVMAEConfig(embed_dim=40)  # a multiple of 4, not of 12
    with pytest.raises(ValueError, match="decoder_embed_dim=500 must be a multiple of decoder_num_heads=16"):
        CAVMAEConfig(decoder_embed_dim=500)


def test_config_rejects_a_width_the_sincos_table_cannot_split():
    with pytest.raises(ValueError, match="embed_dim=30 must be a multiple of num_heads=3 and of 4"):
        CAVMAEConfig(embed_dim=30, num_heads=3)


def test_base_model_has_the_official_number_of_trainable_parameters():
    with torch.device("meta"):
        model = CAVMAE(CAVMAEConfig())
        clf = CAVMAEClassifier(CAVMAEConfig(), num_classes=527)
    assert num_params(model) == 189_961_984  # fixed sin-cos positions are not trained
    assert num_params(clf) == 164_771_855  # the classifier trains its positions, as the official one does


# --- shapes ---------------------------------------------------------------------------------------


def test_pretraining_forward_returns_losses_masks_and_predictions():
    model = tiny()
    out = model(*inputs(model.config))
    La = 8 * 4  # 128 mel bins x 64 frames in 16 x 16 patches
    Lv = 2 * 2  # a 32 x 32 image
    assert out["mask_a"].shape == (B, La)
    assert out["mask_v"].shape == (B, Lv)
    assert out["pred_a"].shape == (B, La, 16 * 16)
    assert out["pred_v"].shape == (B, Lv, 16 * 16 * 3)
    for key in ("loss", "loss_mae", "loss_mae_a", "loss_mae_v", "loss_c", "contrastive_accuracy"):
        assert out[key].shape == () and torch.isfinite(out[key]), key
    assert torch.allclose(out["loss"], out["loss_mae_a"] + out["loss_mae_v"] + out["loss_c"])


def test_forward_encoder_returns_the_kept_tokens_after_the_modality_specific_blocks():
    model = tiny()
    enc = model.encoder
    audio, image = inputs(model.config)
    torch.manual_seed(3)
    a, v, mask_a, mask_v, restore_a, restore_v = model.forward_encoder(audio, image, 0.75, 0.5)
    torch.manual_seed(3)
    noise_a = torch.rand(B, 32)  # audio noise first, then visual
    noise_v = torch.rand(B, 4)
    want_a, want_mask_a, want_restore_a = random_masking(enc.embed_audio(audio), noise_a, 0.75)
    want_v, want_mask_v, want_restore_v = random_masking(enc.embed_visual(image), noise_v, 0.5)
    want_a = enc.audio_blocks[0](want_a)
    want_v = enc.visual_blocks[0](want_v)
    assert a.shape == (B, 8, 32)
    assert v.shape == (B, 2, 32)
    assert torch.equal(a, want_a)
    assert torch.equal(v, want_v)
    assert torch.equal(mask_a, want_mask_a)
    assert torch.equal(mask_v, want_mask_v)
    assert torch.equal(restore_a, want_restore_a)
    assert torch.equal(restore_v, want_restore_v)


def test_embed_returns_unmasked_tokens_per_modality_and_accepts_a_missing_one():
    model = tiny()
    audio, image = inputs(model.config)
    a, v = model.embed(audio, image)
    assert a.shape == (B, 32, 32)
    assert v.shape == (B, 4, 32)
    a_only, none = model.embed(audio, None)
    assert none is None
    assert torch.equal(a_only, a)


@pytest.mark.parametrize("mode", FT_MODES)
def test_classifier_gives_logits_in_every_mode(mode):
    torch.manual_seed(0)
    config = tiny_config()
    clf = CAVMAEClassifier(config, num_classes=5)
    assert clf(*inputs(config), mode=mode).shape == (B, 5)


def test_classifier_rejects_an_unknown_mode():
    config = tiny_config()
    with pytest.raises(ValueError, match="multimodal"):
        CAVMAEClassifier(config, 5)(*inputs(config), mode="bimodal")


def test_classifier_shares_the_pretraining_encoder_class():
    config = tiny_config()
    clf = CAVMAEClassifier(config, 3)
    assert type(clf.encoder) is type(CAVMAE(config).encoder)
    assert isinstance(clf.head[0], torch.nn.LayerNorm)


# --- patches and positions ------------------------------------------------------------------------


def test_audio_patch_targets_are_ordered_like_the_audio_tokens():
    model = tiny()
    enc = model.encoder
    audio, image = inputs(model.config)
    w_a = enc.patch_embed_a.weight.flatten(1)  # (D, p*p)
    tokens = enc.embed_audio(audio) - enc.pos_embed_a - enc.modality_a
    assert torch.allclose(tokens, model.patchify_audio(audio) @ w_a.T + enc.patch_embed_a.bias, atol=1e-5)
    w_v = enc.patch_embed_v.weight.permute(0, 2, 3, 1).flatten(1)  # patchify_image: channel last in a patch
    tokens = enc.embed_visual(image) - enc.pos_embed_v - enc.modality_v
    assert torch.allclose(tokens, model.patchify_image(image) @ w_v.T + enc.patch_embed_v.bias, atol=1e-5)


def test_unpatchify_inverts_patchify():
    model = tiny()
    audio, image = inputs(model.config)
    assert torch.equal(model.unpatchify_audio(model.patchify_audio(audio)), audio)
    assert torch.equal(model.unpatchify_image(model.patchify_image(image)), image)


def test_sincos_table_encodes_time_in_the_first_half_and_frequency_in_the_second():
    table = sincos_pos_embed(16, 2, 3).reshape(2, 3, 16)  # (rows, columns, dim)
    assert torch.equal(table[0, :, :8], table[1, :, :8])  # first half depends on the column only
    assert torch.equal(table[:, 0, 8:], table[:, 2, 8:])  # second half on the row only
    assert torch.allclose(table[0, 1, :4], torch.sin(1.0 / 10000 ** (torch.arange(4) / 4.0)))


def test_sincos_tables_equal_the_official_ones(golden):
    # the golden checkpoint stores the official tables plus N(0, 0.02) noise (so that loaders must
    # load them): ours must sit within that noise, while the other grid orientation is far off
    state = load(golden, "pretrain_state_dict.pth")
    c = load(golden, "pretrain_vectors.pth")["config"]
    bands = 128 // 16
    steps = c["audio_length"] // 16
    side = c["img_size"] // 16
    for dim, prefix in ((c["embed_dim"], "module."), (c["decoder_embed_dim"], "module.decoder_")):
        for ours, name in (
            (sincos_pos_embed(dim, bands, steps), "pos_embed_a"),
            (sincos_pos_embed(dim, side, side), "pos_embed_v"),
        ):
            residual = state[prefix + name][0] - ours
            assert residual.abs().max() < 0.12, prefix + name
            assert residual.std() < 0.025, prefix + name
            swapped = torch.cat([ours[:, dim // 2 :], ours[:, : dim // 2]], dim=1)
            assert (state[prefix + name][0] - swapped).abs().max() > 0.5, prefix + name


def test_positions_are_fixed_in_pretraining_and_trainable_in_the_classifier():
    model = tiny()
    clf = CAVMAEClassifier(tiny_config(), 3)
    assert not model.encoder.pos_embed_a.requires_grad
    assert not model.decoder_pos_embed_v.requires_grad
    assert clf.encoder.pos_embed_a.requires_grad
    assert clf.encoder.pos_embed_v.requires_grad
    assert tiny(tr_pos=True).encoder.pos_embed_a.requires_grad


# --- attention ------------------------------------------------------------------------------------


def test_attention_equals_the_explicit_softmax_formula():
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4)
    x = torch.randn(2, 7, 32)
    q, k, v = attn.qkv(x).reshape(2, 7, 3, 4, 8).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-2, -1) / math.sqrt(8)).softmax(dim=-1)
    explicit = attn.proj((weights @ v).transpose(1, 2).reshape(2, 7, 32))
    assert torch.allclose(attn(x), explicit, atol=1e-6)


# --- masking --------------------------------------------------------------------------------------


def test_masking_keeps_int_L_times_one_minus_ratio_tokens_in_noise_order():
    noise = torch.rand(3, 10)
    tokens = torch.randn(3, 10, 4)
    kept, mask, restore = random_masking(tokens, noise, 0.75)
    assert kept.shape == (3, 2, 4)
    assert torch.equal(mask.sum(1), torch.full((3,), 8.0))
    for i in range(3):
        lowest = noise[i].argsort()[:2]
        assert torch.equal(kept[i], tokens[i, lowest])
        assert mask[i, lowest].sum() == 0
        assert torch.equal(restore[i].sort().values, torch.arange(10))
        assert torch.equal(restore[i][lowest], torch.arange(2))  # the kept tokens come first, in noise order


def test_unshuffling_puts_kept_tokens_back_and_mask_tokens_in_the_masked_places():
    tokens = torch.randn(B, 10, 4)
    kept, mask, restore = random_masking(tokens, torch.rand(B, 10), 0.7)
    mask_token = torch.randn(1, 1, 4)
    restored = append_mask_tokens_and_unshuffle(kept, mask_token, restore)  # (B, 10, 4)
    masked = mask[..., None].bool()
    assert torch.equal(restored, torch.where(masked, mask_token.expand(B, 10, 4), tokens))


def test_masks_follow_mae_noise_drawn_audio_first_then_visual():
    model = tiny()
    audio, image = inputs(model.config)
    torch.manual_seed(3)
    out = model(audio, image, mask_ratio_a=0.75, mask_ratio_v=0.5)
    torch.manual_seed(3)
    noise_a = torch.rand(B, 32)
    noise_v = torch.rand(B, 4)
    expected_a = torch.ones(B, 32).scatter_(1, noise_a.argsort(1)[:, :8], 0)
    expected_v = torch.ones(B, 4).scatter_(1, noise_v.argsort(1)[:, :2], 0)
    assert torch.equal(out["mask_a"], expected_a)
    assert torch.equal(out["mask_v"], expected_v)


def test_each_sample_is_masked_independently():
    model = tiny(audio_length=256)
    out = model(*inputs(model.config, batch=8))
    assert len({tuple(m.tolist()) for m in out["mask_a"]}) == 8


def audio_mask(mode, ratio=0.75):
    model = tiny(audio_length=256)  # an 8 (frequency) x 16 (time) token grid
    random.seed(0)
    out = model(*inputs(model.config), mask_ratio_a=ratio, mask_mode=mode)
    return out["mask_a"].reshape(B, 8, 16)  # frequency-major


def test_time_masking_masks_whole_time_columns():
    mask = audio_mask("time")
    columns = mask.amin(dim=1)  # (B, 16): 1 where the whole column is masked
    assert torch.equal(columns.sum(1), torch.full((B,), 12.0))
    assert torch.equal(mask, columns[:, None, :].expand_as(mask))


def test_freq_masking_masks_whole_frequency_rows():
    mask = audio_mask("freq")
    rows = mask.amin(dim=2)  # (B, 8)
    assert torch.equal(rows.sum(1), torch.full((B,), 6.0))
    assert torch.equal(mask, rows[:, :, None].expand_as(mask))


def test_tf_masking_masks_whole_columns_and_rows_then_fills_the_ratio():
    mask = audio_mask("tf")
    assert (mask.amin(dim=1).sum(1) >= int(16 * 0.75 * 0.7)).all()
    assert (mask.amin(dim=2).sum(1) >= int(8 * 0.75 * 0.7)).all()
    assert torch.equal(mask.sum((1, 2)), torch.full((B,), 96.0))


def test_structured_masks_draw_columns_with_python_random_after_the_torch_noise():
    """The official draw order, so that seeding torch and `random` reproduces the official masks."""
    model = tiny(audio_length=256)
    torch.manual_seed(0)
    random.seed(0)
    noise = model.audio_noise(B, 0.75, "time", "cpu")  # (B, 128)
    _, mask, _ = random_masking(torch.zeros(B, 128, 1), noise, 0.75)
    torch.manual_seed(0)
    random.seed(0)
    torch.rand(B, 128)  # the uniform noise comes first
    for i in range(B):
        columns = sorted(random.sample(range(16), 12))
        assert mask[i].reshape(8, 16).amin(0).nonzero().flatten().tolist() == columns


def test_decoder_input_is_the_unshuffled_sequence_plus_the_decoders_positions():
    """What forward_decoder feeds its blocks, seen by decoder_norm when there are none."""
    model = tiny(decoder_depth=0)
    Dd = model.config.decoder_embed_dim
    seen = {}
    model.decoder_norm.register_forward_hook(lambda module, args, out: seen.update(input=args[0]))
    _, mask_a, restore_a = random_masking(torch.randn(B, 32, 1), torch.rand(B, 32), 0.75)
    _, mask_v, restore_v = random_masking(torch.randn(B, 4, 1), torch.rand(B, 4), 0.75)
    visible = torch.randn(B, 8 + 1, model.config.embed_dim)  # 8 audio then 1 visual token, in masking order
    model.forward_decoder(visible, restore_a, restore_v, num_kept_a=8)
    tokens = model.decoder_embed(visible)  # (B, 9, Dd)
    want_a = append_mask_tokens_and_unshuffle(tokens[:, :8], model.mask_token, restore_a)
    want_v = torch.where(mask_v[..., None].bool(), model.mask_token, tokens[:, 8:9].expand(-1, 4, Dd))
    got = seen["input"]  # (B, 36, Dd)
    assert torch.equal(got[:, :32], want_a + model.decoder_pos_embed_a + model.decoder_modality_a)
    assert torch.equal(got[:, 32:], want_v + model.decoder_pos_embed_v + model.decoder_modality_v)


def test_unknown_mask_mode_is_rejected():
    model = tiny()
    with pytest.raises(ValueError, match="mask_mode"):
        model(*inputs(model.config), mask_mode="checkerboard")


# --- losses and their weights ---------------------------------------------------------------------


def test_mae_weight_zero_skips_the_decoder_and_the_joint_stream():
    model = tiny()
    out = model(*inputs(model.config), mae_weight=0.0)
    assert "pred_a" not in out
    assert out["loss_mae"] == 0
    assert out["loss_mae_a"] == 0
    assert out["loss_c"] > 0
    out["loss"].backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith(("decoder", "mask_token")))
    assert model.encoder.norm.weight.grad is None
    assert model.encoder.norm_a.weight.grad is not None


def test_contrastive_weight_zero_skips_the_single_modality_streams():
    model = tiny()
    out = model(*inputs(model.config), contrastive_weight=0.0)
    assert out["loss_c"] == 0
    assert out["contrastive_accuracy"] == 0
    assert torch.equal(out["loss"], out["loss_mae"])
    out["loss"].backward()
    enc = model.encoder
    assert enc.norm_a.weight.grad is None
    assert enc.norm_v.weight.grad is None
    assert enc.joint_blocks[0].norm1_a.weight.grad is None
    assert enc.joint_blocks[0].norm1.weight.grad is not None


def test_both_weights_zero_is_an_error():
    model = tiny()
    with pytest.raises(ValueError, match="nothing to train"):
        model(*inputs(model.config), mae_weight=0.0, contrastive_weight=0.0)


def test_contrastive_loss_is_single_direction_over_the_audio_axis_by_default():
    torch.manual_seed(0)
    a = torch.randn(5, 8)
    v = torch.randn(5, 8)
    sim = F.normalize(a, dim=-1) @ F.normalize(v, dim=-1).T / 0.05
    loss, _ = contrastive_loss(a, v)
    assert torch.allclose(loss, F.cross_entropy(sim.T, torch.arange(5)))
    both, _ = contrastive_loss(a, v, bidirectional=True)
    assert torch.allclose(both, (loss + F.cross_entropy(sim, torch.arange(5))) / 2)
    _, accuracy = contrastive_loss(a, a)
    assert accuracy == 1


def test_contrastive_loss_and_its_gradient_stay_float32_under_bf16_autocast():
    torch.manual_seed(0)
    a = torch.randn(16, 64, requires_grad=True)
    v = torch.randn(16, 64)
    results = []
    for bf16 in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = contrastive_loss(a, v, bidirectional=True)
        results.append((loss, *torch.autograd.grad(loss, a)))
    want, want_grad = results[0]
    got, got_grad = results[1]
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    assert torch.allclose(got_grad, want_grad, rtol=1e-5, atol=1e-9)  # a bf16 product is off by ~1e-2


def normalised_patches(patches):
    return (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6) ** 0.5


def test_norm_pix_loss_normalises_each_target_patch():
    model = tiny(norm_pix_loss=True)
    patches = torch.randn(2, 5, 16) * 3 + 1
    mask = torch.ones(2, 5)
    assert model.forward_loss(patches, normalised_patches(patches), mask) < 1e-10


def test_mae_loss_averages_the_squared_error_over_the_masked_patches_only():
    model = tiny()
    patches = torch.zeros(1, 2, 4)
    pred = torch.tensor([[[1.0] * 4, [3.0] * 4]])
    assert model.forward_loss(patches, pred, torch.tensor([[0.0, 1.0]])) == 9.0


def test_prediction_to_input_space_inverts_the_norm_pix_target():
    patches = torch.randn(2, 5, 16) * 3 + 1
    model = tiny(norm_pix_loss=True)
    restored = model.prediction_to_input_space(normalised_patches(patches), patches)
    assert torch.allclose(restored, patches, atol=1e-5)
    pred = torch.randn(2, 5, 16)
    assert torch.equal(
        tiny().prediction_to_input_space(pred, patches), pred
    )  # without norm_pix: as predicted


def test_tiny_model_overfits_one_batch():
    model = tiny()
    g = torch.Generator().manual_seed(1)  # one value per clip and channel: masked patches equal visible ones
    audio = torch.randn(B, 1, 1, generator=g).expand(B, 64, 128).contiguous()
    image = torch.randn(B, 3, 1, 1, generator=g).expand(B, 3, 32, 32).contiguous()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        torch.manual_seed(0)  # the same masks every step
        loss = model(audio, image)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10


def test_bf16_autocast_runs_forward_and_backward_on_cpu():
    model = tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(*inputs(model.config))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert out["pred_a"].dtype == torch.bfloat16
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# --- speed ----------------------------------------------------------------------------------------


def test_compiled_blocks_give_the_eager_masks_losses_and_gradients():
    """apply_compile changes speed, not results: masks drawn eagerly from the same seed, losses and
    gradients equal within float tolerance, the same state-dict keys (checkpoints as in eager mode).
    ~40 s of CPU compile."""
    torch._dynamo.reset()  # no graphs of other tests' shapes in the recompile limit
    eager = tiny(norm_pix_loss=True)
    compiled = apply_compile(copy.deepcopy(eager))
    audio, image = inputs(eager.config)
    outs = []
    for model in (eager, compiled):
        torch.manual_seed(3)
        with torch._dynamo.error_on_graph_break(True):  # a graph break in a block is an error
            outs.append(model(audio, image))
            outs[-1]["loss"].backward()
    assert compiled.decoder_blocks[0]._compiled_call_impl is not None
    assert torch.equal(outs[0]["mask_a"], outs[1]["mask_a"])
    assert torch.equal(outs[0]["mask_v"], outs[1]["mask_v"])
    for key in ("loss", "loss_mae_a", "loss_mae_v", "loss_c", "pred_v"):
        assert torch.allclose(outs[0][key], outs[1][key], rtol=1e-5, atol=1e-6), key
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        assert (p.grad is None) or torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name
    assert list(compiled.state_dict()) == list(eager.state_dict())


# --- exactness against the official release (tests/golden) ----------------------------------------


def test_official_pretraining_checkpoint_reproduces_the_golden_outputs(golden):
    vec = load(golden, "pretrain_vectors.pth")
    state = load(golden, "pretrain_state_dict.pth")
    model = CAVMAE(golden_config(vec["config"])).eval()
    report = load_pretrained(model, state)
    assert not report.missing_keys
    assert not report.unexpected_keys  # the unused per-modality norms of non-joint blocks are dropped
    with torch.no_grad():
        a, v = model.embed(vec["audio"], vec["image"])
        assert torch.allclose(a, vec["feat_audio"], atol=2e-4)
        assert torch.allclose(v, vec["feat_visual"], atol=2e-4)
        for key, ratio in (("forward_mr0.75", 0.75), ("forward_mr0.5", 0.5)):
            ref = vec[key]
            torch.manual_seed(ref["seed"])
            out = model(vec["audio"], vec["image"], mask_ratio_a=ratio, mask_ratio_v=ratio)
            assert torch.equal(out["mask_a"], ref["mask_a"]), key
            assert torch.equal(out["mask_v"], ref["mask_v"]), key
            for name in ("loss", "loss_mae_a", "loss_mae_v", "loss_c"):
                assert torch.allclose(out[name], ref[name], atol=1e-4), (key, name)
            assert torch.allclose(out["contrastive_accuracy"], ref["c_acc"], atol=1e-4)  # the official name
        torch.manual_seed(vec["inpaint"]["seed"])
        out = model(vec["audio"], vec["image"])
        assert torch.allclose(out["pred_a"], vec["inpaint"]["pred_a"], atol=2e-4)
        assert torch.allclose(out["pred_v"], vec["inpaint"]["pred_v"], atol=2e-4)
        for direction, bidirectional in (("contrastive_single", False), ("contrastive_bidirectional", True)):
            loss, accuracy = contrastive_loss(a.mean(1), v.mean(1), bidirectional)
            assert torch.allclose(loss, vec[direction][0], atol=1e-4), direction
            assert accuracy == vec[direction][1], direction


def test_official_finetuned_checkpoint_reproduces_the_golden_logits_in_every_mode(golden):
    vec = load(golden, "finetune_vectors.pth")
    state = load(golden, "finetune_state_dict.pth")
    clf = CAVMAEClassifier(golden_config(vec["config"], pretrain=False), vec["config"]["label_dim"]).eval()
    state = {k.removeprefix("module."): v for k, v in state.items()}  # also loads without the prefix
    report = load_pretrained(clf, state)
    assert not report.missing_keys
    assert not report.unexpected_keys
    with torch.no_grad():
        for mode in FT_MODES:
            logits = clf(vec["audio"], vec["image"], mode)
            assert torch.allclose(logits, vec["logits_" + mode], atol=2e-4), mode
        a, v = clf.encoder.embed(vec["audio"], vec["image"])
        assert torch.allclose(a, vec["feat_audio"], atol=2e-4)
        assert torch.allclose(v, vec["feat_visual"], atol=2e-4)


def test_official_contrastive_quirk_only_matters_with_several_joint_blocks():
    audio, image = inputs(tiny_config())
    losses = {}
    for depth in (1, 2):
        for quirk in (True, False):
            model = tiny(joint_depth=depth, official_contrastive_streams=quirk)
            torch.manual_seed(0)
            losses[depth, quirk] = model(audio, image)["loss_c"]
    assert torch.equal(losses[1, True], losses[1, False])
    assert not torch.equal(losses[2, True], losses[2, False])


# --- loading: ours --------------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path):
    model = tiny()
    path = tmp_path / "ckpt.pt"  # a pathlib.Path works as well as a str
    torch.save(dict(model=model.state_dict(), model_args=asdict(model.config), iter_num=3), path)
    fresh = CAVMAE(CAVMAEConfig(**torch.load(path, weights_only=False)["model_args"]))
    report = load_pretrained(fresh, path)
    assert not report.missing_keys
    assert not report.unexpected_keys
    audio, image = inputs(model.config)
    torch.manual_seed(0)
    want = model(audio, image)
    torch.manual_seed(0)
    got = fresh(audio, image)
    assert torch.equal(got["loss"], want["loss"])
    assert torch.equal(got["pred_v"], want["pred_v"])


def test_pretraining_checkpoint_loads_into_the_classifier_without_decoder():
    model = tiny()
    clf = CAVMAEClassifier(model.config, num_classes=3)
    report = load_pretrained(clf, {"module." + k: v for k, v in model.state_dict().items()})
    assert any(k.startswith("decoder_blocks.") for k in report.unexpected_keys)
    assert "mask_token" in report.unexpected_keys
    assert sorted(report.missing_keys) == HEAD_KEYS
    want = model.encoder.audio_blocks[0].attn.qkv.weight
    assert torch.equal(clf.encoder.audio_blocks[0].attn.qkv.weight, want)


def test_wrapper_prefixes_of_data_parallel_and_compile_are_stripped_in_any_order():
    model = tiny()
    state = {}
    for i, (key, value) in enumerate(model.state_dict().items()):
        prefix = ("module._orig_mod.", "_orig_mod.module.", "module.", "_orig_mod.", "")[i % 5]
        state[prefix + key] = value + 1
    fresh = tiny()
    report = load_pretrained(fresh, state)
    assert not report.missing_keys
    assert not report.unexpected_keys
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, model.state_dict()[key] + 1), key


def test_a_compiled_whole_model_checkpoint_loads():
    model = tiny()
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}  # torch.compile(model).state_dict()
    report = load_pretrained(tiny(), state)
    assert not report.missing_keys
    assert not report.unexpected_keys


def test_shape_mismatch_is_torchs_size_mismatch_error():
    state = tiny().state_dict()
    with pytest.raises(RuntimeError, match="size mismatch for encoder.pos_embed_v"):
        load_pretrained(tiny(img_size=64), state)


def test_unrecognised_state_dict_is_a_clear_error():
    with pytest.raises(ValueError, match="not a CAV-MAE or ImageNet MAE state dict"):
        load_pretrained(tiny(), {"weight": torch.zeros(1)})


def test_a_file_with_an_unrecognised_state_dict_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_pretrained(tiny(), str(path))


def test_reading_a_missing_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "nowhere.pt"
    with pytest.raises(ValueError, match=re.escape(f"cannot read checkpoint {path}: ")):
        load_pretrained(tiny(), path)


@pytest.mark.parametrize(
    "content",
    [b"", b"lr = 0.1\n", bytes(range(256)) * 4],
    ids=["empty", "text", "random-bytes"],
)
def test_reading_a_file_that_is_not_a_checkpoint_names_the_file(tmp_path, content):
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"cannot read checkpoint {path}: ")):
        load_pretrained(tiny(), str(path))


def test_reading_a_pickled_object_that_is_not_a_dict_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {path}: a list is not a state dict")):
        load_pretrained(tiny(), str(path))


# --- loading: ImageNet MAE ViT-B (the paper's initialisation) -------------------------------------


def mae_state_dict(config, depth=2):
    """A synthetic ImageNet MAE checkpoint in the published format, sized for `config`: `depth`
    encoder blocks, one decoder block."""
    torch.manual_seed(0)
    D = config.embed_dim
    Dd = config.decoder_embed_dim
    p = config.patch_size
    Lv = math.prod(config.visual_grid)
    model = CAVMAE(config)
    state = {
        "cls_token": torch.randn(1, 1, D),
        "pos_embed": torch.randn(1, 1 + Lv, D),
        "patch_embed.proj.weight": torch.randn(D, 3, p, p),
        "patch_embed.proj.bias": torch.randn(D),
        "norm.weight": torch.randn(D),
        "norm.bias": torch.randn(D),
        "mask_token": torch.randn(1, 1, Dd),
        "decoder_embed.weight": torch.randn(Dd, D),
        "decoder_embed.bias": torch.randn(Dd),
        "decoder_pos_embed": torch.randn(1, 1 + Lv, Dd),
        "decoder_norm.weight": torch.randn(Dd),
        "decoder_norm.bias": torch.randn(Dd),
        "decoder_pred.weight": torch.randn(p * p * 3, Dd),
        "decoder_pred.bias": torch.randn(p * p * 3),
    }
    for i in range(depth):
        for key, value in model.encoder.audio_blocks[0].state_dict().items():
            state[f"blocks.{i}.{key}"] = torch.randn(value.shape)
    for key, value in model.decoder_blocks[0].state_dict().items():
        state[f"decoder_blocks.0.{key}"] = torch.randn(value.shape)
    return {"model": state}


def test_imagenet_mae_checkpoint_maps_as_the_official_adaptation():
    model = tiny()
    mae = mae_state_dict(model.config)
    w = mae["model"]
    report = load_pretrained(model, mae)
    enc = model.encoder
    assert report.unexpected_keys == ["cls_token"]
    assert torch.equal(enc.audio_blocks[0].attn.qkv.weight, w["blocks.0.attn.qkv.weight"])
    assert torch.equal(enc.visual_blocks[0].mlp.fc2.bias, w["blocks.0.mlp.fc2.bias"])
    joint = enc.joint_blocks[0]
    assert torch.equal(joint.attn.proj.weight, w["blocks.1.attn.proj.weight"])
    for name in ("norm1", "norm1_a", "norm1_v"):
        assert torch.equal(getattr(joint, name).weight, w["blocks.1.norm1.weight"]), name
    for name in ("norm2", "norm2_a", "norm2_v"):
        assert torch.equal(getattr(joint, name).bias, w["blocks.1.norm2.bias"]), name
    for norm in (enc.norm, enc.norm_a, enc.norm_v):
        assert torch.equal(norm.weight, w["norm.weight"])
    assert torch.equal(enc.patch_embed_a.weight, w["patch_embed.proj.weight"].sum(1, keepdim=True))
    assert torch.equal(enc.patch_embed_v.weight, w["patch_embed.proj.weight"])
    assert torch.equal(enc.patch_embed_a.bias, w["patch_embed.proj.bias"])
    assert torch.equal(enc.pos_embed_v, w["pos_embed"][:, 1:])
    assert torch.equal(model.decoder_pos_embed_v, w["decoder_pos_embed"][:, 1:])
    assert torch.equal(model.decoder_pred_v.weight, w["decoder_pred.weight"])
    assert torch.equal(model.decoder_pred_a.weight, w["decoder_pred.weight"][:256])
    assert torch.equal(model.decoder_blocks[0].mlp.fc1.weight, w["decoder_blocks.0.mlp.fc1.weight"])
    assert torch.equal(model.mask_token, w["mask_token"])
    assert sorted(report.missing_keys) == [
        "decoder_modality_a",
        "decoder_modality_v",
        "decoder_pos_embed_a",
        "encoder.modality_a",
        "encoder.modality_v",
        "encoder.pos_embed_a",
    ]


# --- loading: clips shorter than the checkpoint's (ESC-50's 5 s), audio positions cut in time -----


def position_table(bands, steps, dim):
    """(1, bands * steps, dim) frequency-major table whose channel 0 holds the row (band) and
    channel 1 the column (time step) of each position."""
    rows, cols = torch.meshgrid(torch.arange(bands), torch.arange(steps), indexing="ij")
    table = torch.zeros(bands, steps, dim)
    table[..., 0] = rows
    table[..., 1] = cols
    return table.reshape(1, bands * steps, dim)


@pytest.mark.parametrize("layout", ["ours", "official"])
def test_a_shorter_model_keeps_the_first_time_columns_of_the_audio_positions(layout):
    c = tiny_config()  # 128 mel bins / 16 = 8 bands, 64 frames / 16 = 4 time steps
    enc = position_table(8, 4, c.embed_dim)
    dec = position_table(8, 4, c.decoder_embed_dim) + 100
    if layout == "ours":
        state = {"encoder.pos_embed_a": enc, "decoder_pos_embed_a": dec}
    else:  # the official release: top-level positions, nn.DataParallel prefix
        state = {
            "module.pos_embed_a": enc,
            "module.decoder_pos_embed_a": dec,
            "module.blocks_u.0.norm1.weight": torch.ones(c.embed_dim),
        }
    model = tiny(audio_length=32)  # 2 time steps
    report = load_pretrained(model, state)
    assert "encoder.pos_embed_a" not in report.missing_keys
    assert "decoder_pos_embed_a" not in report.missing_keys
    assert not report.unexpected_keys
    for got, offset in ((model.encoder.pos_embed_a, 0), (model.decoder_pos_embed_a, 100)):
        got = got.detach().reshape(8, 2, -1)  # (bands, time steps, D)
        assert torch.equal(got[..., 0] - offset, torch.arange(8.0)[:, None].expand(8, 2))  # every band kept
        assert torch.equal(got[..., 1] - offset, torch.arange(2.0)[None, :].expand(8, 2))  # first 2 columns


def test_cutting_fixed_sincos_positions_gives_the_shorter_models_own_table():
    long = tiny()
    short = tiny(audio_length=16)
    load_pretrained(short, long.state_dict())
    fresh = tiny(audio_length=16)
    assert torch.equal(short.encoder.pos_embed_a, fresh.encoder.pos_embed_a)
    assert torch.equal(short.decoder_pos_embed_a, fresh.decoder_pos_embed_a)


def test_a_cut_checkpoint_runs_on_shorter_clips_in_the_classifier():
    long = tiny()
    clf = CAVMAEClassifier(tiny_config(audio_length=32), num_classes=3)
    report = load_pretrained(clf, long.state_dict())
    assert sorted(report.missing_keys) == HEAD_KEYS
    cut = long.encoder.pos_embed_a.reshape(1, 8, 4, -1)[:, :, :2].reshape(1, 16, -1)
    assert torch.equal(clf.encoder.pos_embed_a, cut)
    audio, image = inputs(clf.config)
    assert clf(audio, image).shape == (B, 3)


def test_a_checkpoint_with_other_mel_bands_is_a_clear_error_not_a_cut(tmp_path):
    # 8 bands x 4 steps (128 mel bins) must not be read as 4 bands x 8 steps and cut to 4 x 4
    state = tiny().state_dict()
    with pytest.raises(
        ValueError, match="the checkpoint has 8 x 4 audio positions .*, the model 4 x 4: only time can be cut"
    ):
        load_pretrained(tiny(num_mel_bins=64), state)
    path = tmp_path / "ckpt.pt"
    torch.save(dict(model=state, model_args=asdict(tiny_config())), path)
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {path}: encoder.pos_embed_a: ")):
        load_pretrained(tiny(num_mel_bins=64), path)


def test_the_checkpoints_own_mel_bins_let_a_shorter_model_of_other_bins_be_cut():
    long = tiny(num_mel_bins=64)  # 4 bands x 4 time steps
    checkpoint = dict(model=long.state_dict(), model_args=asdict(long.config))
    short = tiny(num_mel_bins=64, audio_length=32)
    load_pretrained(short, checkpoint)
    cut = long.encoder.pos_embed_a.reshape(1, 4, 4, -1)[:, :, :2].reshape(1, 8, -1)
    assert torch.equal(short.encoder.pos_embed_a, cut)


def test_a_model_longer_than_its_checkpoint_is_a_clear_error():
    with pytest.raises(
        ValueError,
        match="pos_embed_a: the checkpoint has 8 x 4 audio positions .*, the model 8 x 8: only time",
    ):
        load_pretrained(tiny(audio_length=128), tiny().state_dict())
