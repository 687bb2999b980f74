"""eval.py: metrics equal to scikit-learn / the official retrieval script, and the commands end to end."""

import csv
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval as ev
import pictures
import synthetic
from checkpoint import CheckpointError
from model import CAVMAE, CAVMAEClassifier, CAVMAEConfig

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


# -----------------------------------------------------------------------------
# the commands on a tiny model and tiny synthetic data

CLASSES = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    synthetic.make_synthetic(
        str(root / "data"),
        n_train=1,
        n_test=6,
        seed=0,
        image_size=32,
        seconds=0.7,
        num_classes=CLASSES,
        workers=1,
    )
    cfg = CAVMAEConfig.from_preset("tiny")
    torch.manual_seed(0)
    train_config = dict(
        dataset_mean=-5.081, dataset_std=4.4849, metric="acc", label_csv=str(root / "data" / "labels.csv")
    )
    for task, model, k in (
        ("pretrain", CAVMAE(cfg), None),
        ("finetune", CAVMAEClassifier(cfg, CLASSES), CLASSES),
    ):
        torch.save(
            dict(
                model=model.state_dict(),
                model_args=dataclasses.asdict(cfg),
                task=task,
                num_classes=k,
                config=train_config,
                iter_num=0,
            ),
            root / f"{task}.pt",
        )
    return root


def run(tiny, *argv):
    return ev.main([argv[0], "--checkpoint", str(tiny / argv[1]), *map(str, argv[2:])])


def test_classify_writes_metrics_json_and_per_class_csv(tiny, capsys):
    data = tiny / "data"
    run(
        tiny,
        "classify",
        "finetune.pt",
        "--data",
        data / "test.json",
        "--label_csv",
        data / "labels.csv",
        "--out",
        tiny / "cls.json",
    )
    out = json.load(open(tiny / "cls.json"))
    assert {"mAP", "mAUC", "d_prime", "acc", "AP", "AUC"} <= set(out)
    assert len(out["AP"]) == CLASSES
    assert out["frames"] == [5]
    assert out["clips"] == 6
    rows = list(csv.DictReader(open(tiny / "cls_per_class.csv")))
    assert [r["mid"] for r in rows] == [f"/synth/{k:02d}" for k in range(CLASSES)]
    assert sum(int(r["positives"]) for r in rows) == 6
    assert "mAP" in capsys.readouterr().out


def test_classify_all_frames_averages_softmax_over_the_ten_frames(tiny):
    data = tiny / "data"
    out = run(
        tiny,
        "classify",
        "finetune.pt",
        "--data",
        data / "test.json",
        "--label_csv",
        data / "labels.csv",
        "--frames",
        "all",
        "--ftmode",
        "missingaudioonly",
    )
    assert out["activation"] == "softmax"  # the checkpoint says metric='acc'
    assert out["frames"] == list(range(10))
    model, _ = ev.load_model(str(tiny / "finetune.pt"))
    ds = ev.data.AVDataset(str(data / "test.json"), str(data / "labels.csv"), target_length=64, image_size=32)
    probs = []
    with torch.no_grad():
        for k in range(10):
            ds.frame = k
            audio, image, labels = map(torch.stack, zip(*[ds[i] for i in range(len(ds))]))
            probs.append(torch.softmax(model(audio, image, "missingaudioonly"), -1))
    want = ev.classification_metrics(torch.stack(probs).mean(0), labels)
    assert out["AP"] == pytest.approx(want["AP"], abs=1e-6)


def test_retrieval_works_on_pretrain_and_finetune_checkpoints(tiny):
    data = tiny / "data"
    for name in ("pretrain.pt", "finetune.pt"):
        run(
            tiny,
            "retrieval",
            name,
            "--data",
            data / "test.json",
            "--out",
            tiny / "ret.json",
            "--save_embeddings",
            tiny / "emb",
        )
        out = json.load(open(tiny / "ret.json"))
        a = np.load(tiny / "emb" / "audio.npy")
        v = np.load(tiny / "emb" / "visual.npy")
        assert a.shape == v.shape == (6, 32)
        np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
        assert out["audio_to_visual"] == ev.retrieval_metrics(a.astype(np.float64) @ v.T.astype(np.float64))
        assert out["visual_to_audio"] == ev.retrieval_metrics(v.astype(np.float64) @ a.T.astype(np.float64))


