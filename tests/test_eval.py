"""eval.py: metrics equal to scikit-learn / the official retrieval script, loading checkpoints, each command
end to end on a tiny synthetic set, and how localize scores its heat maps."""

import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import TINY

import data
import eval as ev
import prepare
from model import CAVMAE, CAVMAEClassifier, CAVMAEConfig, pooled_representation

# -----------------------------------------------------------------------------
# classification metrics


def test_metrics_match_golden_vectors(golden):
    d = np.load(os.path.join(golden, "metrics", "metric_inputs.npz"))
    want = json.load(open(os.path.join(golden, "metrics", "metric_values.json")))
    got = ev.classification_metrics(d["score"], d["target"])
    np.testing.assert_allclose(got["AP"], want["ap"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(got["AUC"], want["auc"], rtol=0, atol=1e-12)
    for key in ("mAP", "mAUC", "d_prime"):
        assert got[key] == pytest.approx(want[key], abs=1e-12)
    single = ev.classification_metrics(d["logits"], np.eye(d["logits"].shape[1])[d["single"]])
    assert single["acc"] == pytest.approx(want["accuracy"], abs=1e-12)


def test_tied_scores_share_one_threshold():
    y = np.array([1.0, 0, 1, 0])
    s = np.array([0.5, 0.5, 0.5, 0.1])
    # one step: precision 2/3, recall 0 -> 1
    assert ev.average_precision(y, s) == pytest.approx(2 / 3, abs=1e-15)
    assert ev.roc_auc(y, s) == pytest.approx(0.75, abs=1e-15)  # a tie counts one half


def test_ties_are_taken_in_the_scores_own_dtype():
    y = torch.tensor([[1.0], [0.0]])
    s = torch.tensor([[1.0], [1.0001]])  # distinct in float32, equal in float16
    assert ev.classification_metrics(s, y)["mAUC"] == 0.0
    assert ev.classification_metrics(s.half(), y)["mAUC"] == 0.5


def test_perfect_and_reversed_rankings():
    y = np.array([1.0, 1, 0, 0])
    assert ev.average_precision(y, np.array([0.9, 0.8, 0.2, 0.1])) == 1.0
    assert ev.roc_auc(y, np.array([0.9, 0.8, 0.2, 0.1])) == 1.0
    # reversed: the positives come 3rd and 4th -> AP = 1/2 * 1/3 + 1/2 * 2/4
    assert ev.average_precision(y, np.array([0.1, 0.2, 0.8, 0.9])) == pytest.approx(5 / 12, abs=1e-15)
    assert ev.roc_auc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 0.0


def test_class_without_positives_has_ap_zero_auc_nan_and_is_left_out_of_mauc():
    targets = np.array([[1, 0], [0, 0], [1, 0], [0, 0]], dtype=float)
    scores = np.array([[0.9, 0.3], [0.1, 0.2], [0.8, 0.5], [0.2, 0.4]])
    m = ev.classification_metrics(scores, targets)
    assert m["AP"] == [1.0, 0.0]  # sklearn >= 1.1: no positives -> 0, and mAP averages it in
    assert m["mAP"] == 0.5
    assert m["AUC"][0] == 1.0
    assert math.isnan(m["AUC"][1])  # sklearn 1.9: NaN
    assert m["mAUC"] == 1.0
    assert m["d_prime"] == math.inf  # the mean over classes with a defined AUC


def test_d_prime_is_sqrt2_times_the_normal_quantile_of_the_mean_auc():
    assert ev.d_prime(0.5) == 0.0
    assert ev.d_prime(0.8413447460685429) == pytest.approx(math.sqrt(2), abs=1e-12)  # Phi(1)
    m = ev.classification_metrics(
        np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.3]]), np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    )
    assert m["d_prime"] == pytest.approx(ev.d_prime(m["mAUC"]), abs=0)


def test_accuracy_compares_first_argmax_indices():
    targets = np.eye(3)[[0, 1, 2]]
    scores = np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.1, 0.2, 0.9]])  # ties -> index 0
    assert ev.classification_metrics(scores, targets)["acc"] == pytest.approx(2 / 3)


def test_bad_metric_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="0/1"):
        ev.classification_metrics(np.zeros((2, 2)), np.full((2, 2), 0.9))
    with pytest.raises(ValueError, match="NaN"):
        ev.classification_metrics(np.array([[np.nan], [0.0]]), np.array([[1.0], [0.0]]))
    with pytest.raises(ValueError, match="square"):
        ev.retrieval_metrics(np.zeros((2, 3)))


