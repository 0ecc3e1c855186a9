"""Nothing lost: SIGKILL, SIGTERM, divergence, damaged checkpoints, two runs on one workdir,
and bad input, each with the message a researcher would see. The kill tests run real
training processes (`python -m experiments.train`) on the real Fashion-MNIST files."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from conftest import ROOT
from resnet_jax.training import experiment, guard, loop
from resnet_jax.training.losses import get_loss
from resnet_jax.training.checkpoint import Checkpointer
from resnet_jax.training.rundir import CheckpointError
from resnet_jax.training.config import base_config, validate_config

EVERY = 2  # checkpoint_every_steps of the process tests


def small_config(**overrides) -> ml_collections.ConfigDict:
    """The main job's recipe on 256 training images: 8 steps an epoch, 3 epochs."""
    c = base_config()
    c.update(dict(model="fashion_mnist_resnet8", dataset="fashion_mnist", train_subset=256,
                  eval_subset=200, batch_size=32, eval_batch_size=200, num_epochs=3,
                  optimizer="sgd", learning_rate=0.05, schedule="cosine", nesterov=True,
                  checkpoint_every_steps=EVERY, keep_checkpoints=3, log_every_steps=1,
                  progress_bar=False, augment="flip"))
    c.update(overrides)
    return c


def cli_args(c: ml_collections.ConfigDict, workdir: str) -> list[str]:
    args = [sys.executable, "-m", "experiments.train", "--config",
            os.path.join(ROOT, "experiments", "configs", "fashion_mnist.py"), "--workdir", workdir]
    for key in ("model", "train_subset", "eval_subset", "batch_size", "eval_batch_size",
                "num_epochs", "learning_rate", "schedule", "nesterov", "checkpoint_every_steps",
                "keep_checkpoints", "log_every_steps", "progress_bar", "augment", "optimizer",
                "weight_decay", "momentum", "warmup_epochs", "label_smoothing", "seed",
                "data_workers"):
        args.append(f"--config.{key}={c[key]}")
    # a test record every period, which the tests that read the records were written for (the
    # main job evaluates the test split once, at the end)
    args.append("--config.test_every_period=True")
    # one view pair: these tests are about the training state (the shifted views add four
    # flip-averaged passes to each evaluation; tests/test_api.py runs them)
    args.append("--config.eval_shift=0")
    return args


def final_state(workdir: str):
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        return ckpt.restore_raw()
    finally:
        ckpt.close()


def complete_steps(workdir: str) -> list[int]:
    """Checkpoint steps whose directories are complete (orbax renames them when done)."""
    latest = os.path.join(workdir, "checkpoints", "latest")
    if not os.path.isdir(latest):
        return []
    return sorted(int(n) for n in os.listdir(latest) if n.isdigit())


