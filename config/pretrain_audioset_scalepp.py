# CAV-MAE scale++ pretraining on AudioSet-2M: the base recipe with batch 256 and lr 2e-4 (docs/recipes.md).
# Scale+ is batch 120 (the paper says 108) and lr 1e-4: --batch_size=120 --lr=1e-4 --out_dir=out/pretrain_audioset_scalep
#   python train.py config/pretrain_audioset.py config/pretrain_audioset_scalepp.py
# (this file only changes the base config, so load it after config/pretrain_audioset.py)
out_dir = "out/pretrain_audioset_scalepp"
batch_size = 256
lr = 2e-4