# -----------------------------------------------------------------------------
# retrieval metrics


def test_retrieval_ranks_are_positions_in_the_sorted_row():
    # the match of query i sits at rank r_i = (i - perm[i]) % N + 1, no ties
    perm = np.array([0, 3, 1, 2, 5, 4, 6])
    N = len(perm)
    j = np.arange(N)
    sim = -((j[None, :] - perm[:, None]) % N).astype(float)  # row i peaks at column perm[i]
    ranks = (j - perm) % N + 1
    r = ev.retrieval_metrics(sim)
    assert r["R1"] == np.mean(ranks == 1)
    assert r["R5"] == np.mean(ranks <= 5)
    assert r["R10"] == 1.0
    assert r["MR"] == np.median(ranks)


def test_retrieval_counts_a_tied_match_at_every_tied_position():
    # queries 2 and 3 find the wrong clip; their match ties with 2 others at 0
    sim = np.eye(4)[:, [0, 1, 3, 2]]
    r = ev.retrieval_metrics(sim)  # ranks (0-based): 0, 0, 1 2 3, 1 2 3 -> 8 entries, as the official script
    assert r == dict(R1=0.25, R5=1.0, R10=1.0, MR=2.5)
    assert ev.retrieval_metrics(np.ones((4, 4)))["R1"] == 0.25  # a collapsed model scores chance, not 1.0


def test_retrieval_matches_golden_vectors(golden):
    d = np.load(os.path.join(golden, "metrics", "metric_inputs.npz"))
    want = json.load(open(os.path.join(golden, "metrics", "metric_values.json")))
    a = d["emb_a"] / np.linalg.norm(d["emb_a"], axis=1, keepdims=True)
    v = d["emb_v"] / np.linalg.norm(d["emb_v"], axis=1, keepdims=True)
    assert ev.retrieval_metrics(a @ v.T) == pytest.approx(want["retrieval_audio_to_visual"], abs=1e-12)


def labelled_set(tmp_path, labels):
    """A datafile whose clips have these labels (per_class_subset reads no audio or frames)."""
    rows = [
        dict(video_id=f"v{i}", wav="none.wav", video_path=".", labels=label) for i, label in enumerate(labels)
    ]
    json.dump({"data": rows}, open(tmp_path / "labels.json", "w"))
    return data.AVDataset(str(tmp_path / "labels.json"), None)


def test_per_class_subset_takes_k_clips_of_each_class_by_first_label(tmp_path):
    labels = ["a", "a", "b,a", "a", "c", "b", "", "a,c"]  # clip 6 has no label: left out
    keep = ev.per_class_subset(labelled_set(tmp_path, labels), 2, seed=0)
    assert keep == sorted(keep)
    firsts = [labels[i].split(",")[0] for i in keep]
    assert sorted(firsts) == ["a", "a", "b", "b", "c"]  # c has only one clip: taken


def test_per_class_subset_is_deterministic_for_a_seed_and_differs_between_seeds(tmp_path):
    ds = labelled_set(tmp_path, [f"/m/{k % 10}" for k in range(100)])
    assert ev.per_class_subset(ds, 3, seed=1) == ev.per_class_subset(ds, 3, seed=1)
    assert ev.per_class_subset(ds, 3, seed=1) != ev.per_class_subset(ds, 3, seed=2)


# -----------------------------------------------------------------------------
# checkpoints: ours and the official release's

CLASSES = 3
CLIPS = 6
SETTINGS = dict(dataset_mean=-5.0, dataset_std=4.5, ftmode="multimodal", mask_ratio=0.5, metric="acc")


