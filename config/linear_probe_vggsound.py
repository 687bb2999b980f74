# Linear probing on VGGSound: the VGGSound fine-tuning recipe with the pretrained encoder frozen (freeze_base).
#   python train.py config/finetune_vggsound.py config/linear_probe_vggsound.py --init_from=out/pretrain_audioset/final.pt
# The paper gives no separate linear-probe hyper-parameters; these keep the fine-tuning ones.
out_dir = "out/linear_probe_vggsound"
freeze_base = True
