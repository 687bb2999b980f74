# End-to-end throughput of base-model pretraining on one GPU: the real loader (8 workers that decode, fbank and
# augmentation on the GPU), bf16, each block compiled, on 224 px / 10 s clips. Compare its log's samples_per_s with bench.py's.
#   python prepare.py synthetic --out data/synthetic224 --image-size 224 --seconds 10 --n-train 4000 --n-test 64
#   python train.py config/bench_gpu.py                       # batch 256; --batch_size=48 for the official batch
# out/bench_gpu/log.jsonl: samples_per_s every log_interval steps (evaluation and checkpoints excluded).
out_dir = "out/bench_gpu"
overwrite = True  # a benchmark, not a run to continue
task = "pretrain"
data_train = "data/synthetic224/train.json"
data_val = "data/synthetic224/test.json"
label_csv = "data/synthetic224/labels.csv"
model_norm_pix_loss = True
batch_size = 256
lr = 5e-5
max_iters = 200  # 13 epochs of 15 steps: many epoch boundaries
eval_interval = 1000  # no evaluation inside the benchmark, only the final one
log_interval = 20
device = "cuda"
dtype = "bfloat16"
compile = True
num_workers = 8