def save_checkpoint(path, model, task, num_classes, settings):
    """A checkpoint as train.py writes one (eval reads no optimizer or rng state)."""
    model_args = dataclasses.asdict(model.config)
    ckpt = dict(model=model.state_dict(), model_args=model_args, task=task, num_classes=num_classes)
    torch.save(dict(ckpt, config=settings), path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Six synthetic test clips of 3 classes (32 px frames, 0.7 s), a tiny pretrained model and a tiny
    classifier trained on nothing."""
    root = tmp_path_factory.mktemp("eval")
    data_dir = root / "data"
    prepare.make_synthetic(
        str(data_dir), 0, CLIPS, image_size=32, seconds=0.7, num_classes=CLASSES, workers=1
    )
    settings = dict(SETTINGS, label_csv=str(data_dir / "labels.csv"))
    torch.manual_seed(0)
    save_checkpoint(root / "pretrain.pt", CAVMAE(CAVMAEConfig(**TINY)), "pretrain", None, settings)
    classifier = CAVMAEClassifier(CAVMAEConfig(**TINY), CLASSES)
    save_checkpoint(root / "finetune.pt", classifier, "finetune", CLASSES, settings)
    return root


def test_load_model_rebuilds_our_checkpoint_in_eval_mode_with_its_task_and_settings(tiny):
    model, info = ev.load_model(str(tiny / "finetune.pt"))
    saved = torch.load(tiny / "finetune.pt", weights_only=False)
    assert isinstance(model, CAVMAEClassifier)
    assert not model.training
    assert info == dict(task="finetune", num_classes=CLASSES, config=saved["config"])
    assert torch.equal(model.head[1].weight, saved["model"]["head.1.weight"])


def golden_config(c, **overrides):
    """The architecture of the official checkpoints in tests/golden, standing in for the paper's."""
    fields = {k: v for k, v in c.items() if k in CAVMAEConfig.__dataclass_fields__}
    return CAVMAEConfig(**fields, joint_depth=12 - c["modality_specific_depth"], **overrides)


def test_load_model_reads_an_official_pretrained_state_dict_with_module_prefixes(golden, monkeypatch):
    vectors = torch.load(os.path.join(golden, "model", "pretrain_vectors.pth"), weights_only=False)
    monkeypatch.setattr(ev, "CAVMAEConfig", lambda **kw: golden_config(vectors["config"], **kw))
    model, info = ev.load_model(os.path.join(golden, "model", "pretrain_state_dict.pth"))
    assert info == dict(task="pretrain", num_classes=None, config={})
    with torch.no_grad():
        audio, visual = model.encoder.embed(vectors["audio"], vectors["image"])
    assert (audio - vectors["feat_audio"]).abs().max() < 2e-4
    assert (visual - vectors["feat_visual"]).abs().max() < 2e-4


def test_load_model_takes_an_official_state_dict_with_a_head_for_a_classifier(golden, monkeypatch):
    vectors = torch.load(os.path.join(golden, "model", "finetune_vectors.pth"), weights_only=False)
    monkeypatch.setattr(ev, "CAVMAEConfig", lambda **kw: golden_config(vectors["config"], **kw))
    model, info = ev.load_model(os.path.join(golden, "model", "finetune_state_dict.pth"), task="finetune")
    assert info == dict(task="finetune", num_classes=7, config={})
    with torch.no_grad():
        logits = model(vectors["audio"], vectors["image"], "audioonly")
    assert (logits - vectors["logits_audioonly"]).abs().max() < 2e-4


def test_load_model_refuses_a_checkpoint_of_the_wrong_task_and_says_what_is_needed(tiny):
    with pytest.raises(ValueError, match=r"pretrain\.pt holds a pretrain model; .* needs a fine-tuned"):
        ev.load_model(str(tiny / "pretrain.pt"), task="finetune")
    with pytest.raises(ValueError, match=r"finetune\.pt holds a finetune model; .* needs a pretrained"):
        ev.load_model(str(tiny / "finetune.pt"), task="pretrain")


def test_load_model_names_the_file_whose_weights_are_missing(tiny, tmp_path):
    ckpt = torch.load(tiny / "pretrain.pt", weights_only=False)
    del ckpt["model"]["decoder_norm.weight"]
    torch.save(ckpt, tmp_path / "cut.pt")
    with pytest.raises(ValueError, match=r"cut\.pt lacks 1 of the model's weights: decoder_norm\.weight"):
        ev.load_model(str(tmp_path / "cut.pt"))


def test_load_model_names_a_file_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.pt").write_text("not weights\n")
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*notes\.pt"):
        ev.load_model(str(tmp_path / "notes.pt"))


def test_audio_length_loads_a_model_for_shorter_clips_with_the_first_audio_positions(tiny):
    model, _ = ev.load_model(str(tiny / "pretrain.pt"), audio_length=32)  # 8 x 2 audio patches, not 8 x 4
    saved = torch.load(tiny / "pretrain.pt", weights_only=False)["model"]["encoder.pos_embed_a"]
    assert model.config.audio_length == 32
    want = saved.reshape(1, 8, 4, -1)[:, :, :2].reshape(1, 16, -1)
    assert torch.equal(model.encoder.pos_embed_a, want)


# -----------------------------------------------------------------------------
# embeddings and predictions


def whole_batch(tiny, **options):
    """All clips as one batch, as eval reads them for the tiny checkpoints (their sizes, fbank mean and std)."""
    datafile = str(tiny / "data" / "test.json")
    sizes = dict(target_length=TINY["audio_length"], image_size=TINY["img_size"])
    fbank = dict(mean=SETTINGS["dataset_mean"], std=SETTINGS["dataset_std"])
    ds = data.AVDataset(datafile, str(tiny / "data" / "labels.csv"), **sizes, **fbank, raw=True, **options)
    return next(data.batches(ds, CLIPS, "cpu"))


def test_embeddings_are_the_unit_pooled_coordinated_tokens_in_dataset_order(tiny):
    model, info = ev.load_model(str(tiny / "pretrain.pt"))
    ds = ev.open_dataset(model, info, str(tiny / "data" / "test.json"))
    audio, visual = ev.embeddings(model, ds, batch_size=4)  # two batches
    with torch.no_grad():
        tokens_a, tokens_v = model.encoder.embed(*whole_batch(tiny)[:2])
    assert audio.dtype == visual.dtype == torch.float32
    assert torch.allclose(audio, tokens_a.mean(1) / tokens_a.mean(1).norm(dim=1, keepdim=True), atol=1e-5)
    assert torch.allclose(visual, tokens_v.mean(1) / tokens_v.mean(1).norm(dim=1, keepdim=True), atol=1e-5)


def test_predict_gives_the_classifiers_logits_and_the_targets_at_the_datasets_frame(tiny):
    model, info = ev.load_model(str(tiny / "finetune.pt"))
    ds = ev.open_dataset(model, info, str(tiny / "data" / "test.json"), str(tiny / "data" / "labels.csv"))
    ds.frame = 2
    logits, targets = ev.predict(model, ds, "audioonly", batch_size=4)
    audio, image, labels = whole_batch(tiny, frame=2)
    with torch.no_grad():
        assert torch.allclose(logits, model(audio, image, "audioonly"), atol=1e-5)
    assert torch.equal(targets, labels)


# -----------------------------------------------------------------------------
# the commands end to end


def run(tiny, command, checkpoint, *flags):
    """eval.py COMMAND on the tiny test clips; checkpoint: a path, or a name in the tiny folder."""
    argv = [command, "--checkpoint", str(tiny / checkpoint), "--data", str(tiny / "data" / "test.json")]
    return ev.main(argv + [str(flag) for flag in flags])


def test_classify_scores_the_middle_frame_and_the_softmax_mean_over_the_frames(tiny):
    results = run(tiny, "classify", "finetune.pt", "--out", tiny / "classify")  # label csv: the checkpoint's
    model, info = ev.load_model(str(tiny / "finetune.pt"))
    ds = ev.open_dataset(model, info, str(tiny / "data" / "test.json"), str(tiny / "data" / "labels.csv"))
    logits = []
    for k in range(10):
        ds.frame = k
        frame_logits, targets = ev.predict(model, ds)
        logits.append(frame_logits)
    probs = torch.stack(logits).softmax(-1)  # the checkpoint says metric='acc'
    assert results["activation"] == "softmax"
    summary = ["mAP", "mAUC", "d_prime", "acc"]
    middle_frame = ev.classification_metrics(logits[5], targets)
    all_frames = ev.classification_metrics(probs.mean(0), targets)
    assert {key: results[key] for key in summary} == {key: middle_frame[key] for key in summary}
    assert {key: results[f"{key}_frames"] for key in summary} == {key: all_frames[key] for key in summary}
    written = json.load(open(tiny / "classify" / "classify.json"))
    assert written["mAP_frames"] == results["mAP_frames"]


def test_classify_averages_sigmoids_over_the_frames_after_an_map_run(tiny, tmp_path):
    ckpt = torch.load(tiny / "finetune.pt", weights_only=False)
    ckpt["config"]["metric"] = "mAP"
    torch.save(ckpt, tmp_path / "map.pt")
    results = run(tiny, "classify", tmp_path / "map.pt")
    model, info = ev.load_model(str(tmp_path / "map.pt"))
    ds = ev.open_dataset(model, info, str(tiny / "data" / "test.json"), str(tiny / "data" / "labels.csv"))
    probs = []
    for k in range(10):
        ds.frame = k
        logits, targets = ev.predict(model, ds)
        probs.append(logits.sigmoid())
    assert results["activation"] == "sigmoid"
    want = ev.classification_metrics(torch.stack(probs).mean(0), targets)
    assert results["mAP_frames"] == want["mAP"]


def test_retrieval_reports_both_directions_of_the_embeddings_cosine(tiny):
    results = run(tiny, "retrieval", "pretrain.pt", "--out", tiny / "retrieval")
    model, info = ev.load_model(str(tiny / "pretrain.pt"))
    audio, visual = ev.embeddings(model, ev.open_dataset(model, info, str(tiny / "data" / "test.json")))
    a2v = ev.retrieval_metrics(audio.double() @ visual.double().T)
    v2a = ev.retrieval_metrics(visual.double() @ audio.double().T)
    assert {k: results[f"a2v_{k}"] for k in a2v} == a2v and {k: results[f"v2a_{k}"] for k in v2a} == v2a
    assert json.load(open(tiny / "retrieval" / "retrieval.json")) == results


def test_retrieval_per_class_ranks_among_k_clips_of_each_class(tiny):
    assert run(tiny, "retrieval", "finetune.pt", "--per_class", 1)["clips"] == CLASSES


def test_inpaint_masks_the_checkpoints_mask_ratio_by_default(tiny):
    results = run(tiny, "inpaint", "pretrain.pt", "--out", tiny / "inpaint", "--pictures", 1)
    assert results["mask_ratio"] == 0.5
    assert results["masked_audio"] == 0.5  # not the paper's 0.75
    results = run(
        tiny, "inpaint", "pretrain.pt", "--out", tiny / "inpaint", "--mask_ratio", 0.75, "--pictures", 1
    )
    assert results["masked_audio"] == 0.75


def test_inpaint_draws_a_picture_of_each_of_the_first_clips(tiny):
    run(tiny, "inpaint", "pretrain.pt", "--out", tiny / "inpaint2", "--pictures", 2)
    assert sorted(os.listdir(tiny / "inpaint2")) == ["test_00000.png", "test_00001.png"]


def test_embed_writes_the_embeddings_and_video_ids_in_dataset_order(tiny):
    results = run(tiny, "embed", "finetune.pt", "--out", tiny / "embeddings.npz")
    written = np.load(tiny / "embeddings.npz")
    assert list(written["video_ids"]) == [f"test_{k:05d}" for k in range(CLIPS)]
    assert np.array_equal(written["audio"], results["audio"].numpy())
    assert written["visual"].shape == (CLIPS, TINY["embed_dim"])


def test_a_command_error_prints_one_line_and_exits_with_status_1(tiny, capsys):
    with pytest.raises(SystemExit) as exit:
        run(tiny, "classify", "pretrain.pt")
    assert exit.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tiny / 'pretrain.pt'} holds a pretrain model; this command needs a fine-tuned classifier"
    ]