def test_inpaint_writes_one_png_per_clip_with_the_documented_layout(tiny):
    data = tiny / "data"
    written = run(
        tiny, "inpaint", "pretrain.pt", "--data", data / "test.json", "--out", tiny / "inpaint", "--n", 2
    )
    assert len(written) == 2
    with Image.open(written[0]) as img:
        # columns: pad, spectrogram (T=64), pad, frame (32 enlarged x4), pad;
        # rows: title, then 3 x (caption + panel of max(F=128, 128)), pad
        assert img.size == (4 + 64 + 4 + 128 + 4, 14 + 3 * (14 + 128) + 4)
    assert json.load(open(tiny / "inpaint" / "inpaint.json"))["mask_ratio"] == 0.75


def test_commands_refuse_a_checkpoint_of_the_wrong_task(tiny):
    with pytest.raises(ValueError, match="needs a fine-tuned classifier"):
        ev.load_model(str(tiny / "pretrain.pt"), "finetune")
    with pytest.raises(ValueError, match="needs a pretrained CAV-MAE"):
        ev.load_model(str(tiny / "finetune.pt"), "pretrain")


def test_official_state_dict_loads_with_architecture_flags(golden, tmp_path):
    base = os.path.join(golden, "model")
    vec = torch.load(os.path.join(base, "pretrain_vectors.pth"), weights_only=False)
    official = vec["config"]
    # train.py's names; depths, widths and sizes come from the tensor shapes, the head counts do not
    config = tmp_path / "arch.json"
    heads = dict(model_num_heads=official["num_heads"], model_decoder_num_heads=official["decoder_num_heads"])
    config.write_text(json.dumps(heads))
    model, info = ev.load_model(
        os.path.join(base, "pretrain_state_dict.pth"), config=str(config), norm_pix_loss=True
    )
    assert info["format"] == "official"
    assert info["task"] == "pretrain"
    depths = (model.config.modality_specific_depth, model.config.joint_depth)
    assert depths == (official["modality_specific_depth"], 12 - official["modality_specific_depth"])
    assert model.config.img_size == official["img_size"]
    with torch.no_grad():
        a, v = model.embed(vec["audio"], vec["image"])
    assert (a - vec["feat_audio"]).abs().max() < 2e-4
    assert (v - vec["feat_visual"]).abs().max() < 2e-4
    finetune = torch.load(os.path.join(base, "finetune_vectors.pth"), weights_only=False)["config"]
    clf, info = ev.load_model(os.path.join(base, "finetune_state_dict.pth"), num_heads=finetune["num_heads"])
    assert info["task"] == "finetune"
    assert info["num_classes"] == finetune["label_dim"]


def test_load_model_names_a_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("not weights\n")
    with pytest.raises(CheckpointError, match=r"notes\.pt is not a PyTorch checkpoint \(a text file"):
        ev.load_model(str(path))


def test_load_model_names_a_checkpoint_that_does_not_exist(tmp_path):
    with pytest.raises(CheckpointError, match=r"missing\.pt does not exist"):
        ev.load_model(str(tmp_path / "missing.pt"))


def test_read_config_file_takes_the_assignments_of_a_python_file_or_a_json_file(tmp_path):
    python_file = tmp_path / "arch.py"
    python_file.write_text("import math\nmodel_num_heads = 4\n_private = 1\nwidth = math.isqrt(1024)\n")
    assert ev.read_config_file(str(python_file)) == {"model_num_heads": 4, "width": 32}
    json_file = tmp_path / "arch.json"
    json_file.write_text(json.dumps({"num_heads": 4}))
    assert ev.read_config_file(str(json_file)) == {"num_heads": 4}


def test_architecture_from_reads_fields_by_name_and_as_train_py_model_keys():
    settings = {"num_heads": 4, "model_decoder_depth": 2, "model_preset": "small", "lr": 0.1}
    assert ev.architecture_from(settings) == {"num_heads": 4, "decoder_depth": 2}


