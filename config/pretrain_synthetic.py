# CPU demo: CAV-MAE pretraining on the synthetic dataset in minutes on 2 cores.
#   python prepare.py synthetic                   # data/synthetic: 2000 train + 500 test clips, 64 px, 2.56 s
#   python train.py config/pretrain_synthetic.py
#   python train.py config/pretrain_synthetic.py --contrastive_weight=0 --out_dir=out/avmae_synthetic   # AV-MAE
# The final evaluation reports audio->visual and visual->audio retrieval R@1 over the 500 test clips (chance 0.002).
out_dir = "out/pretrain_synthetic"
task = "pretrain"
data_train = "data/synthetic/train.json"
data_val = "data/synthetic/test.json"
label_csv = "data/synthetic/labels.csv"
# fbank statistics of the synthetic training set (2000 clips, padded to 256 frames), computed with
#   data.dataset_stats(data.AVDataset("data/synthetic/train.json", "data/synthetic/labels.csv", target_length=256))
dataset_mean = -6.2357
dataset_std = 3.8164

# a small model (64 px frames, 2.56 s clips, normalised pixel targets) so that ~1500 steps fit in a few CPU
# minutes
model_img_size = 64
model_audio_length = 256
model_norm_pix_loss = True
model_embed_dim = 128
model_num_heads = 2
model_modality_specific_depth = 2
model_decoder_embed_dim = 64
model_decoder_depth = 1
model_decoder_num_heads = 2

# Demo deviations from the paper, for a run this short: 50% masking (a 64 px frame has only 16 patches; at 75%
# the 4 visible ones often miss the objects) and lambda_c = 0.1 instead of 0.01 (the paper trains ~1000x longer).
mask_ratio = 0.5
contrastive_weight = 0.1
mae_weight = 1.0
noise = True

batch_size = 32
epochs = 24  # 62 steps per epoch
optimizer = "adamw"
lr = 5e-4
betas = (0.9, 0.95)
weight_decay = 0.01
lr_schedule = "cosine"
warmup_iters = 20
min_lr_ratio = 0.1
eval_interval = 500
log_interval = 10
num_workers = 1
device = "cpu"
