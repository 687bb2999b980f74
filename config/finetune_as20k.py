# Fine-tune CAV-MAE on AudioSet-20K (the balanced set), multimodal: docs/recipes.md and the release's
# run_cavmae_ft_bal.sh. 42.0 mAP in the paper (42.2 from the scale++ checkpoint), with the 10-frame evaluation.
#   python train.py config/finetune_as20k.py --init_from=out/pretrain_audioset/final.pt
# init_from: our pretraining checkpoint or the official one (cav-mae-scale++.pth); both load via model.load_pretrained.
out_dir = "out/finetune_as20k"
task = "finetune"
init_from = "pretrained/cav-mae-scale++.pth"
data_train = "data/audioset/audioset_20k.json"
data_val = "data/audioset/audioset_eval.json"
label_csv = "data/audioset/class_labels_indices.csv"
ftmode = "multimodal"

batch_size = 36
lr = 5e-5
head_lr = 100.0  # the new LayerNorm + Linear head at 100 x lr
epochs = 15
lr_schedule = "step"
lrscheduler_start = 5
lrscheduler_step = 1
lrscheduler_decay = 0.5
loss = "bce"
metric = "mAP"
balanced_sampling = False
mixup = 0.5
freqm = 48
timem = 192
label_smooth = 0.1
noise = True
wa = True  # average the weights of epochs 3..15 before the final (10-frame) evaluation
wa_start = 3
wa_end = 15
dataset_mean = -5.081
dataset_std = 4.4849
num_workers = 16
