# AudioSet-20K fine-tuning on audio alone (37.7 mAP in the paper): the AS-20K recipe with ftmode="audioonly".
#   python train.py config/finetune_as20k.py config/finetune_as20k_audioonly.py
out_dir = "out/finetune_as20k_audioonly"
ftmode = "audioonly"
