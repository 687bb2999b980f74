"""eval.py: metrics equal to scikit-learn / the official retrieval script, and the four commands end to end."""
import csv
import dataclasses
import json
import math
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import eval as ev
import prepare
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
    y, s = np.array([1.0, 0, 1, 0]), np.array([0.5, 0.5, 0.5, 0.1])
    assert ev.average_precision(y, s) == pytest.approx(2 / 3, abs=1e-15)  # one step: precision 2/3, recall 0 -> 1
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
    assert m["AUC"][0] == 1.0 and math.isnan(m["AUC"][1])  # sklearn 1.9: NaN
    assert m["mAUC"] == 1.0 and m["d_prime"] == math.inf  # the mean over classes with a defined AUC


def test_d_prime_is_sqrt2_times_the_normal_quantile_of_the_mean_auc():
    assert ev.d_prime(0.5) == 0.0
    assert ev.d_prime(0.8413447460685429) == pytest.approx(math.sqrt(2), abs=1e-12)  # Phi(1)
    m = ev.classification_metrics(np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.3]]),
                                  np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]))
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
    assert r["R1"] == np.mean(ranks == 1) and r["R5"] == np.mean(ranks <= 5) and r["R10"] == 1.0
    assert r["MR"] == np.median(ranks)


def test_retrieval_counts_a_tied_match_at_every_tied_position():
    sim = np.eye(4)[:, [0, 1, 3, 2]]  # queries 2 and 3 find the wrong clip; their match ties with 2 others at 0
    r = ev.retrieval_metrics(sim)  # ranks (0-based): 0, 0, 1 2 3, 1 2 3 -> 8 entries, as the official script
    assert r == dict(R1=0.25, R5=1.0, R10=1.0, MR=2.5)
    assert ev.retrieval_metrics(np.ones((4, 4)))["R1"] == 0.25  # a collapsed model scores chance, not 1.0


# -----------------------------------------------------------------------------
# the commands on a tiny model and tiny synthetic data

CLASSES = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    prepare.make_synthetic(str(root / "data"), n_train=1, n_test=6, seed=0, image_size=32, seconds=0.7,
                           num_classes=CLASSES, workers=1)
    cfg = CAVMAEConfig.from_preset("tiny")
    torch.manual_seed(0)
    train_config = dict(dataset_mean=-5.081, dataset_std=4.4849, metric="acc", label_csv=str(root / "data" / "labels.csv"))
    for task, model, k in (("pretrain", CAVMAE(cfg), None), ("finetune", CAVMAEClassifier(cfg, CLASSES), CLASSES)):
        torch.save(dict(model=model.state_dict(), model_args=dataclasses.asdict(cfg), task=task, num_classes=k,
                        config=train_config, iter_num=0), root / f"{task}.pt")
    return root


def run(tiny, *argv):
    return ev.main([argv[0], "--checkpoint", str(tiny / argv[1]), *map(str, argv[2:])])


def test_classify_writes_metrics_json_and_per_class_csv(tiny, capsys):
    data = tiny / "data"
    run(tiny, "classify", "finetune.pt", "--data", data / "test.json", "--label_csv", data / "labels.csv",
        "--out", tiny / "cls.json")
    out = json.load(open(tiny / "cls.json"))
    assert {"mAP", "mAUC", "d_prime", "acc", "AP", "AUC"} <= set(out) and len(out["AP"]) == CLASSES
    assert out["frames"] == [5] and out["clips"] == 6
    rows = list(csv.DictReader(open(tiny / "cls_per_class.csv")))
    assert [r["mid"] for r in rows] == [f"/synth/{k:02d}" for k in range(CLASSES)]
    assert sum(int(r["positives"]) for r in rows) == 6
    assert "mAP" in capsys.readouterr().out


def test_classify_all_frames_averages_softmax_over_the_ten_frames(tiny):
    data = tiny / "data"
    out = run(tiny, "classify", "finetune.pt", "--data", data / "test.json", "--label_csv", data / "labels.csv",
              "--frames", "all", "--ftmode", "missingaudioonly")
    assert out["activation"] == "softmax" and out["frames"] == list(range(10))  # the checkpoint says metric='acc'
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
        run(tiny, "retrieval", name, "--data", data / "test.json", "--out", tiny / "ret.json",
            "--save_embeddings", tiny / "emb")
        out = json.load(open(tiny / "ret.json"))
        a, v = np.load(tiny / "emb" / "audio.npy"), np.load(tiny / "emb" / "visual.npy")
        assert a.shape == v.shape == (6, 32)
        np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
        assert out["audio_to_visual"] == ev.retrieval_metrics(a.astype(np.float64) @ v.T.astype(np.float64))
        assert out["visual_to_audio"] == ev.retrieval_metrics(v.astype(np.float64) @ a.T.astype(np.float64))


def test_inpaint_writes_one_png_per_clip_with_the_documented_layout(tiny):
    data = tiny / "data"
    written = run(tiny, "inpaint", "pretrain.pt", "--data", data / "test.json", "--out", tiny / "inpaint", "--n", 2)
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
    config = tmp_path / "arch.json"  # train.py's names; depths, widths and sizes come from the tensor shapes
    config.write_text(json.dumps(dict(model_num_heads=4, model_decoder_num_heads=4)))
    model, info = ev.load_model(os.path.join(base, "pretrain_state_dict.pth"), config=str(config), norm_pix_loss=True)
    assert info["format"] == "official" and info["task"] == "pretrain"
    assert (model.config.modality_specific_depth, model.config.joint_depth, model.config.img_size) == (10, 2, 64)
    with torch.no_grad():
        a, v = model.embed(vec["audio"], vec["image"])
    assert (a - vec["feat_audio"]).abs().max() < 2e-4 and (v - vec["feat_visual"]).abs().max() < 2e-4
    clf, info = ev.load_model(os.path.join(base, "finetune_state_dict.pth"), num_heads=4)
    assert info["task"] == "finetune" and info["num_classes"] == 7


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")
def test_predict_on_a_generated_video_prints_label_names(tiny, capsys):
    video = tiny / "clip.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=96x64:rate=25:duration=2",
                    "-f", "lavfi", "-i", "sine=frequency=440:duration=2", "-shortest", "-c:v", "mpeg4",
                    "-c:a", "aac", str(video)], check=True)
    top = run(tiny, "predict", "finetune.pt", "--video", video, "--topk", 2)  # label csv from the checkpoint
    names = [r[2] for r in csv.reader(open(tiny / "data" / "labels.csv"))][1:]
    assert len(top) == 2 and top[0]["score"] >= top[1]["score"] and top[0]["name"] in names
    assert top[0]["name"] in capsys.readouterr().out


def test_predict_from_a_wav_and_an_image(tiny):
    data = tiny / "data"
    top = run(tiny, "predict", "finetune.pt", "--wav", data / "audio" / "test_00000.wav",
              "--image", data / "frames" / "frame_5" / "test_00000.jpg", "--topk", CLASSES, "--out", tiny / "p.json")
    assert sum(r["score"] for r in top) == pytest.approx(1.0, abs=1e-5)  # softmax: the checkpoint says metric='acc'
    assert json.load(open(tiny / "p.json"))["frames"] == [0]