def logged_step(workdir: str) -> int:
    path = os.path.join(workdir, "train_metrics.jsonl")
    if not os.path.exists(path):
        return 0
    lines = [l for l in open(path).read().splitlines() if l.strip()]
    try:
        return json.loads(lines[-1])["step"] if lines else 0
    except json.JSONDecodeError:  # a line being written
        return json.loads(lines[-2])["step"] if len(lines) > 1 else 0


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for_step(proc, workdir: str, step: int, timeout: float = 240.0) -> int:
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}): "
                                 f"{proc.stderr.read()[-3000:]}")
        reached = logged_step(workdir)
        if reached >= step:
            return reached
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def run_to_end(c, workdir: str) -> str:
    out = subprocess.run(cli_args(c, workdir), cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stderr


def assert_same_tree(a, b):
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [k for k, _ in la] == [k for k, _ in lb]
    for (key, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(key))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, real_fashion_mnist_files):
    """An uninterrupted run of the process tests' recipe, through the CLI."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    run_to_end(small_config(), workdir)
    return workdir


@pytest.fixture(scope="module")
def real_fashion_mnist_files():
    from resnet_jax.data.sources import DEBIAN_FASHION_MNIST

    if not os.path.exists(os.path.join(DEBIAN_FASHION_MNIST, "train-images-idx3-ubyte.gz")):
        pytest.fail("real Fashion-MNIST is missing: apt-get install dataset-fashion-mnist")


# --- process tests -------------------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_at_a_random_step_then_restart_ends_with_the_uninterrupted_parameters(
        tmp_path, reference):
    seed = int(os.environ.get("KILL_SEED", random.randrange(1 << 30)))
    workdir = str(tmp_path / "killed")
    # with two input worker processes; the reference ran with none: the batches do not
    # depend on it, and the pipeline resumes from the position saved in the checkpoint
    killed = small_config(data_workers=2)
    proc = subprocess.Popen(cli_args(killed, workdir), cwd=ROOT, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        wait_for_step(proc, workdir, 2)
        while not complete_steps(workdir):  # the first save is the slowest
            assert proc.poll() is None
            time.sleep(0.02)
        first = logged_step(workdir)
        kill_at = random.Random(seed).randrange(first + 1, 22)  # of 24 steps
        reached = wait_for_step(proc, workdir, kill_at)
        workers, deadline = children(proc.pid), time.time() + 30
        while len(workers) < 2 and time.time() < deadline:  # one snapshot once caught a
            time.sleep(0.01)  # single child: kill when the workers are seen, not before
            workers = children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = complete_steps(workdir)
    assert proc.returncode == -signal.SIGKILL
    # the input workers (and grain's resource tracker) do not outlive the training process
    assert len(workers) >= 2, workers
    deadline = time.time() + 15
    while any(alive(p) for p in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in workers), [p for p in workers if alive(p)]
    err = run_to_end(killed, workdir)
    resumed = int(re.search(r"resumed from step (\d+)", err).group(1))
    # it resumed from the newest complete checkpoint, so it re-did only the steps after it
    assert saved and resumed == saved[-1], (seed, saved, resumed)
    print(f"KILL_SEED={seed}: killed after step {reached}, resumed from step {resumed}")
    (step_a, state_a), (step_b, state_b) = final_state(reference), final_state(workdir)
    assert step_a == step_b == 24
    assert_same_tree(state_a, state_b)  # bit-identical: same data order, same dropout keys


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_saves_the_current_step_exits_0_and_the_next_start_resumes_there(
        tmp_path, reference, sig):
    workdir = str(tmp_path / "terminated")
    proc = subprocess.Popen(cli_args(small_config(), workdir), cwd=ROOT, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    wait_for_step(proc, workdir, 5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    stopped = int(re.search(rf"received {sig.name} at step (\d+): checkpoint saved", err).group(1))
    assert 5 <= stopped < 24
    assert complete_steps(workdir)[-1] == stopped
    assert logged_step(workdir) == stopped  # it finished the step it was in, no more
    err = run_to_end(small_config(), workdir)
    assert f"resumed from step {stopped}" in err
    assert_same_tree(final_state(reference)[1], final_state(workdir)[1])


def test_a_second_run_on_a_busy_workdir_is_refused(tmp_path):
    workdir = str(tmp_path / "busy")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from resnet_jax.training import guard\n"
         "with guard.workdir_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)",
         workdir], cwd=ROOT, stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(guard.WorkdirBusyError, match=r"workdir .*busy is in use by another "
                           rf"run \(.*\"pid\": {holder.pid}"):
            loop.train_and_evaluate(small_config(), workdir)
        assert not os.path.exists(os.path.join(workdir, "checkpoints"))
    finally:
        holder.kill()
        holder.wait()
    with guard.workdir_lock(workdir):  # released when its holder died
        pass


# --- divergence ----------------------------------------------------------------------------

def test_an_exploding_learning_rate_stops_with_the_step_and_keeps_the_last_finite_checkpoint(
        tmp_path, real_fashion_mnist_files):
    workdir = str(tmp_path / "diverged")
    c = small_config(learning_rate=1e12, schedule="constant", checkpoint_every_steps=1,
                     log_every_steps=4, num_epochs=2)
    with pytest.raises(FloatingPointError, match=r"non-finite loss or gradient at step (\d+)") as e:
        loop.train_and_evaluate(c, workdir)
    bad = int(re.search(r"at step (\d+)", str(e.value)).group(1))
    step, state = final_state(workdir)
    assert step == bad - 1  # the latest checkpoint is the state before the bad step
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))
    assert bad >= 2


def test_skip_nonfinite_steps_keeps_the_state_and_goes_on(tmp_path, real_fashion_mnist_files):
    from resnet_jax.training.state import create_train_state
    from resnet_jax.training.steps import make_train_step

    c = small_config()
    exp = experiment.setup(c, load_train=False)
    state = create_train_state(exp.model, exp.tx, jax.random.key(0), exp.image_shape)
    step = jax.jit(make_train_step(exp.model, exp.tx, exp.schedule, get_loss(c.loss),
                                   skip_nonfinite=True))
    images = np.zeros((4, 28, 28, 1), np.float32)
    images[0, 0, 0, 0] = np.nan
    new, metrics = step(state, {"image": images, "label": np.zeros(4, np.int32)},
                        jax.random.key(1))
    assert not bool(metrics["finite"]) and int(new.step) == 1
    assert_same_tree(new.params, state.params)
    assert_same_tree(new.opt_state, state.opt_state)
    good, metrics = step(new, {"image": np.ones((4, 28, 28, 1), np.float32),
                               "label": np.zeros(4, np.int32)}, jax.random.key(1))
    assert bool(metrics["finite"])
    assert not np.array_equal(good.params["fc"]["kernel"], state.params["fc"]["kernel"])


# --- damaged checkpoints -------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, real_fashion_mnist_files):
    workdir = str(tmp_path_factory.mktemp("damaged"))
    loop.train_and_evaluate(small_config(halt_after_steps=4, checkpoint_every_steps=2), workdir)
    return workdir


def _copy(src: str, dst: str) -> str:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _largest_file(step_dir: str) -> str:
    files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs]
    return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["truncate", "flip_a_byte", "delete_metadata"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before_with_a_warning(
        tmp_path, two_checkpoints, damage, caplog):
    workdir = _copy(two_checkpoints, str(tmp_path / "run"))
    assert complete_steps(workdir) == [2, 4]
    step_dir = os.path.join(workdir, "checkpoints", "latest", "4")
    if damage == "truncate":
        path = _largest_file(step_dir)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif damage == "flip_a_byte":
        path = _largest_file(step_dir)
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
    else:
        for root, _, files in os.walk(step_dir):
            for name in files:
                if "metadata" in name.lower():
                    os.remove(os.path.join(root, name))
    c = small_config(halt_after_steps=6)
    with caplog.at_level("WARNING", logger="resnet_jax"):
        loop.train_and_evaluate(c, workdir)
    text = caplog.text
    assert "checkpoint latest/4 is damaged" in text and "falling back to step 2" in text
    assert complete_steps(workdir)[-1] == 6


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path, two_checkpoints):
    workdir = _copy(two_checkpoints, str(tmp_path / "run"))
    for step in (2, 4):
        path = _largest_file(os.path.join(workdir, "checkpoints", "latest", str(step)))
        with open(path, "r+b") as f:
            f.truncate(1)
    with pytest.raises(CheckpointError, match="no usable latest checkpoint.*step 4.*step 2"):
        loop.train_and_evaluate(small_config(halt_after_steps=6), workdir)


def test_a_crash_while_writing_leaves_the_previous_checkpoint_usable(tmp_path, two_checkpoints):
    workdir = _copy(two_checkpoints, str(tmp_path / "run"))
    latest = os.path.join(workdir, "checkpoints", "latest")
    # what a process killed mid-save leaves: orbax's temporary directory for step 6
    partial = os.path.join(latest, "6.orbax-checkpoint-tmp-1234")
    os.makedirs(os.path.join(partial, "state"))
    open(os.path.join(partial, "state", "half_written"), "wb").write(b"\0" * 10)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        restored = ckpt.restore_checked()
    finally:
        ckpt.close()
    assert restored.step == 4 and restored.meta["data_position"]["step"] == 4


def test_the_checkpoint_holds_what_is_needed_to_continue_exactly(two_checkpoints):
    ckpt = Checkpointer(os.path.join(two_checkpoints, "checkpoints"))
    try:
        restored = ckpt.restore_checked()
    finally:
        ckpt.close()
    assert set(restored.state) == {"step", "params", "batch_stats", "opt_state", "ema"}
    assert not restored.state["ema"]  # ema_decay=0: no average kept
    meta = restored.meta
    assert meta["model"] == "fashion_mnist_resnet8" and meta["num_classes"] == 10
    assert meta["seed"] == 0 and meta["batch_size"] == 32
    assert meta["data_position"] == {"step": 4, "epoch": 0, "batch_in_epoch": 4}
    # the input pipeline's position after step 4's batch: grain's iterator state, 4 batches
    assert meta["pipeline"]["workers"] == 0
    assert "4" in json.dumps(meta["pipeline"]["state"])
    expected_key = jax.random.key_data(jax.random.split(jax.random.key(0))[1])
    assert np.array_equal(np.asarray(meta["dropout_key"]), np.asarray(expected_key))


# --- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,message", [
    ("batch_size", "128", r"batch_size='128' has type str; expected number"),
    ("learning_rate", -0.1, r"learning_rate=-0.1 must be a positive number"),
    ("momentum", 1.5, r"momentum=1.5 must be in \[0, 1\)"),
    ("num_epochs", 2.5, r"num_epochs=2.5 must be an integer"),
    ("nesterov", "yes", r"nesterov='yes' has type str; expected bool"),
    ("keep_checkpoints", 0, r"keep_checkpoints=0 must be >= 1"),
    ("dataset", "fashion_mnits", r"dataset='fashion_mnits'; expected one of \('mnist', 'fashion_mnist'"),
    ("model", "resnet19", r"resnet19"),
    ("parallel", "ddp", r"parallel='ddp'; expected one of"),
])
def test_bad_config_values_are_named(field, value, message):
    # a config file may build its ConfigDict from a plain dict, so any type can arrive
    c = ml_collections.ConfigDict({**small_config().to_dict(), field: value})
    with pytest.raises(ValueError, match=message):
        validate_config(c)


def test_the_command_line_refuses_a_value_of_the_wrong_type(tmp_path):
    c = small_config()
    out = subprocess.run(cli_args(c, str(tmp_path / "w")) + ["--config.batch_size=abc"],
                         cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode != 0
    assert "batch_size" in out.stderr and "abc" in out.stderr


def test_a_misspelled_config_field_is_named_with_a_suggestion():
    c = small_config()
    c.learing_rate = 0.1
    with pytest.raises(ValueError, match=r"unknown config field 'learing_rate'; did you mean "
                       r"'learning_rate'\?"):
        validate_config(c)


def test_a_dataset_tfds_does_not_know_is_named(tmp_path):
    from resnet_jax.data.sources import load_source

    with pytest.raises(ValueError, match=r"'not_a_dataset'.*known"):
        load_source("not_a_dataset", "train", str(tmp_path), "tfds")


def test_images_that_do_not_fit_the_model_are_named():
    model = experiment.get_model("alexnet")
    with pytest.raises(ValueError, match=r"model 'alexnet' cannot take images of shape "
                       r"\(28, 28, 1\)"):
        experiment.check_input_shape(model, "alexnet", (28, 28, 1))


def test_a_checkpoint_of_another_model_or_class_count_is_refused(tmp_path, two_checkpoints):
    workdir = _copy(two_checkpoints, str(tmp_path / "run"))
    other = small_config(model="cifar_resnet20", halt_after_steps=6)
    with pytest.raises(ValueError, match=r"written with model='fashion_mnist_resnet8', but this "
                       r"run has model='cifar_resnet20'"):
        loop.train_and_evaluate(other, workdir)
    with pytest.raises(ValueError, match=r"written with num_classes=10, but this run has "
                       r"num_classes=7"):
        loop.train_and_evaluate(small_config(num_classes=7, halt_after_steps=6), workdir)
    with pytest.raises(ValueError, match=r"written with seed=0, but this run has seed=3"):
        loop.train_and_evaluate(small_config(seed=3, halt_after_steps=6), workdir)
    # same name, other architecture (a field override): the array shapes say it
    wider = small_config(halt_after_steps=6)
    wider.model_overrides = ml_collections.ConfigDict({"stage_widths": (16, 32, 64)})
    with pytest.raises(ValueError, match=r"params/fc/kernel has shape \(128, 10\), the model's "
                       r"is \(64, 10\)"):
        loop.train_and_evaluate(wider, workdir)
    assert complete_steps(workdir) == [2, 4]  # nothing was overwritten


def test_a_batch_that_does_not_divide_across_devices_is_named():
    from resnet_jax.training.parallel import _check_divisible

    with pytest.raises(ValueError, match=r"batch size 30 does not divide across 4 devices"):
        _check_divisible(30, 4, "batch size")