def make_test_video(video, size="64x48", rate=10, seconds=1.5, tone_hz=None):
    """An MPEG-4 test-pattern video made by ffmpeg, with an AAC sine tone when tone_hz is given."""
    inputs = ["-f", "lavfi", "-i", f"testsrc=size={size}:rate={rate}:duration={seconds}"]
    codecs = ["-c:v", "mpeg4"]
    if tone_hz is not None:
        inputs += ["-f", "lavfi", "-i", f"sine=frequency={tone_hz}:duration={seconds}", "-shortest"]
        codecs += ["-c:a", "aac"]
    subprocess.run(["ffmpeg", "-v", "error", "-y", *inputs, *codecs, str(video)], check=True)


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")
def test_predict_on_a_generated_video_prints_label_names(tiny, capsys):
    video = tiny / "clip.mp4"
    make_test_video(video, size="96x64", rate=25, seconds=2, tone_hz=440)
    top = run(tiny, "predict", "finetune.pt", "--video", video, "--topk", 2)  # label csv from the checkpoint
    names = [r[2] for r in csv.reader(open(tiny / "data" / "labels.csv"))][1:]
    assert len(top) == 2
    assert top[0]["score"] >= top[1]["score"]
    assert top[0]["name"] in names
    assert top[0]["name"] in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")
def test_embed_and_localize_a_video_name_the_clip_after_the_file(tiny):
    video = tiny / "street.mp4"
    make_test_video(video, tone_hz=300)
    out = run(tiny, "embed", "pretrain.pt", "--video", video, "--out", tiny / "emb_video", "--frame", 9)
    assert out["video_ids"] == ["street"]
    assert out["audio"].shape == (1, 32)
    out = run(tiny, "localize", "pretrain.pt", "--video", video, "--out", tiny / "loc_video")
    assert out["frame"] == 5
    assert os.path.isfile(tiny / "loc_video" / "street.png")


def test_predict_from_a_wav_and_an_image(tiny):
    data = tiny / "data"
    top = run(
        tiny,
        "predict",
        "finetune.pt",
        "--wav",
        data / "audio" / "test_00000.wav",
        "--image",
        data / "frames" / "frame_5" / "test_00000.jpg",
        "--topk",
        CLASSES,
        "--out",
        tiny / "p.json",
    )
    # softmax: the checkpoint says metric='acc'
    assert sum(r["score"] for r in top) == pytest.approx(1.0, abs=1e-5)
    assert json.load(open(tiny / "p.json"))["frames"] == [0]


# -----------------------------------------------------------------------------
# clips shorter than the checkpoint's


def test_audio_length_flag_runs_a_shorter_model_on_a_longer_checkpoint(tiny):
    model, info = ev.load_model(str(tiny / "pretrain.pt"), audio_length=32)
    assert model.config.audio_length == 32
    assert "cut from 8x4 to 8x2 time steps" in info["report"]
    # the fbank is cut to 32 frames to fit
    out = run(
        tiny,
        "embed",
        "pretrain.pt",
        "--data",
        tiny / "data" / "test.json",
        "--out",
        tiny / "emb32",
        "--audio_length",
        32,
    )
    assert out["audio"].shape == (6, 32)
    with pytest.raises(ValueError, match="not longer"):
        ev.load_model(str(tiny / "pretrain.pt"), audio_length=128)


# -----------------------------------------------------------------------------
# retrieval on the paper's per-class subsets


def rows_of(*labels):
    return [dict(video_id=f"v{i}", labels=label) for i, label in enumerate(labels)]


def test_per_class_subset_takes_k_clips_of_each_class_by_first_label():
    # b,a counts as b; the unlabelled clip is left out
    rows = rows_of("a", "a", "b,a", "a", "c", "b", "", "a,c")
    keep, taken = ev.per_class_subset(rows, 2, seed=0)
    assert taken == {"a": 2, "b": 2, "c": 1}  # c has only one clip: it is taken
    firsts = [rows[i]["labels"].split(",")[0] for i in keep]
    assert keep == sorted(keep)
    assert sorted(firsts) == ["a", "a", "b", "b", "c"]


def test_per_class_subset_is_deterministic_for_a_seed_and_differs_between_seeds():
    rows = rows_of(*[f"/m/{k % 10}" for k in range(100)])
    assert ev.per_class_subset(rows, 3, seed=1) == ev.per_class_subset(rows, 3, seed=1)
    assert ev.per_class_subset(rows, 3, seed=1)[0] != ev.per_class_subset(rows, 3, seed=2)[0]


