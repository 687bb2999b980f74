"""Specification of model.py: configuration, shapes, masking, attention, positions, losses,
per-block compilation, exactness to the golden vectors of the official release; of checkpoint.py's
reading of checkpoints (ours, the official release's, ImageNet MAE); and of bench.py at tiny scale
on the CPU."""

import copy
import json
import math
import os
import random
import re
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

import bench
import checkpoint
from checkpoint import CheckpointError, read_checkpoint, strip_key_prefixes
from model import (
    CAVMAE,
    FT_MODES,
    PRESETS,
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


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run far faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**overrides):
    torch.manual_seed(0)
    return CAVMAE(CAVMAEConfig.from_preset("tiny", **overrides))


def inputs(config, batch=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, config.audio_length, config.num_mel_bins, generator=g),
        torch.randn(batch, config.in_chans, config.img_size, config.img_size, generator=g),
    )


def load(golden, name):
    return torch.load(os.path.join(golden, "model", name), map_location="cpu", weights_only=False)


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


def test_from_preset_applies_overrides_and_rejects_unknown_names():
    cfg = CAVMAEConfig.from_preset("small", embed_dim=96)
    assert cfg.embed_dim == 96 and cfg.norm_pix_loss and cfg.audio_length == PRESETS["small"]["audio_length"]
    assert CAVMAEConfig.from_preset("base") == CAVMAEConfig()
    with pytest.raises(ValueError, match="unknown preset"):
        CAVMAEConfig.from_preset("huge")


def test_config_rejects_sizes_that_are_not_whole_patches():
    with pytest.raises(ValueError, match="audio_length=1000 is not a multiple of patch_size=16"):
        CAVMAEConfig(audio_length=1000)


def test_config_rejects_a_width_its_heads_do_not_divide_and_names_both_fields():
    with pytest.raises(
        ValueError, match="embed_dim=33 is not divisible by num_heads=12.*multiple of num_heads"
    ):
        CAVMAEConfig(embed_dim=33)
    with pytest.raises(ValueError, match="decoder_embed_dim=500 is not divisible by decoder_num_heads=16"):
        CAVMAEConfig(decoder_embed_dim=500)


def test_config_rejects_a_width_the_sincos_table_cannot_split():
    with pytest.raises(ValueError, match="embed_dim=30 is not a multiple of 4"):
        CAVMAEConfig(embed_dim=30, num_heads=3)


def test_config_rejects_sizes_and_depths_below_their_minimum():
    with pytest.raises(ValueError, match="num_heads=0: must be at least 1"):
        CAVMAEConfig(num_heads=0)
    with pytest.raises(ValueError, match="decoder_depth=-1: must be at least 0"):
        CAVMAEConfig(decoder_depth=-1)
    with pytest.raises(ValueError, match="mlp_ratio"):
        CAVMAEConfig(mlp_ratio=0.0)


def test_base_model_has_the_official_number_of_trainable_parameters():
    with torch.device("meta"):
        model, clf = CAVMAE(CAVMAEConfig()), CAVMAEClassifier(CAVMAEConfig(), num_classes=527)
    assert num_params(model) == 189_961_984  # fixed sin-cos positions are not trained
    assert num_params(clf) == 164_771_855  # the classifier trains its positions, as the official one does


def test_flops_per_sample_matches_the_hand_count_for_the_base_model():
    with torch.device("meta"):
        model = CAVMAE(CAVMAEConfig())
    assert model.flops_per_sample(0.75, 0.75) / 1e9 == pytest.approx(78, rel=0.01)  # docs/costs.md
    assert model.flops_per_sample(0.5, 0.5) > model.flops_per_sample(0.75, 0.75)


# --- shapes ---------------------------------------------------------------------------------------