@pytest.mark.parametrize("argv", [[], ["classify"], ["retrieval"], ["inpaint"], ["embed"], ["localize"]])
def test_help_prints_the_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        ev.main([*argv, "--help"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.startswith("usage: ")


# -----------------------------------------------------------------------------
# localisation


def test_contribution_map_is_each_patch_tokens_dot_product_with_the_audio_direction():
    audio = torch.tensor([[2.0, 0]])
    visual = torch.tensor([[[2.0, 0], [1, 1], [0, 5], [-1, 0]]])
    assert torch.allclose(ev.heat_map(audio, visual), torch.tensor([[4.0, 2, 0, -2]]))


def test_pointing_game_scores_a_peak_on_a_sounding_object_and_distractors_on_a_silent_one():
    maps = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.9, 0.0], [0.0, 0.1, 0.9]])  # peaks: patches 0, 1, 2
    sounding = torch.tensor([[True, False, False], [True, False, False], [False, False, False]])
    silent = torch.tensor([[False, True, False], [False, True, False], [False, False, False]])
    scores = ev.pointing_scores(maps, maps, sounding, silent)
    assert scores["pointing_game"] == pytest.approx(1 / 3)  # clip 0
    assert scores["distractor_rate"] == pytest.approx(1 / 3)  # clip 1
    assert scores["chance"] == pytest.approx(2 / 9)  # 2 of the 9 patch centres sound
    assert scores["unwinnable"] == 1  # clip 2


