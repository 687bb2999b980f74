# Fine-tune CAV-MAE on AudioSet-2M, multimodal (51.2 mAP in the paper): docs/recipes.md and the
# release's run_cavmae_ft_full.sh.
#   python train.py config/finetune_as2m.py --init_from=out/pretrain_audioset/final.pt
out_dir = "out/finetune_as2m"
task = "finetune"
init_from = "pretrained/cav-mae-scale++.pth"
data_train = "data/audioset/audioset_2m.json"
data_val = "data/audioset/audioset_eval.json"
label_csv = "data/audioset/class_labels_indices.csv"
ftmode = "multimodal"

batch_size = 48
lr = 1e-5
head_lr = 50.0
epochs = 10
lr_schedule = "step"
lrscheduler_start = 2
lrscheduler_step = 1
lrscheduler_decay = 0.5
loss = "bce"
metric = "mAP"
balanced_sampling = True  # per-label weights 1000 / (count + 0.01), a clip weighs the sum over its labels
mixup = 0.5
freqm = 48
timem = 192
label_smooth = 0.1
noise = True
wa = True
wa_start = 1
wa_end = 10
dataset_mean = -5.081
dataset_std = 4.4849
num_workers = 16