def test_pretraining_forward_returns_losses_masks_and_predictions():
    model = tiny()
    c = model.config
    out = model(*inputs(c))
    La, Lv = (c.num_mel_bins // 16) * (c.audio_length // 16), (c.img_size // 16) ** 2
    assert out["mask_a"].shape == (B, La) and out["mask_v"].shape == (B, Lv)
    assert out["pred_a"].shape == (B, La, 16 * 16) and out["pred_v"].shape == (B, Lv, 16 * 16 * 3)
    for key in ("loss", "loss_mae", "loss_mae_a", "loss_mae_v", "loss_c", "contrastive_accuracy"):
        assert out[key].shape == () and torch.isfinite(out[key])
    assert torch.allclose(out["loss"], out["loss_mae_a"] + out["loss_mae_v"] + out["loss_c"])


def test_embed_returns_unmasked_tokens_per_modality_and_accepts_a_missing_one():
    model = tiny()
    audio, image = inputs(model.config)
    a, v = model.embed(audio, image)
    assert a.shape == (B, 32, 32) and v.shape == (B, 4, 32)
    a_only, none = model.embed(audio, None)
    assert none is None and torch.equal(a_only, a)


@pytest.mark.parametrize("mode", FT_MODES)
def test_classifier_gives_logits_in_every_mode(mode):
    torch.manual_seed(0)
    cfg = CAVMAEConfig.from_preset("tiny")
    clf = CAVMAEClassifier(cfg, num_classes=5)
    assert clf(*inputs(cfg), mode=mode).shape == (B, 5)


def test_classifier_rejects_an_unknown_mode():
    cfg = CAVMAEConfig.from_preset("tiny")
    with pytest.raises(ValueError, match="multimodal"):
        CAVMAEClassifier(cfg, 5)(*inputs(cfg), mode="bimodal")


def test_classifier_shares_the_pretraining_encoder_class():
    cfg = CAVMAEConfig.from_preset("tiny")
    assert type(CAVMAEClassifier(cfg, 3).encoder) is type(CAVMAE(cfg).encoder)
    assert isinstance(CAVMAEClassifier(cfg, 3).head[0], torch.nn.LayerNorm)


# --- patches and positions ------------------------------------------------------------------------


def test_audio_patch_targets_are_ordered_like_the_audio_tokens():
    model = tiny()
    enc, (audio, image) = model.encoder, inputs(model.config)
    w_a, w_v = enc.patch_embed_a.weight.flatten(1), enc.patch_embed_v.weight  # (D, p*p), (D, 3, p, p)
    tokens = enc.embed_audio(audio) - enc.pos_embed_a - enc.modality_a
    assert torch.allclose(tokens, model.patchify_audio(audio) @ w_a.T + enc.patch_embed_a.bias, atol=1e-5)
    w_v = w_v.permute(0, 2, 3, 1).flatten(1)  # patchify_image puts the channel last within a patch
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
    state, c = load(golden, "pretrain_state_dict.pth"), load(golden, "pretrain_vectors.pth")["config"]
    fa, ta, gv = 128 // 16, c["audio_length"] // 16, c["img_size"] // 16
    for dim, prefix in ((c["embed_dim"], "module."), (c["decoder_embed_dim"], "module.decoder_")):
        for ours, name in (
            (sincos_pos_embed(dim, fa, ta), "pos_embed_a"),
            (sincos_pos_embed(dim, gv, gv), "pos_embed_v"),
        ):
            residual = state[prefix + name][0] - ours
            assert residual.abs().max() < 0.12 and residual.std() < 0.025, prefix + name
            swapped = torch.cat([ours[:, dim // 2 :], ours[:, : dim // 2]], dim=1)
            assert (state[prefix + name][0] - swapped).abs().max() > 0.5


def test_positions_are_fixed_in_pretraining_and_trainable_in_the_classifier():
    cfg = CAVMAEConfig.from_preset("tiny")
    model, clf = CAVMAE(cfg), CAVMAEClassifier(cfg, 3)
    assert not model.encoder.pos_embed_a.requires_grad and not model.decoder_pos_embed_v.requires_grad
    assert clf.encoder.pos_embed_a.requires_grad and clf.encoder.pos_embed_v.requires_grad
    assert CAVMAE(CAVMAEConfig.from_preset("tiny", tr_pos=True)).encoder.pos_embed_a.requires_grad


# --- attention ------------------------------------------------------------------------------------


def test_attention_equals_the_explicit_softmax_formula():
    torch.manual_seed(0)
    attn, x = Attention(32, num_heads=4), torch.randn(2, 7, 32)
    q, k, v = attn.qkv(x).reshape(2, 7, 3, 4, 8).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-2, -1) / math.sqrt(8)).softmax(dim=-1)
    explicit = attn.proj((weights @ v).transpose(1, 2).reshape(2, 7, 32))
    assert torch.allclose(attn(x), explicit, atol=1e-6)


# --- masking --------------------------------------------------------------------------------------


def test_masking_keeps_int_L_times_one_minus_ratio_tokens_in_noise_order():
    noise = torch.rand(3, 10)
    tokens = torch.randn(3, 10, 4)
    kept, mask, restore = random_masking(tokens, noise, 0.75)
    assert kept.shape == (3, 2, 4) and torch.equal(mask.sum(1), torch.full((3,), 8.0))
    for i in range(3):
        lowest = noise[i].argsort()[:2]
        assert torch.equal(kept[i], tokens[i, lowest]) and mask[i, lowest].sum() == 0
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
    noise_a, noise_v = torch.rand(B, 32), torch.rand(B, 4)
    expected_a = torch.ones(B, 32).scatter_(1, noise_a.argsort(1)[:, :8], 0)
    expected_v = torch.ones(B, 4).scatter_(1, noise_v.argsort(1)[:, :2], 0)
    assert torch.equal(out["mask_a"], expected_a) and torch.equal(out["mask_v"], expected_v)


def test_each_sample_is_masked_independently():
    model = tiny(audio_length=256)
    out = model(*inputs(model.config, batch=8))
    assert len({tuple(m.tolist()) for m in out["mask_a"]}) == 8


def audio_mask(mode, ratio=0.75, **overrides):
    model = tiny(audio_length=256, **overrides)  # an 8 (frequency) x 16 (time) token grid
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
    assert "pred_a" not in out and out["loss_mae"] == 0 and out["loss_mae_a"] == 0 and out["loss_c"] > 0
    out["loss"].backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith(("decoder", "mask_token")))
    assert model.encoder.norm.weight.grad is None and model.encoder.norm_a.weight.grad is not None


def test_contrastive_weight_zero_skips_the_single_modality_streams():
    model = tiny()
    out = model(*inputs(model.config), contrastive_weight=0.0)
    assert (
        out["loss_c"] == 0 and out["contrastive_accuracy"] == 0 and torch.equal(out["loss"], out["loss_mae"])
    )
    out["loss"].backward()
    enc = model.encoder
    assert enc.norm_a.weight.grad is None and enc.norm_v.weight.grad is None
    assert (
        enc.joint_blocks[0].norm1_a.weight.grad is None and enc.joint_blocks[0].norm1.weight.grad is not None
    )


def test_both_weights_zero_is_an_error():
    model = tiny()
    with pytest.raises(ValueError, match="nothing to train"):
        model(*inputs(model.config), mae_weight=0.0, contrastive_weight=0.0)


def test_contrastive_loss_is_single_direction_over_the_audio_axis_by_default():
    torch.manual_seed(0)
    a, v = torch.randn(5, 8), torch.randn(5, 8)
    sim = F.normalize(a, dim=-1) @ F.normalize(v, dim=-1).T / 0.05
    loss, _ = contrastive_loss(a, v)
    assert torch.allclose(loss, F.cross_entropy(sim.T, torch.arange(5)))
    both, _ = contrastive_loss(a, v, bidirectional=True)
    assert torch.allclose(both, (loss + F.cross_entropy(sim, torch.arange(5))) / 2)
    _, acc = contrastive_loss(a, a)
    assert acc == 1


def test_contrastive_loss_and_its_gradient_stay_float32_under_bf16_autocast():
    torch.manual_seed(0)
    a, v = torch.randn(16, 64, requires_grad=True), torch.randn(16, 64)
    results = []
    for bf16 in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = contrastive_loss(a, v, bidirectional=True)
        results.append((loss, *torch.autograd.grad(loss, a)))
    (want, want_grad), (got, got_grad) = results
    assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=1e-6, atol=0)
    assert torch.allclose(got_grad, want_grad, rtol=1e-5, atol=1e-9)  # a bf16 product is off by ~1e-2


