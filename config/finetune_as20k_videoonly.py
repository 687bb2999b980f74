# AudioSet-20K fine-tuning on the visual frames alone (20.0 mAP from scale++): the AS-20K recipe, ftmode="videoonly".
#   python train.py config/finetune_as20k.py config/finetune_as20k_videoonly.py
out_dir = "out/finetune_as20k_videoonly"
ftmode = "videoonly"
