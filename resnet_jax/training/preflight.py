"""Before the first step: the train and eval steps compiled ahead of time, what a step needs
in memory by XLA's memory analysis of the compiled programs, set against what the machine
(CPU) or the device (GPU, TPU) has, and one start-up line (input, parameters, FLOPs, memory).

A run whose step would not fit stops here with `MemoryBudgetError`, one line naming the need,
the limit and what to lower, instead of being killed by the kernel minutes later. The
compiled programs are the ones the loop then runs (jax keeps them), so nothing is compiled
twice.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.data.sources import ArraySource
from resnet_jax.ops import heap
from resnet_jax.training import experiment
from resnet_jax.training.config import with_overrides

log = logging.getLogger("resnet_jax")

GIB = 2**30
PREFETCHED = 4  # training batches alive on the host at once: prefetch queue, transfer, step
HEADROOM = 0.9  # the share of the limit a step may plan for (fragmentation, the rest of
# the process: the pipeline's threads, the compiler, Python)
RETAINED = 3  # a step's peak in a retained heap (ops.heap) against XLA's analysis, at most
# (docs/cpu_speed_log.md, "A retained heap and large steps")


class MemoryBudgetError(ValueError):
    """A run whose step needs more memory than the machine or device has."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the start-up line says; bytes are per host (CPU) or per device."""

    input_shape: tuple[int, ...]  # one training batch's images, as the host sends them
    parameters: int
    flops_per_image: float  # forward pass, XLA's count (a multiply-add is 2)
    step_bytes: int  # the larger of the train and eval steps' peaks; 0 when unknown
    limit_bytes: int  # what the machine or device has for it; 0 when unknown
    where: str  # "host" or the device kind

    def line(self) -> str:
        memory = "memory not analysed"
        if self.step_bytes and self.limit_bytes:
            memory = (f"a step needs {self.step_bytes / GIB:.2f} GiB of the "
                      f"{self.limit_bytes / GIB:.2f} GiB available ({self.where})")
        return (f"input {'x'.join(map(str, self.input_shape))} uint8, {self.parameters:,} "
                f"parameters, {self.flops_per_image / 1e9:.3g} GFLOPs per image (forward); "
                f"{memory}")


def batch_images_shape(exp, batch: int, train: bool) -> tuple[int, ...]:
    """The shape of a batch's images as the pipeline gives them: an in-memory split's own
    (grayscale stays one channel), decoded images at the crop size."""
    source = exp.train_source if train else exp.eval_source
    if isinstance(source, ArraySource):
        return (batch, *source.images.shape[1:])
    size = (exp.config.image_size if train else experiment.eval_image_size(exp.config)) or 224
    return (batch, size, size, exp.image_shape[-1] if train else 3)


def _batch(shape: tuple[int, ...], mask: bool) -> dict[str, np.ndarray]:
    out = {"image": np.zeros(shape, np.uint8), "label": np.zeros(shape[0], np.int32)}
    if mask:
        out["mask"] = np.ones(shape[0], np.float32)
    return out


def _peak(compiled) -> int:
    """Bytes live during one run of a compiled program: arguments, outputs not written over
    donated arguments, and temporaries (0 where the backend gives no analysis)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - a backend without the analysis
        return 0
    if m is None:
        return 0
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
               + m.temp_size_in_bytes)


def compile_steps(exp, strategy, state, rng) -> int:
    """Compile the strategy's train and eval steps for the run's batches; the larger peak in
    bytes per device (0 when a strategy or backend cannot say)."""
    c = exp.config
    peaks = []
    for train in (True, False):
        step = strategy.train_step if train else strategy.eval_step
        if not hasattr(step, "lower"):  # towers: compiled at its first call
            return 0
        size = c.batch_size if train else experiment.eval_batch_size(c)
        batch = _batch(batch_images_shape(exp, size, train), mask=not train)
        put = strategy.put_train_batch if train else strategy.put_eval_batch
        args = (state, put(batch), rng) if train else (state, put(batch))
        peaks.append(_peak(step.lower(*args).compile()))
    return max(peaks) if all(peaks) else 0


def host_available() -> int:
    """Bytes this process may still come to hold: MemAvailable plus its own resident set,
    within the cgroup's limit where one is set (0 where the system does not say: no check)."""
    info = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, value = line.split(":", 1)
                info[name] = int(value.split()[0]) * 1024
    except OSError:  # not Linux
        return 0
    rss = _own_rss()
    available = info.get("MemAvailable", info.get("MemFree", 0)) + rss
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit, usage = _read(limit_file), int(_read(usage_file))
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < info.get("MemTotal", 1 << 62):
            available = min(available, int(limit) - usage + rss)
        break
    return available


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _own_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def device_limit() -> tuple[int, str]:
    """(bytes a step may use, where): the first local device's memory on an accelerator,
    the host's available memory on the CPU."""
    device = jax.local_devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        return int(stats.get("bytes_limit", 0)), device.device_kind
    return host_available(), "host"