def test_gather_adds_other_clips_as_negatives():
    torch.manual_seed(0)
    a, v, others = torch.randn(3, 8), torch.randn(3, 8), torch.randn(5, 8)
    gather = lambda x: torch.cat([x, F.normalize(others, dim=-1)])
    loss, _ = contrastive_loss(a, v, gather=gather)
    expected, _ = contrastive_loss(torch.cat([a, others]), torch.cat([v, others]))
    assert torch.allclose(loss, expected)


def normalised_patches(patches):
    return (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6) ** 0.5


def test_norm_pix_loss_normalises_each_target_patch():
    model = tiny(norm_pix_loss=True)
    patches, mask = torch.randn(2, 5, 16) * 3 + 1, torch.ones(2, 5)
    assert model.forward_loss(patches, normalised_patches(patches), mask) < 1e-10


def test_mae_loss_averages_the_squared_error_over_the_masked_patches_only():
    model = tiny()
    patches, pred = torch.zeros(1, 2, 4), torch.tensor([[[1.0] * 4, [3.0] * 4]])
    assert model.forward_loss(patches, pred, torch.tensor([[0.0, 1.0]])) == 9.0


def test_prediction_to_input_space_inverts_the_norm_pix_target():
    patches = torch.randn(2, 5, 16) * 3 + 1
    model = tiny(norm_pix_loss=True)
    assert torch.allclose(
        model.prediction_to_input_space(normalised_patches(patches), patches), patches, atol=1e-5
    )
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
    assert torch.isfinite(out["loss"]) and out["pred_a"].dtype == torch.bfloat16
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# --- speed ----------------------------------------------------------------------------------------