def test_pointing_game_control_scores_the_control_maps_peaks():
    maps = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    control = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    sounding = torch.tensor([[True, False], [True, False]])
    scores = ev.pointing_scores(maps, control, sounding, ~sounding)
    assert scores["pointing_game"] == 1.0
    assert scores["pointing_game_control"] == 0.5
    assert scores["distractor_rate_control"] == 0.5


def test_localization_control_maps_take_the_next_clips_audio_wrapping_round(tiny):
    model, info = ev.load_model(str(tiny / "pretrain.pt"))
    ds = ev.open_dataset(model, info, str(tiny / "data" / "test.json"))
    maps, control = ev.localization_maps(model, ds, batch_size=4)  # across two batches
    audio_batch, image = whole_batch(tiny)[:2]
    with torch.no_grad():  # the tokens of the modality-specific blocks
        audio = pooled_representation(model.encoder.audio_tokens(audio_batch))  # (N, D) unit length
        visual = model.encoder.visual_tokens(image)
    audio = audio - audio.mean(dim=0)  # centred over the clips
    assert torch.allclose(maps, ev.heat_map(audio, visual), atol=1e-5)
    assert torch.allclose(control, ev.heat_map(audio.roll(-1, 0), visual), atol=1e-5)


def localize_set(tiny, tmp_path, frame_objects, frame_size=32):
    """The tiny test clips in a datafile beside an objects.json that puts `frame_objects` on every frame."""
    rows = json.load(open(tiny / "data" / "test.json"))["data"]
    for row in rows:  # absolute paths: the clips stay where they are
        row.update(wav=str(tiny / "data" / row["wav"]), video_path=str(tiny / "data" / row["video_path"]))
    json.dump({"data": rows}, open(tmp_path / "test.json", "w"))
    clips = {row["video_id"]: [frame_objects] * 10 for row in rows}
    json.dump(dict(frame_size=frame_size, clips=clips), open(tmp_path / "objects.json", "w"))
    return str(tmp_path / "test.json")