def test_retrieval_per_class_reports_both_directions_on_the_subset(tiny, capsys):
    data = tiny / "data"
    out = run(
        tiny,
        "retrieval",
        "pretrain.pt",
        "--data",
        data / "test.json",
        "--per_class",
        1,
        "--seed",
        0,
        "--save_embeddings",
        tiny / "emb_pc",
    )
    assert out["clips"] == 3
    assert out["subset"] == dict(per_class=1, seed=0, clips=3, of=6, classes=CLASSES, short_classes={})
    assert {"R1", "R5", "R10", "MR"} <= set(out["audio_to_visual"])
    assert "visual_to_audio" in out
    assert len(open(tiny / "emb_pc" / "video_ids.txt").read().split()) == 3
    out = run(tiny, "retrieval", "pretrain.pt", "--data", data / "test.json", "--per_class", 5)
    assert out["clips"] == 6
    assert sum(out["subset"]["short_classes"].values()) == 6  # every class has fewer than 5
    assert "fewer" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# embeddings


def test_embed_saves_coordinated_and_joint_representations_in_datafile_order(tiny):
    data = tiny / "data"
    run(tiny, "embed", "finetune.pt", "--data", data / "test.json", "--out", tiny / "emb_ft", "--frame", 2)
    a = np.load(tiny / "emb_ft" / "audio.npy")
    v = np.load(tiny / "emb_ft" / "visual.npy")
    j = np.load(tiny / "emb_ft" / "joint.npy")
    assert a.shape == v.shape == j.shape == (6, 32)
    assert a.dtype == v.dtype == j.dtype == np.float32
    assert open(tiny / "emb_ft" / "video_ids.txt").read().split() == [f"test_{k:05d}" for k in range(6)]
    model, _ = ev.load_model(str(tiny / "finetune.pt"))
    ds = ev.data.AVDataset(
        str(data / "test.json"),
        str(data / "labels.csv"),
        target_length=64,
        image_size=32,
        frame=2,
        mean=-5.081,
        std=4.4849,
    )
    audio, image, _ = map(torch.stack, zip(*[ds[i] for i in range(len(ds))]))
    with torch.no_grad():
        tokens_a, tokens_v = model.embed(audio, image)
        # unit length, as retrieval
        np.testing.assert_allclose(a, ev.pooled_representation(tokens_a), atol=1e-5)
        np.testing.assert_allclose(v, ev.pooled_representation(tokens_v), atol=1e-5)
        # what the head reads
        np.testing.assert_allclose(j, model.features(audio, image, "multimodal"), atol=1e-5)


def test_joint_representation_of_a_pretraining_model_is_its_encoders_multimodal_features(tiny):
    model, _ = ev.load_model(str(tiny / "pretrain.pt"))
    clf = CAVMAEClassifier(model.config, CLASSES).eval()
    ev.load_pretrained(clf, model.state_dict())
    audio = torch.randn(2, 64, 128)
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(
            ev.representations(model, audio, image)[2], clf.features(audio, image), atol=1e-6
        )


def test_embed_from_a_wav_and_an_image(tiny):
    data = tiny / "data"
    out = run(
        tiny,
        "embed",
        "pretrain.pt",
        "--wav",
        data / "audio" / "test_00001.wav",
        "--image",
        data / "frames" / "frame_3" / "test_00001.jpg",
        "--out",
        tiny / "emb_one",
    )
    assert out["video_ids"] == ["test_00001"]
    assert out["joint"].shape == (1, 32)
    assert np.load(tiny / "emb_one" / "visual.npy").shape == (1, 32)


# -----------------------------------------------------------------------------
# sound-source localisation


def test_similarity_map_is_the_cosine_of_the_pooled_audio_with_each_visual_patch():
    audio = torch.zeros(1, 5, 4)
    audio[0, :, 0] = torch.tensor([1.0, 2, 3, 4, 5])  # mean-pooled: along e0
    visual = torch.tensor(
        [[[0.0, 1, 0, 0], [1, 1, 0, 0], [-1, 0, 0, 0], [3, 0, 0, 0], [0, 0, 2, 0], [1, 0, 1, 0]]]
    )
    sim = ev.similarity_map(audio, visual, (2, 3))
    want = torch.tensor([[0.0, 2**-0.5, -1], [1, 0, 2**-0.5]])
    assert sim.shape == (1, 2, 3)
    assert torch.allclose(sim[0], want, atol=1e-6)
    assert ev.peak_patch(sim[0]) == (1, 0)