def test_compiled_blocks_give_the_eager_masks_losses_and_gradients():
    """apply_compile changes speed, not results: masks drawn eagerly from the same seed, losses and
    gradients equal within float tolerance, the same state-dict keys (checkpoints as in eager mode).
    ~40 s of CPU compile."""
    torch._dynamo.reset()  # no graphs of other tests' shapes in the recompile limit
    eager = tiny(norm_pix_loss=True)
    compiled = apply_compile(copy.deepcopy(eager), fullgraph=True)  # a graph break in a block is an error
    audio, image = inputs(eager.config)
    outs = []
    for model in (eager, compiled):
        torch.manual_seed(3)
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


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_bench_times_training_steps_and_prints_one_row_per_configuration(dtype, capsys):
    rows = bench.main(
        [
            "--preset",
            "tiny",
            "--device",
            "cpu",
            "--modes",
            "eager",
            "--batch_sizes",
            "2,4",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--dtype",
            dtype,
        ]
    )
    assert [(r["mode"], r["batch"]) for r in rows] == [("eager", 2), ("eager", 4)]
    assert all(r["samples_per_s"] > 0 and math.isfinite(r["loss"]) and r["compile_s"] is None for r in rows)
    assert "| eager | 4 |" in capsys.readouterr().out


def test_bench_end_to_end_runs_train_py_on_generated_clips_next_to_the_bench_rate(tmp_path):
    argv = [
        "--e2e",
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--batch_size",
        "4",
        "--workers",
        "0",
        "--e2e_clips",
        "12",
        "--e2e_epochs",
        "2",
        "--e2e_data",
        str(tmp_path / "data"),
        "--e2e_out",
        str(tmp_path / "out"),
        "--steps",
        "2",
        "--warmup",
        "1",
    ]
    (row,) = bench.main(argv)
    assert row["mode"] == "eager" and row["e2e_epochs"] == 2 and row["e2e_samples_per_s"] > 0
    assert row["ratio"] == pytest.approx(row["e2e_samples_per_s"] / row["samples_per_s"])
    assert len(os.listdir(tmp_path / "data")) == 1 and len(os.listdir(tmp_path / "out")) == 1


