#!/usr/bin/env bash
# One-time set-up of a fresh machine: a virtual environment with the pinned requirements
# in .venv, the CPU path's oneDNN convolutions built, and real Fashion-MNIST from Debian's
# package when apt is available (as root).
#   bash experiments/setup.sh        what training needs (requirements.txt)
#   bash experiments/setup.sh test   also what the tests need (requirements-test.txt)
#   bash experiments/setup.sh tf     also TensorFlow in .venv-tf, for the tf.data peer of
#                                    `python -m experiments.benchmark --input-pipeline`
#   bash experiments/setup.sh test-no-torch   the tests' requirements less PyTorch
# Environment:
#   ACCELERATOR=cpu (default: requirements.txt) | cuda12 | cuda13 | tpu | newest: which jax
#     wheels, from requirements-ACCELERATOR.txt (jax 0.12: Python 3.12+, found on PATH or
#     under pyenv when PYTHON is not given)
#   PYTHON=...  the interpreter of the virtual environment (default python3)
#   VENV=...    its directory (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
ACCELERATOR="${ACCELERATOR:-cpu}"
VENV="${VENV:-.venv}"
case "$ACCELERATOR" in
  cpu) REQUIREMENTS=requirements.txt ;;
  cuda12|cuda13|tpu|newest) REQUIREMENTS="requirements-$ACCELERATOR.txt" ;;
  *) echo "ACCELERATOR=$ACCELERATOR: expected cpu, cuda12, cuda13, tpu or newest" >&2; exit 2 ;;
esac
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  if [ "$ACCELERATOR" != cpu ]; then  # jax 0.12 needs Python 3.12+
    for candidate in python3 python3.14 python3.13 python3.12 \
        $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python 2>/dev/null | sort -rV); do
      if command -v "$candidate" >/dev/null \
          && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
        PYTHON="$candidate"; break
      fi
    done
  fi
fi
if [ "$ACCELERATOR" != cpu ] && ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
  echo "$REQUIREMENTS (jax 0.12) needs Python 3.12 or newer; $PYTHON is $("$PYTHON" -V 2>&1)." \
       "Give one with PYTHON=/path/to/python3.12" >&2
  exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -r "$REQUIREMENTS"
# the package itself, editable (the resnet-jax-* commands; the pinned files gave its dependencies)
"$VENV/bin/python" -m pip install --quiet --no-deps -e .
# oneDNN's convolutions for the CPU path (x86-64 Linux); without them XLA's are used.
if [ "$ACCELERATOR" = cpu ] && [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then
  "$VENV/bin/python" -m resnet_jax.ops.dnnl_conv \
    || echo "oneDNN convolutions not built; the CPU path uses XLA's convolutions."
fi
if [ "${1:-}" = "test" ] || [ "${1:-}" = "tf" ]; then
  "$VENV/bin/python" -m pip install --quiet -r requirements-test.txt
  "$VENV/bin/python" -m pip install --quiet --no-deps -r requirements-bench-nodeps.txt
elif [ "${1:-}" = "test-no-torch" ]; then
  # (the other files it names, by absolute path: pip reads -r beside the file that has it)
  grep -v -E '^(torch|torchvision|timm)==|^-r requirements-bench.txt' requirements-test.txt \
    | sed "s|^-r |-r $PWD/|" > "$VENV/requirements-test-no-torch.txt"
  "$VENV/bin/python" -m pip install --quiet -r "$VENV/requirements-test-no-torch.txt"
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
"$VENV/bin/python" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
