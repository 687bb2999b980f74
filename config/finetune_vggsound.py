# Fine-tune CAV-MAE on VGGSound, multimodal, single-label (65.5% accuracy in the paper, 65.9% after the extra
# VGGSound pretraining): docs/recipes.md and the release's egs/vggsound/run_cavmae_ft.sh.
#   python train.py config/finetune_vggsound.py --init_from=out/pretrain_audioset/final.pt
out_dir = "out/finetune_vggsound"
task = "finetune"
init_from = "pretrained/cav-mae-scale++.pth"
data_train = "data/vggsound/vgg_train.json"
data_val = "data/vggsound/vgg_test.json"
label_csv = "data/vggsound/class_labels_indices_vgg.csv"
ftmode = "multimodal"

batch_size = 48
lr = 1e-4
head_lr = 10.0
epochs = 10
lr_schedule = "step"
lrscheduler_start = 2
lrscheduler_step = 1
lrscheduler_decay = 0.5
loss = "ce"  # single-label: cross-entropy on the (smoothed, mixed) targets, accuracy
metric = "acc"
balanced_sampling = True
mixup = 0.5
freqm = 48
timem = 192
label_smooth = 0.1
noise = True
wa = True
wa_start = 3
wa_end = 10
dataset_mean = -5.081  # AudioSet's statistics, as the official VGGSound recipe uses
dataset_std = 4.4849
num_workers = 16