def test_object_patches_marks_the_patches_whose_centre_lies_inside_an_object():
    disk = lambda x, y: (x - 24) ** 2 + (y - 8) ** 2 <= 5**2  # noqa: E731  around the centre of patch (0, 1)
    in_patch, area = ev.object_patches(disk, patch_size=16, image_size=32)
    assert in_patch.tolist() == [[False, True], [False, False]]  # a map hits iff its peak is patch (0, 1)
    assert area == pytest.approx(math.pi * 25 / 32**2, rel=0.02)


def test_heat_overlay_is_hottest_where_the_similarity_peaks():
    sim = torch.zeros(4, 4)
    sim[0, 3] = 1.0  # top right
    heat = pictures.heat_overlay(np.zeros((64, 64, 3), np.uint8), sim).astype(int)
    assert heat[8, 56, 0] > 50
    assert heat[8, 56, 0] > 3 * heat[8, 56, 1:].max()  # red at the top-right patch
    assert heat[56, 8, 2] > 50
    assert heat[56, 8, 2] > 3 * heat[56, 8, :2].max()  # blue at the bottom-left one


def object_tokens(self, audio, image):
    """A stand-in encoder whose answer is known: audio tokens along e0, each visual patch token along
    (f, 1 - f) where f is the fraction of its pixels that look like an object (saturated and bright)."""
    p = self.config.patch_size
    D = self.config.embed_dim
    rgb = (
        image * torch.tensor(ev.data.IMAGE_STD)[:, None, None]
        + torch.tensor(ev.data.IMAGE_MEAN)[:, None, None]
    )
    high = rgb.max(1).values  # (B, S, S)
    low = rgb.min(1).values
    looks = ((high - low > 0.5 * high) & (high > 0.7)).float()
    f = F.avg_pool2d(looks[:, None], p).flatten(1)  # (B, Lv)
    visual = torch.zeros(*f.shape, D)
    visual[..., 0] = f
    visual[..., 1] = 1 - f
    audio_tokens = torch.zeros(audio.shape[0], 3, D)
    audio_tokens[..., 0] = 1
    return audio_tokens, visual


def localize_argv(tmp_path, clips):
    """Disks and squares on 64 px frames, a checkpoint that sees them at 48 px (a 12 x 12 grid of 4 px patches),
    and the localize command line for them."""
    synthetic.make_synthetic(
        str(tmp_path / "data"),
        n_train=0,
        n_test=clips,
        seed=1,
        image_size=64,
        seconds=0.7,
        num_classes=2,
        workers=1,
    )
    cfg = CAVMAEConfig.from_preset("tiny", img_size=48, patch_size=4)
    torch.save(
        dict(
            model=CAVMAE(cfg).state_dict(),
            model_args=dataclasses.asdict(cfg),
            task="pretrain",
            num_classes=None,
            config={},
        ),
        tmp_path / "ckpt.pt",
    )
    return [
        "localize",
        "--checkpoint",
        str(tmp_path / "ckpt.pt"),
        "--data",
        str(tmp_path / "data" / "test.json"),
        "--out",
        str(tmp_path / "loc"),
    ]


def test_localize_finds_the_objects_of_a_model_that_sees_them_and_draws_the_peak(tmp_path, monkeypatch):
    argv = localize_argv(tmp_path, clips=6)
    monkeypatch.setattr(ev.CAVMAE, "embed", object_tokens)
    out = ev.main(argv)
    assert out == json.load(open(tmp_path / "loc" / "localization.json"))
    assert out["n"] == 6
    assert out["pointing_game"] == 1.0
    assert 0 < out["chance"] < 0.2
    assert out["pointing_game_other_audio"] == 1.0  # this stand-in sees objects whatever it hears
    assert out["pointing_game_min"] == 0.0  # and its minimum is never on one
    clip = out["clips"][0]
    with Image.open(clip["picture"]) as img:  # frame and heat map, 96 px each (48 enlarged x2)
        assert img.size == (4 + 2 * (96 + 4), 2 * 14 + 96 + 4)
        row, col = clip["peak"]
        cross_centre = (4 + 96 + 4 + (col + 0.5) * 8, 28 + (row + 0.5) * 8)
        assert img.getpixel(cross_centre) == (255, 255, 255)