def test_bench_end_to_end_rate_averages_epoch_records_after_the_first(tmp_path):
    log = tmp_path / "log.jsonl"
    records = [
        dict(split="train", samples_per_s=1.0),
        dict(split="epoch", epoch=1, samples_per_s=10.0),
        dict(split="epoch", epoch=2, samples_per_s=20.0),
        dict(split="epoch", epoch=3, samples_per_s=40.0),
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert bench.epoch_rate(log) == (30.0, 3)  # the train record and the first epoch (compilation) left out


# --- checkpoints ----------------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path):
    model = tiny()
    path = tmp_path / "ckpt.pt"  # a pathlib.Path works as well as a str
    torch.save(dict(model=model.state_dict(), model_args=asdict(model.config), iter_num=3), path)
    fresh = CAVMAE(CAVMAEConfig(**torch.load(path, weights_only=False)["model_args"]))
    report = load_pretrained(fresh, path)
    assert report.source_format == "ours" and not report.missing and not report.ignored
    audio, image = inputs(model.config)
    torch.manual_seed(0)
    want = model(audio, image)
    torch.manual_seed(0)
    got = fresh(audio, image)
    assert torch.equal(got["loss"], want["loss"]) and torch.equal(got["pred_v"], want["pred_v"])


def test_pretraining_checkpoint_loads_into_the_classifier_without_decoder():
    model = tiny()
    clf = CAVMAEClassifier(model.config, num_classes=3)
    report = load_pretrained(clf, {"module." + k: v for k, v in model.state_dict().items()})
    assert any(k.startswith("decoder_blocks.") for k in report.ignored) and "mask_token" in report.ignored
    assert sorted(report.missing) == ["head.0.bias", "head.0.weight", "head.1.bias", "head.1.weight"]
    assert torch.equal(
        clf.encoder.audio_blocks[0].attn.qkv.weight, model.encoder.audio_blocks[0].attn.qkv.weight
    )


def test_shape_mismatch_is_a_clear_error():
    state = tiny().state_dict()
    with pytest.raises(ValueError, match="pos_embed_a: checkpoint"):
        load_pretrained(tiny(audio_length=128), state)


def test_unrecognised_checkpoint_is_a_clear_error():
    with pytest.raises(ValueError, match="unrecognised checkpoint format"):
        load_pretrained(tiny(), {"weight": torch.zeros(1)})


def test_an_unrecognised_checkpoint_file_is_a_checkpoint_error_naming_the_file(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(1)}, path)
    expected = re.escape(f"checkpoint {path}: unrecognised checkpoint format")
    with pytest.raises(CheckpointError, match=expected):
        load_pretrained(tiny(), str(path))
    with pytest.raises(CheckpointError, match=expected):  # a dict read from that file, as train.py does
        checkpoint.load_pretrained(tiny(), read_checkpoint(path), path=str(path))


def test_wrapper_prefixes_of_data_parallel_and_compile_are_stripped_by_one_rule():
    state = {"module._orig_mod.encoder.norm.weight": 1, "_orig_mod.module.mask_token": 2, "head.1.bias": 3}
    assert strip_key_prefixes(state) == {"encoder.norm.weight": 1, "mask_token": 2, "head.1.bias": 3}


def test_a_compiled_whole_model_checkpoint_loads():
    model = tiny()
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}  # torch.compile(model).state_dict()
    report = load_pretrained(tiny(), state)
    assert report.source_format == "ours" and not report.missing and not report.ignored


def test_reading_a_missing_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "nowhere.pt"
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {path} does not exist")):
        read_checkpoint(path)


@pytest.mark.parametrize(
    "content, what",
    [(b"", "an empty file"), (b"lr = 0.1\n", "a text file"), (bytes(range(256)) * 4, "binary data")],
    ids=["empty", "text", "random-bytes"],
)
def test_reading_a_file_that_is_not_a_checkpoint_names_the_file_and_what_it_holds(tmp_path, content, what):
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    expected = re.escape(f"checkpoint {path} is not a PyTorch checkpoint (") + f".*{what}"
    with pytest.raises(CheckpointError, match=expected):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="weights.pt"):
        load_pretrained(tiny(), str(path))


def test_reading_a_pickled_object_that_is_not_a_dict_is_a_clear_error(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2], path)
    with pytest.raises(CheckpointError, match="holds a list, not a checkpoint dict"):
        read_checkpoint(path)


def test_a_checkpoint_error_is_a_config_error():
    from configurator import ConfigError

    assert issubclass(CheckpointError, ConfigError) and issubclass(CheckpointError, ValueError)


