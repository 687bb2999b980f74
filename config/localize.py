# Localisation (README, docs/localization.md): the CPU demo's recipe on the synthetic set with two silent
# objects per frame, 128 px frames (an 8 x 8 patch grid, so that few clips have no patch centre on the sounding
# object) and lambda_c = 1 (the contrastive term is what relates the sound to the frame).
#   python prepare.py synthetic --out data/synthetic_distractors --image-size 128 --distractors 2
#   python train.py config/pretrain_synthetic.py config/localize.py                   # ~12 min on 2 cores
#   python eval.py localize --checkpoint out/localize/final.pt --data data/synthetic_distractors/test.json \
#       --out out/localize
out_dir = "out/localize"
data_train = "data/synthetic_distractors/train.json"
data_val = "data/synthetic_distractors/test.json"
label_csv = "data/synthetic_distractors/labels.csv"
model_img_size = 128
contrastive_weight = 1.0
eval_interval = 10000  # the final evaluation only
epochs = 48  # twice the demo's: the map listened better at 2,976 steps than at 1,488 (docs/localization.md)
