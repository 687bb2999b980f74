# CAV-MAE base pretraining on AudioSet-2M (docs/recipes.md; the release's run_cavmae_pretrain_base.sh).
#   python train.py config/pretrain_audioset.py                                   # one GPU: 48 clips, 48 negatives
#   torchrun --standalone --nproc_per_node=4 train.py config/pretrain_audioset.py --batch_size=12
#       (the official setup: 4 GPUs x 12 clips, each GPU's contrastive loss over its own 12 clips)
# Scale+ and scale++ are the same recipe with a larger batch and lr: config/pretrain_audioset_scalepp.py.
# Datafiles in the official json format: python prepare.py videos --input VIDEOS --out data/audioset --labels CSV
out_dir = "out/pretrain_audioset"
task = "pretrain"
data_train = "data/audioset/audioset_2m.json"
data_val = "data/audioset/audioset_eval.json"
label_csv = "data/audioset/class_labels_indices.csv"
# the release's ImageNet-MAE initialisation (IN-initial.pth = ori_mae_11.pth) or an ImageNet MAE ViT-B checkpoint;
# "scratch" trains from a random initialisation
init_from = "pretrained/IN-initial.pth"

model_norm_pix_loss = True  # the released checkpoints use normalised pixel targets
model_tr_pos = False  # fixed sin-cos positions
mae_weight = 1.0
contrastive_weight = 0.01
mask_ratio = 0.75
mask_mode = "unstructured"

batch_size = 48
lr = 5e-5
epochs = 25
optimizer = "adam"  # betas (0.95, 0.999), weight decay 5e-7: the defaults
lr_schedule = "step"
lrscheduler_start = 10
lrscheduler_step = 5
lrscheduler_decay = 0.5
dataset_mean = -5.081
dataset_std = 4.4849
noise = True
mixup = 0.0
num_workers = 16