def forward_flops(exp) -> float:
    """FLOPs of one image's forward pass by XLA's cost analysis of the plain (XLA-kernel)
    model: the CPU kernels' custom calls are not counted by XLA."""
    config = with_overrides(exp.config, cpu_kernels=False)
    model = experiment.build_model(config, exp.num_classes)
    x = jax.ShapeDtypeStruct((1, *exp.image_shape), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape),
                                                  train=False))
    lowered = jax.jit(lambda v, images: model.apply(v, images, train=False)).lower(variables, x)
    return float((lowered.cost_analysis() or {}).get("flops", 0.0))


def check(exp, strategy, state, rng) -> Plan:
    """Compile the steps, log the start-up line, and raise MemoryBudgetError when a step
    needs more memory than there is."""
    c = exp.config
    need = compile_steps(exp, strategy, state, rng)
    limit, where = device_limit()
    shape = batch_images_shape(exp, c.batch_size, True)
    if need and where == "host":
        # CPU devices share the host's memory; the input pipeline's batches live there too
        need = (need * jax.local_device_count()
                + PREFETCHED * int(np.prod(shape)) * max(1, c.data_workers))
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    plan = Plan(shape, params // _copies(strategy), forward_flops(exp), need, limit, where)
    if need and limit and need > HEADROOM * limit:
        machine = "this machine" if where == "host" else where
        size = c.image_size or "the dataset's"
        raise MemoryBudgetError(
            f"a training step needs {need / GIB:.1f} GiB (XLA's memory analysis of the "
            f"compiled step, batch {c.batch_size} of {shape[1]}x{shape[2]} images) but "
            f"{machine} has {limit / GIB:.1f} GiB available: lower batch_size (now "
            f"{c.batch_size}) or image_size (now {size}), or raise grad_accumulation_steps "
            f"(now {c.grad_accumulation_steps}) or lower data_workers (now {c.data_workers})")
    if where == "host" and need and RETAINED * need > HEADROOM * limit \
            and heap.return_large_buffers():
        log.info("a step of %.1f GiB is large for this machine's %.1f GiB: its buffers go "
                 "back to the system when freed (no retained heap)", need / GIB, limit / GIB)
    log.info("%s: %s", c.model, plan.line())
    return plan


def _copies(strategy) -> int:
    """Copies of each parameter the placed state holds (pmap stacks one per local device)."""
    return jax.local_device_count() if strategy.name == "pmap" else 1


def check_population(exp, strategy, states, rngs, members: int, eval_strategy, eval_state
                     ) -> Plan:
    """`check` for a population of `members` (exp: the first member's): the population's
    train step on a batch per member, and one member's eval step while every member's state
    is held; MemoryBudgetError names the population's size when that does not fit."""
    c = exp.config
    shape = batch_images_shape(exp, c.batch_size, True)
    batch = {"image": np.zeros((shape[0], members, *shape[1:]), np.uint8),
             "label": np.zeros((shape[0], members), np.int32)}
    train = _peak(strategy.train_step.lower(states, strategy.put_train_batch(batch),
                                            rngs).compile())
    held = sum(int(x.nbytes) for x in jax.tree.leaves(states)) // _copies(strategy)
    evaluation = _batch(batch_images_shape(exp, experiment.eval_batch_size(c), False), True)
    evaluated = _peak(eval_strategy.eval_step.lower(
        eval_state, eval_strategy.put_eval_batch(evaluation)).compile())
    need = max(train, evaluated + held) if train and evaluated else 0
    limit, where = device_limit()
    if need and where == "host":
        need = (need * jax.local_device_count()
                + PREFETCHED * members * int(np.prod(shape)) * max(1, c.data_workers))
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(eval_state.params))
    plan = Plan(shape, params // _copies(eval_strategy), forward_flops(exp), need, limit, where)
    if need and limit and need > HEADROOM * limit:
        machine = "this machine" if where == "host" else where
        raise MemoryBudgetError(
            f"a population of {members} members needs {need / GIB:.1f} GiB for its training "
            f"step (XLA's memory analysis: {members} states and {members} batches of "
            f"{c.batch_size}) but {machine} has {limit / GIB:.1f} GiB available: train fewer "
            f"members at once (population_size, or sweep --population), or lower batch_size")
    log.info("%s, a population of %d: %s", c.model, members, plan.line())
    return plan
