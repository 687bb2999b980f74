# End-to-end throughput of base-model pretraining on one GPU: the real loader (8 workers that decode, fbank and
# augmentation on the GPU), bf16, each block compiled, on 224 px / 10 s clips. bench.py's e2e mode runs this.
#   python prepare.py synthetic --out data/synthetic224 --image-size 224 --seconds 10 --n-train 4000 --n-test 64
#   python train.py config/bench_gpu.py                       # batch 256; --batch_size=48 for the official batch
# out/bench_gpu/log.jsonl: samples_per_s and mfu every log_interval, and one "epoch" record per epoch (the
# throughput of the whole epoch, evaluation and checkpoints excluded): compare it with bench.py at the same batch.
out_dir = "out/bench_gpu"
overwrite = True  # a benchmark, not a run to continue
task = "pretrain"
data_train = "data/synthetic224/train.json"
data_val = "data/synthetic224/test.json"
label_csv = "data/synthetic224/labels.csv"
model_preset = "base"
model_norm_pix_loss = True
batch_size = 256
lr = 5e-5
max_iters = 200  # 13 epochs of 15 steps: many epoch boundaries
eval_interval = -1  # no evaluation inside the benchmark, only the final one
save_minutes = 0.0
save_epochs = False  # no checkpoint inside the benchmark but the last
log_interval = 20
device = "cuda"
dtype = "bfloat16"
compile = True
gpu_preprocess = "on"
num_workers = 8
