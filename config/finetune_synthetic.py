# CPU demo: fine-tune the synthetic pretraining checkpoint as a 10-class classifier (single-label: CE, accuracy).
#   python train.py config/pretrain_synthetic.py          # first: out/pretrain_synthetic/final.pt
#   python train.py config/finetune_synthetic.py
# The model architecture comes from the checkpoint. The final evaluation averages the softmax over the 10 frames.
out_dir = "out/finetune_synthetic"
task = "finetune"
init_from = "out/pretrain_synthetic/final.pt"
data_train = "data/synthetic/train.json"
data_val = "data/synthetic/test.json"
label_csv = "data/synthetic/labels.csv"
dataset_mean = -6.2357  # as config/pretrain_synthetic.py
dataset_std = 3.8164
# the model of config/pretrain_synthetic.py (a checkpoint of ours holds it; --init_from=scratch needs it)
model_img_size = 64
model_audio_length = 256
model_norm_pix_loss = True
model_embed_dim = 128
model_num_heads = 2
model_modality_specific_depth = 2
model_decoder_embed_dim = 64
model_decoder_depth = 1
model_decoder_num_heads = 2

ftmode = "multimodal"
loss = "ce"
metric = "acc"
batch_size = 32
epochs = 8  # 62 steps per epoch
lr = 1e-3
head_lr = 10.0
optimizer = "adam"  # the official optimiser and epoch-wise step decay, scaled to 8 epochs
lr_schedule = "step"
lrscheduler_start = 5
lrscheduler_step = 1
lrscheduler_decay = 0.5
# no augmentation: it slows a run this short more than it helps (the paper: mixup 0.5, SpecAugment 48/192,
# label smoothing 0.1 and noise, see config/finetune_as20k.py)
mixup = 0.0
freqm = 0
timem = 0
label_smooth = 0.0
noise = False
wa = True  # weight averaging of epochs 5..8 before the final 10-frame evaluation
wa_start = 5
wa_end = 8
log_interval = 10
num_workers = 1
device = "cpu"