def mae_state_dict(config, depth=2):
    """A synthetic ImageNet MAE checkpoint in the published format, sized for `config`."""
    torch.manual_seed(0)
    D, Dd, p = config.embed_dim, config.decoder_embed_dim, config.patch_size
    Lv = (config.img_size // p) ** 2
    block = lambda prefix, w: (
        {
            f"{prefix}.{k}": torch.randn(v.shape)
            for k, v in CAVMAE(config).encoder.audio_blocks[0].state_dict().items()
        }
        if w == D
        else {
            f"{prefix}.{k}": torch.randn(v.shape)
            for k, v in CAVMAE(config).decoder_blocks[0].state_dict().items()
        }
    )
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
        state.update(block(f"blocks.{i}", D))
    state.update(block("decoder_blocks.0", Dd))
    return {"model": state}


def test_imagenet_mae_checkpoint_maps_as_the_official_adaptation():
    model = tiny()
    mae = mae_state_dict(model.config)
    w = mae["model"]
    report = load_pretrained(model, mae)
    enc = model.encoder
    assert report.source_format == "imagenet-mae" and report.ignored == ["cls_token"]
    assert torch.equal(enc.audio_blocks[0].attn.qkv.weight, w["blocks.0.attn.qkv.weight"])
    assert torch.equal(enc.visual_blocks[0].mlp.fc2.bias, w["blocks.0.mlp.fc2.bias"])
    joint = enc.joint_blocks[0]
    assert torch.equal(joint.attn.proj.weight, w["blocks.1.attn.proj.weight"])
    for name in ("norm1", "norm1_a", "norm1_v"):
        assert torch.equal(getattr(joint, name).weight, w["blocks.1.norm1.weight"])
    for name in ("norm2", "norm2_a", "norm2_v"):
        assert torch.equal(getattr(joint, name).bias, w["blocks.1.norm2.bias"])
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
    assert sorted(report.missing) == [
        "decoder_modality_a",
        "decoder_modality_v",
        "decoder_pos_embed_a",
        "encoder.modality_a",
        "encoder.modality_v",
        "encoder.pos_embed_a",
    ]


# --- exactness against the official release (tests/golden) ----------------------------------------


def test_official_pretraining_checkpoint_reproduces_the_golden_outputs(golden):
    vec, state = load(golden, "pretrain_vectors.pth"), load(golden, "pretrain_state_dict.pth")
    model = CAVMAE(golden_config(vec["config"])).eval()
    report = load_pretrained(model, state)
    assert report.source_format == "official" and not report.missing
    assert all("norm1_a" in k or "norm1_v" in k or "norm2_" in k for k in report.ignored)
    assert "per-modality norms" in str(report)
    with torch.no_grad():
        a, v = model.embed(vec["audio"], vec["image"])
        assert torch.allclose(a, vec["feat_audio"], atol=2e-4) and torch.allclose(
            v, vec["feat_visual"], atol=2e-4
        )
        for key, ratio in (("forward_mr0.75", 0.75), ("forward_mr0.5", 0.5)):
            ref = vec[key]
            torch.manual_seed(ref["seed"])
            out = model(vec["audio"], vec["image"], mask_ratio_a=ratio, mask_ratio_v=ratio)
            assert torch.equal(out["mask_a"], ref["mask_a"]) and torch.equal(out["mask_v"], ref["mask_v"])
            for name in ("loss", "loss_mae_a", "loss_mae_v", "loss_c"):
                assert torch.allclose(out[name], ref[name], atol=1e-4), name
            assert torch.allclose(out["contrastive_accuracy"], ref["c_acc"], atol=1e-4)  # the official name
        torch.manual_seed(vec["inpaint"]["seed"])
        out = model(vec["audio"], vec["image"])
        assert torch.allclose(out["pred_a"], vec["inpaint"]["pred_a"], atol=2e-4)
        assert torch.allclose(out["pred_v"], vec["inpaint"]["pred_v"], atol=2e-4)
        for direction, bidirectional in (("contrastive_single", False), ("contrastive_bidirectional", True)):
            loss, acc = contrastive_loss(a.mean(1), v.mean(1), bidirectional)
            assert torch.allclose(loss, vec[direction][0], atol=1e-4) and acc == vec[direction][1]


def test_official_finetuned_checkpoint_reproduces_the_golden_logits_in_every_mode(golden):
    vec, state = load(golden, "finetune_vectors.pth"), load(golden, "finetune_state_dict.pth")
    clf = CAVMAEClassifier(golden_config(vec["config"], pretrain=False), vec["config"]["label_dim"]).eval()
    state = {k.removeprefix("module."): v for k, v in state.items()}  # also loads without the prefix
    assert not load_pretrained(clf, state).missing
    with torch.no_grad():
        for mode in FT_MODES:
            assert torch.allclose(clf(vec["audio"], vec["image"], mode), vec["logits_" + mode], atol=2e-4), (
                mode
            )
        a, v = clf.embed(vec["audio"], vec["image"])
        assert torch.allclose(a, vec["feat_audio"], atol=2e-4) and torch.allclose(
            v, vec["feat_visual"], atol=2e-4
        )


def test_official_contrastive_quirk_only_matters_with_several_joint_blocks():
    audio, image = inputs(CAVMAEConfig.from_preset("tiny"))
    losses = {}
    for depth in (1, 2):
        for quirk in (True, False):
            model = tiny(joint_depth=depth, official_contrastive_streams=quirk)
            torch.manual_seed(0)
            losses[depth, quirk] = model(audio, image)["loss_c"]
    assert torch.equal(losses[1, True], losses[1, False]) and not torch.equal(
        losses[2, True], losses[2, False]
    )


# --- clips shorter than the checkpoint's (ESC-50's 5 s): audio position tables cut in time ---------


def position_table(bands, steps, dim):
    """(1, bands * steps, dim) frequency-major table whose channel 0 holds the row (band) and
    channel 1 the column (time step) of each position."""
    rows, cols = torch.meshgrid(torch.arange(bands), torch.arange(steps), indexing="ij")
    table = torch.zeros(bands, steps, dim)
    table[..., 0], table[..., 1] = rows, cols
    return table.reshape(1, bands * steps, dim)


@pytest.mark.parametrize("layout", ["ours", "official"])
def test_a_shorter_model_keeps_the_first_time_columns_of_the_audio_positions(layout):
    c = CAVMAEConfig.from_preset("tiny")  # 128 mel bins / 16 = 8 bands, 64 frames / 16 = 4 time steps
    enc, dec = position_table(8, 4, c.embed_dim), position_table(8, 4, c.decoder_embed_dim) + 100
    if layout == "ours":
        state = {"encoder.pos_embed_a": enc, "decoder_pos_embed_a": dec}
    else:  # the official release: top-level positions, nn.DataParallel prefix
        state = {
            "module.pos_embed_a": enc,
            "module.decoder_pos_embed_a": dec,
            "module.blocks_a.0.norm1.weight": torch.ones(c.embed_dim),
        }
    model = tiny(audio_length=32)  # 2 time steps
    report = load_pretrained(model, state)
    assert report.source_format == layout
    for got, offset in ((model.encoder.pos_embed_a, 0), (model.decoder_pos_embed_a, 100)):
        got = got.detach().reshape(8, 2, -1)  # (bands, time steps, D)
        assert torch.equal(got[..., 0] - offset, torch.arange(8.0)[:, None].expand(8, 2))  # every band kept
        assert torch.equal(got[..., 1] - offset, torch.arange(2.0)[None, :].expand(8, 2))  # first 2 columns
    assert "encoder.pos_embed_a: audio positions cut from 8x4 to 8x2 time steps" in str(report)
    assert "decoder_pos_embed_a: audio positions cut from 8x4 to 8x2 time steps" in str(report)


def test_cutting_fixed_sincos_positions_gives_the_shorter_models_own_table():
    long, short = tiny(), tiny(audio_length=16)
    load_pretrained(short, long.state_dict())
    fresh = tiny(audio_length=16)
    assert torch.equal(short.encoder.pos_embed_a, fresh.encoder.pos_embed_a)
    assert torch.equal(short.decoder_pos_embed_a, fresh.decoder_pos_embed_a)


def test_a_cut_checkpoint_runs_on_shorter_clips_in_the_classifier():
    clf = CAVMAEClassifier(CAVMAEConfig.from_preset("tiny", audio_length=32), num_classes=3)
    report = load_pretrained(clf, tiny().state_dict())
    assert report.adapted == ["encoder.pos_embed_a: audio positions cut from 8x4 to 8x2 time steps"]
    audio, image = inputs(clf.config)
    assert clf(audio, image).shape == (B, 3)


def test_a_model_longer_than_its_checkpoint_is_a_clear_error():
    with pytest.raises(ValueError, match="checkpoint has 4 audio time steps .* the model 8: .* not longer"):
        load_pretrained(tiny(audio_length=128), tiny().state_dict())
