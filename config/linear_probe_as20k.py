# Linear probing on AudioSet-20K: the AS-20K fine-tuning recipe with the pretrained encoder frozen (the release's
# freeze_base switch), so only the new LayerNorm + Linear head trains, at head_lr x lr.
#   python train.py config/finetune_as20k.py config/linear_probe_as20k.py --init_from=out/pretrain_audioset/final.pt
# The paper gives no separate linear-probe hyper-parameters; these keep the fine-tuning ones.
out_dir = "out/linear_probe_as20k"
freeze_base = True
