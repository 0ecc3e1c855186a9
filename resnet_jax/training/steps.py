"""Pure train and eval steps, written once in per-device (SPMD) form.

`axis_name` names the device axis that gradients and metrics are averaged over; it is None
on a single device. The strategy (`parallel.py`) decides how a step is mapped.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from resnet_jax.training.losses import Loss
from resnet_jax.training.mixing import mix_batch
from resnet_jax.training.optim import current_learning_rate
from resnet_jax.training.state import TrainState

Metrics = dict[str, jax.Array]


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where the label is among the k highest logits (ties broken by index)."""
    k = min(k, logits.shape[-1])
    _, top = lax.top_k(logits, k)
    return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def _mean(x: jax.Array, axis_name: str | None) -> jax.Array:
    return lax.pmean(x, axis_name) if axis_name else x


def _sum(x, axis_name: str | None):
    return lax.psum(x, axis_name) if axis_name else x


def make_train_step(model, tx: optax.GradientTransformationExtraArgs, schedule: Callable,
                    loss_fn: Loss, axis_name: str | None = None,
                    skip_nonfinite: bool = False, frozen_backbone: bool = False,
                    accumulate: int = 1, mix: tuple[float, float] = (0.0, 0.0),
                    ema: tuple[float, bool] = (0.0, True), preprocess: Callable | None = None
                    ) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, Metrics]]:
    """train_step(state, batch, rng) -> (state, metrics) for `model`, optimizer `tx` and
    per-example `loss_fn(logits, labels)`.

    `metrics` is a dict of scalars, averaged over devices; the loop logs every key it holds
    (a new metric is one more entry here). `finite` is the one key the loop acts on.

    The dropout key is `fold_in(rng, step)` (and the device index when mapped), so a run
    resumed at step s draws the same dropout masks as an uninterrupted one. With
    `skip_nonfinite`, a step whose loss or gradient is not finite leaves params, batch
    statistics and optimizer state as they were (the step counter still advances, so the
    data moves on); `metrics["finite"]` says which steps those were. With
    `frozen_backbone` the model runs in inference mode (BatchNorm on its running statistics,
    which stay as they are; no dropout): `tx` then updates only the head.

    With `accumulate` = k > 1 the (per-device) batch is split into k equal micro-batches
    that run one after another (lax.scan: the activations of one at a time), their mean
    gradients averaged: the update of the whole batch, from a k-th of the activation
    memory. BatchNorm then normalises each micro-batch with its own statistics.

    `mix` = (mixup alpha, CutMix alpha), 0 for off: each device's batch is mixed on the
    device (`mixing.mix_batch`) and the loss is lam * L(labels) + (1 - lam) * L(partner
    labels), which is the loss against the mixed one-hot targets for these linear losses
    (a loss with a `mixed` method, BCE with a target threshold, is taken of the mixed
    targets instead); `accuracy` is then weighted the same way.

    `ema` = (decay, warm-up): with decay > 0, `state.ema` (params and batch statistics)
    moves to `decay * ema + (1 - decay) * new` each step; with warm-up the decay is
    min(decay, (1 + t) / (10 + t)) at the t-th update (tf.train.ExponentialMovingAverage's
    num_updates), so the average is not held at the random initialisation early on.

    `preprocess(images, key, first_index)` (`data.on_device.DeviceInput`) turns the batch's
    uint8 images into the model's input on the device, before mixing; its key is
    `fold_in(fold_in(rng, step), 2**21)`, the same on every device, and `first_index` is
    the device's first example in the global batch.
    """
    mixing = mix[0] > 0 or mix[1] > 0
    if accumulate < 1:
        raise ValueError(f"accumulate={accumulate}; expected an integer >= 1")

    def gradients(params, batch_stats, images, targets, key):
        """(loss, top-1 accuracy, new batch statistics), gradients of one (micro-)batch;
        targets = (labels, partner labels, weight of labels)."""
        labels, partners, lam = targets

        def objective(params):
            variables = {"params": params, "batch_stats": batch_stats}
            if frozen_backbone:
                logits = model.apply(variables, images, train=False)
                updates = {}
            else:
                logits, updates = model.apply(variables, images, train=True,
                                              mutable=["batch_stats"], rngs={"dropout": key})
            if mixing and hasattr(loss_fn, "mixed"):  # a loss of the mixed targets
                loss = jnp.mean(loss_fn.mixed(logits, labels, partners, lam))
            else:
                loss = jnp.mean(loss_fn(logits, labels))
                if mixing:
                    loss = lam * loss + (1.0 - lam) * jnp.mean(loss_fn(logits, partners))
            return loss, (logits, updates.get("batch_stats", batch_stats))

        (loss, (logits, stats)), grads = jax.value_and_grad(objective, has_aux=True)(params)
        hits = jnp.mean(topk_correct(logits, labels, 1))
        if mixing:
            hits = lam * hits + (1.0 - lam) * jnp.mean(topk_correct(logits, partners, 1))
        return (loss, hits, stats), grads

    def accumulated(params, batch_stats, images, targets, key):
        labels, partners, lam = targets
        n = images.shape[0]
        if n % accumulate:
            raise ValueError(f"a batch of {n} per device does not split into "
                             f"grad_accumulation_steps={accumulate} equal micro-batches")
        split = lambda x: x.reshape(accumulate, n // accumulate, *x.shape[1:])  # noqa: E731

        def body(carry, xs):
            stats, grad_sum, loss_sum, hit_sum = carry
            k, micro_images, micro_labels, micro_partners = xs
            (loss, hits, stats), grads = gradients(
                params, stats, micro_images, (micro_labels, micro_partners, lam),
                jax.random.fold_in(key, k))
            grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
            return (stats, grad_sum, loss_sum + loss, hit_sum + hits), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        start = (batch_stats, zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (stats, grad_sum, loss_sum, hit_sum), _ = lax.scan(
            body, start, (jnp.arange(accumulate), split(images), split(labels), split(partners)))
        grads = jax.tree.map(lambda g: g / accumulate, grad_sum)
        return (loss_sum / accumulate, hit_sum / accumulate, stats), grads

    def train_step(state: TrainState, batch: dict, rng: jax.Array):
        key = base = jax.random.fold_in(rng, state.step)
        if axis_name:
            key = jax.random.fold_in(key, lax.axis_index(axis_name))
        images = batch["image"]
        if preprocess is not None:
            first = lax.axis_index(axis_name) * images.shape[0] if axis_name else 0
            images = preprocess(images, jax.random.fold_in(base, 1 << 21), first)
        images, labels, partners, lam = mix_batch(
            jax.random.fold_in(key, 1 << 20), images, batch["label"], *mix)
        compute = accumulated if accumulate > 1 else gradients
        (loss, accuracy, batch_stats), grads = compute(
            state.params, state.batch_stats, images, (labels, partners, lam), key)
        grads = _mean(grads, axis_name)
        loss = _mean(loss, axis_name)
        # Per-device BatchNorm normalises with each device's own statistics; the running
        # averages are then averaged over devices. The running-average update is linear, so
        # averaging every step equals averaging once before evaluation or saving, and the
        # state stays identical on every device. (With synchronised BN they already agree.)
        batch_stats = _mean(batch_stats, axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.global_norm(grads)
        metrics = {
            "loss": loss,
            "accuracy": _mean(accuracy, axis_name),
            "learning_rate": current_learning_rate(schedule, state.opt_state, state.step),
            "grad_norm": grad_norm,
            "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm),
        }
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                                  opt_state=opt_state)
        if ema[0] > 0:
            new_state = new_state.replace(ema=update_ema(
                state.ema, {"params": params, "batch_stats": batch_stats}, state.step, *ema))
        if skip_nonfinite:
            keep = metrics["finite"]
            new_state = new_state.replace(**{
                name: jax.tree.map(lambda new, old: jnp.where(keep, new, old),
                                   getattr(new_state, name), getattr(state, name))
                for name in ("params", "batch_stats", "opt_state", "ema")})
        return new_state, metrics

    return train_step


def ema_decay_at(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
    """The EMA decay used by the update after `step` steps."""
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    t = step.astype(jnp.float32) + 1.0
    return jnp.minimum(decay, (1.0 + t) / (10.0 + t))


def update_ema(average, new, step: jax.Array, decay: float, warmup: bool):
    """`decay * average + (1 - decay) * new`, leaf by leaf, in each leaf's dtype."""
    d = ema_decay_at(step, decay, warmup)
    return jax.tree.map(lambda a, n: (d * a + (1.0 - d) * n).astype(a.dtype), average, new)


def shifted(images: jax.Array, pixels: int, axis: int) -> jax.Array:
    """`images` (NHWC) moved by `pixels` along `axis` (1: down, 2: right; negative: up,
    left), the vacated rows or columns repeating the edge they moved away from. Slices and a
    concatenation only, so exported graphs hold it."""
    n = abs(pixels)
    if n == 0:
        return images
    size = images.shape[axis]
    if n >= size:
        raise ValueError(f"a shift of {pixels} pixels needs images larger than {size} "
                         f"along axis {axis}")
    take = lambda start, stop: lax.slice_in_dim(images, start, stop, axis=axis)  # noqa: E731
    if pixels > 0:
        return jnp.concatenate([take(0, 1)] * n + [take(0, size - n)], axis=axis)
    return jnp.concatenate([take(n, size)] + [take(size - 1, size)] * n, axis=axis)


def eval_views(images: jax.Array, flip: bool = False, shift: int = 0
               ) -> tuple[list[jax.Array], list[float]]:
    """The test-time views of NHWC `images` and their weights (summing to 1): the images,
    with `flip` also their left-right mirror; with `shift` > 0 the images weigh one half and
    the four views moved by `shift` pixels up, down, left and right (`shifted`) one eighth
    each, every view sharing its weight with its mirror under `flip`."""
    groups = [images]
    if shift:
        groups += [shifted(images, sign * shift, axis) for axis in (1, 2) for sign in (1, -1)]
    group_weights = [1 / 2] + [1 / 8] * 4 if shift else [1.0]
    views, weights = [], []
    for x, w in zip(groups, group_weights):
        views += [x, jnp.flip(x, axis=2)] if flip else [x]
        weights += [w / 2] * 2 if flip else [w]
    return views, weights


def eval_logits(model, variables, images: jax.Array, flip: bool = False,
                shift: int = 0, unroll: bool = False) -> jax.Array:
    """The model's logits in inference mode. With `flip` or `shift`, the log of the class
    probabilities averaged over the views of `eval_views` with their weights. The views run
    one after another through a single traced copy of the model (`lax.map`), so the step
    compiles and holds activations as for one view; `unroll=True` traces one copy per view
    instead, a graph of plain operations for exporters that take no loops."""
    if not flip and not shift:
        return model.apply(variables, images, train=False)
    views, weights = eval_views(images, flip, shift)

    def probabilities(x):
        return jax.nn.softmax(model.apply(variables, x, train=False).astype(jnp.float32))

    if unroll:
        p = sum(w * probabilities(x) for x, w in zip(views, weights))
    else:
        p = jnp.einsum("v,vnc->nc", jnp.asarray(weights, jnp.float32),
                       lax.map(probabilities, jnp.stack(views)))
    return jnp.log(p)


def make_eval_step(model, num_classes: int, loss_fn: Loss, axis_name: str | None = None,
                   flip: bool = False, preprocess: Callable | None = None, shift: int = 0
                   ) -> Callable[[TrainState, dict], Metrics]:
    """eval_step(state, batch) -> sums over the valid (mask=1) examples of the batch: loss,
    top-1 and top-5 hits (`accuracy`, `top5_accuracy`), `count`, and the `confusion` matrix
    (true x predicted). Every key but those two is a sum to divide by the count. `flip`,
    `shift`: predictions from each image and its mirror image, and from views of it shifted
    by `shift` pixels (`eval_logits`). `preprocess(images)`
    turns uint8 images into the model's input on the device."""

    def eval_step(state: TrainState, batch: dict) -> Metrics:
        images = preprocess(batch["image"]) if preprocess is not None else batch["image"]
        logits = eval_logits(model, {"params": state.params, "batch_stats": state.batch_stats},
                             images, flip, shift)
        mask = batch.get("mask", jnp.ones(logits.shape[0], jnp.float32))
        labels = batch["label"]
        predicted = jnp.argmax(logits, -1)
        confusion = jnp.einsum("ni,nj->ij", jax.nn.one_hot(labels, num_classes) * mask[:, None],
                               jax.nn.one_hot(predicted, num_classes))
        sums = {
            "loss": jnp.sum(loss_fn(logits, labels) * mask),
            "accuracy": jnp.sum(topk_correct(logits, labels, 1) * mask),
            "top5_accuracy": jnp.sum(topk_correct(logits, labels, 5) * mask),
            "count": jnp.sum(mask),
            "confusion": confusion,
        }
        return _sum(sums, axis_name)

    return eval_step
