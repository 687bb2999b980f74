# One-GPU reproduction, fine-tuning: the base model pretrained by config/pretrain_synthetic_gpu.py as a 10-class
# classifier, with the official VGGSound recipe (single-label, CE, accuracy, mixup, SpecAugment, label smoothing,
# weight averaging) scaled to 8 epochs; ~3-4 minutes on one H100.
#   python train.py config/finetune_synthetic_gpu.py                                                  # CAV-MAE
#   python train.py config/finetune_synthetic_gpu.py --init_from=out/gpu_avmae/final.pt --out_dir=out/gpu_ft_avmae
#   python train.py config/finetune_synthetic_gpu.py --init_from=scratch --out_dir=out/gpu_ft_scratch
#   python train.py config/finetune_synthetic_gpu.py --ftmode=audioonly --out_dir=out/gpu_ft_audioonly
#   python train.py config/finetune_synthetic_gpu.py --ftmode=videoonly --out_dir=out/gpu_ft_videoonly
#   python eval.py classify --checkpoint out/gpu_ft_cavmae/final.pt --data data/synthetic_gpu/test.json \
#       --frames all --ftmode missingvideoonly        # the multimodal model given audio only (and missingaudioonly)
# The final evaluation reports accuracy on the middle frame and averaged over the 10 frames.
out_dir = "out/gpu_ft_cavmae"
task = "finetune"
init_from = "out/gpu_cavmae/final.pt"
data_train = "data/synthetic_gpu/train.json"
data_val = "data/synthetic_gpu/test.json"
label_csv = "data/synthetic_gpu/labels.csv"
dataset_mean = -6.5877  # as config/pretrain_synthetic_gpu.py
dataset_std = 3.7329
ftmode = "multimodal"

loss = "ce"
metric = "acc"
batch_size = 48
lr = 1e-4
head_lr = 10.0
epochs = 8  # 166 steps per epoch
lr_schedule = "step"
lrscheduler_start = 2
lrscheduler_step = 1
lrscheduler_decay = 0.5
mixup = 0.5
freqm = 48
timem = 192
label_smooth = 0.1
noise = True
wa = True
wa_start = 3
wa_end = 8
log_interval = 20
device = "cuda"
dtype = "bfloat16"
compile = True
num_workers = 8