def test_localize_control_scores_each_frame_with_another_clips_audio(tmp_path, monkeypatch):
    def opposite_audio(self, audio, image):  # clips 0, 2 are (+e0, +f e0), clips 1, 3 (-e0, -f e0): their own
        a, v = object_tokens(self, audio, image)  # maps are as above, the previous clip's audio inverts them
        sign = torch.tensor([1.0, -1, 1, -1])[:, None]
        v[..., 0] *= sign
        return a * sign[..., None], v

    argv = localize_argv(tmp_path, clips=4)
    monkeypatch.setattr(ev.CAVMAE, "embed", opposite_audio)
    out = ev.main(argv + ["--batch_size", "4"])
    assert out["pointing_game"] == 1.0
    assert out["pointing_game_other_audio"] == 0.0


def test_localize_without_object_positions_draws_pictures_only(tiny):
    data = tiny / "data"
    out = run(
        tiny,
        "localize",
        "finetune.pt",
        "--wav",
        data / "audio" / "test_00002.wav",
        "--image",
        data / "frames" / "frame_5" / "test_00002.jpg",
        "--out",
        tiny / "loc_one",
    )
    assert out["pointing_game"] is None
    assert out["n"] == 1
    assert os.path.isfile(out["clips"][0]["picture"])


# -----------------------------------------------------------------------------
# data of another size than the checkpoint's


def test_a_checkpoint_of_another_frame_size_and_clip_length_says_how_the_data_is_adapted(tmp_path, capsys):
    # 64 px frames and 0.7 s clips (68 fbank frames); the model: 48 px, 64
    argv = localize_argv(tmp_path, clips=1)
    ev.main(argv)
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert len(notes) == 2
    assert "frames are 64x64 px and the model's img_size is 48: frames resized and centre-cropped" in notes[0]
    assert (
        "audio has 68 fbank frames and the model's audio_length is 64: audio cut to its first 64" in notes[1]
    )


@pytest.mark.parametrize(
    "seconds, note",
    [(0.655, None), (0.3, "audio padded with 36 frames of zeros")],  # 64 fbank frames; 28
)
def test_data_that_fits_the_checkpoint_gets_no_note_and_a_short_clip_a_padding_note(tmp_path, seconds, note):
    synthetic.make_synthetic(str(tmp_path), n_train=0, n_test=1, image_size=32, seconds=seconds, workers=1)
    ds = ev.data.AVDataset(str(tmp_path / "test.json"), str(tmp_path / "labels.csv"))
    cfg = CAVMAEConfig.from_preset("tiny")  # 32 px, 64 frames
    found = ev.data.adaptation_notes(ds.datafile, ds.rows, cfg.img_size, cfg.audio_length)
    if note is None:
        assert found == []
    else:
        assert len(found) == 1
        assert note in found[0]


# -----------------------------------------------------------------------------
# errors on one clip name the file and say what to do


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")
def test_predict_on_a_video_without_sound_names_the_video_and_what_to_do(tiny):
    video = tiny / "silent.mp4"
    make_test_video(video, tone_hz=None)  # pictures only
    with pytest.raises(
        ValueError, match=re.escape(f"--video {video}: no audio stream; CAV-MAE needs a clip with")
    ):
        run(tiny, "predict", "finetune.pt", "--video", video)


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")
def test_predict_on_a_missing_video_names_the_video_and_what_to_do(tiny):
    missing = tiny / "nowhere.mp4"
    with pytest.raises(ValueError, match=re.escape(f"--video {missing}: file not found; check the path")):
        run(tiny, "predict", "finetune.pt", "--video", missing)


def test_predict_on_a_missing_image_names_the_image_and_what_to_do(tiny):
    wav = tiny / "data" / "audio" / "test_00000.wav"
    missing = tiny / "nowhere.jpg"
    with pytest.raises(ValueError, match=re.escape(f"--image {missing}: file not found; check the path")):
        run(tiny, "predict", "finetune.pt", "--wav", wav, "--image", missing)


# -----------------------------------------------------------------------------
# the command line


def test_importing_eval_leaves_out_the_video_tools_and_the_pictures():
    code = "import sys, eval; print(sorted({'prepare', 'synthetic', 'pictures'} & set(sys.modules)))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "argv", [[], ["classify"], ["retrieval"], ["inpaint"], ["localize"], ["embed"], ["predict"]]
)
def test_help_prints_the_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        ev.main([*argv, "--help"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.startswith("usage: ")