def localize(tiny, datafile, out, *flags):
    argv = ["localize", "--checkpoint", str(tiny / "pretrain.pt"), "--data", datafile, "--out", str(out)]
    return ev.main(argv + [str(flag) for flag in flags])


def test_localize_writes_its_scores_and_pictures_of_the_first_clips(tiny, tmp_path):
    results = localize(tiny, str(tiny / "data" / "test.json"), tmp_path, "--pictures", 2)
    assert json.load(open(tmp_path / "localize.json")) == results
    scores = ["pointing_game", "distractor_rate", "chance", "unwinnable"]
    scores += ["pointing_game_control", "distractor_rate_control"]
    assert set(results) == set(scores) | {"clips"}
    assert sorted(os.listdir(tmp_path)) == ["localize.json", "test_00000.png", "test_00001.png"]


def test_localize_scales_the_patch_centres_to_the_frame_size_of_objects_json(tiny, tmp_path):
    # on 64 px frames, a disk around (48, 16): the centre of the top right of the model's 2 x 2 patches
    datafile = localize_set(tiny, tmp_path, [{"class": 0, "x": 48, "y": 16, "radius": 3}], frame_size=64)
    results = localize(tiny, datafile, tmp_path / "out", "--pictures", 0)
    assert results["chance"] == 0.25
    assert results["unwinnable"] == 0


def test_localize_scores_an_object_marked_silent_as_a_distractor(tiny, tmp_path):
    silent_disk = {"class": 0, "x": 16, "y": 16, "radius": 100, "sounding": False}  # covers the frame
    results = localize(tiny, localize_set(tiny, tmp_path, [silent_disk]), tmp_path / "out", "--pictures", 0)
    assert results["pointing_game"] == 0.0
    assert results["distractor_rate"] == 1.0
    assert results["distractor_rate_control"] == 1.0
    assert results["unwinnable"] == CLIPS


def test_localize_without_objects_json_names_the_file_it_needs(tiny, tmp_path, capsys):
    datafile = localize_set(tiny, tmp_path, [])
    os.remove(tmp_path / "objects.json")
    with pytest.raises(SystemExit):
        localize(tiny, datafile, tmp_path / "out")
    assert str(tmp_path / "objects.json") in capsys.readouterr().err
