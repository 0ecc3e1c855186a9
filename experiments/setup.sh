#!/usr/bin/env bash
# One-time set-up of a fresh machine: a virtual environment with the pinned requirements
# in .venv, the CPU path's oneDNN convolutions built, and real Fashion-MNIST from Debian's
# package when apt is available (as root).
#   bash experiments/setup.sh        what training needs (requirements.txt)
#   bash experiments/setup.sh test   also what the tests need (requirements-test.txt)
#   bash experiments/setup.sh tf     also TensorFlow in .venv-tf, for the tf.data peer of
#                                    `python -m experiments.benchmark --input-pipeline`
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt
# oneDNN's convolutions for the CPU path (x86-64 Linux); without them XLA's are used.
if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then
  .venv/bin/python -m resnet_jax.ops.dnnl_conv \
    || echo "oneDNN convolutions not built; the CPU path uses XLA's convolutions."
fi
if [ "${1:-}" = "test" ] || [ "${1:-}" = "tf" ]; then
  .venv/bin/python -m pip install --quiet -r requirements-test.txt
fi
if [ "${1:-}" = "tf" ]; then
  [ -x .venv-tf/bin/python ] || "$PYTHON" -m venv .venv-tf
  .venv-tf/bin/python -m pip install --quiet -r requirements-tf.txt
fi
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] \
    && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "Installing real Fashion-MNIST (Debian package dataset-fashion-mnist)..."
  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null \
    || echo "dataset-fashion-mnist not installed; the Fashion-MNIST configs will use tfds."
fi
.venv/bin/python -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
