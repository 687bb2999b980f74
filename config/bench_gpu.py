# Throughput benchmark of base-model pretraining on one GPU: bf16, torch.compile, device-side preprocessing.
#   python prepare.py synthetic --out data/synthetic224 --image-size 224 --seconds 10 --n-train 2000 --n-test 64
#   python train.py config/bench_gpu.py                       # batch 48; --batch_size=256 for the scale++ batch
# The log (out/bench_gpu/log.jsonl) has samples_per_s and mfu (model FLOPs / peak_flops) every log_interval.
out_dir = "out/bench_gpu"
task = "pretrain"
data_train = "data/synthetic224/train.json"
data_val = "data/synthetic224/test.json"
label_csv = "data/synthetic224/labels.csv"
model_preset = "base"
model_norm_pix_loss = True
batch_size = 48
lr = 5e-5
max_iters = 200
eval_interval = -1             # no evaluation inside the benchmark, only the final one
log_interval = 20
device = "cuda"
dtype = "bfloat16"
compile = True
gpu_preprocess = "on"
num_workers = 12
