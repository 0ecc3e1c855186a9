"""How the per-device steps run on devices (`auto`: `single` on one device, `sharded` on
several): one device (`single`), `jax.pmap` over the
local devices (`pmap`), `jax.jit` of a `shard_map` over a device mesh (`sharded`), or
AlexNet's two towers (`towers`): `jax.jit` of the global step on a (data, model) mesh, the
state placed by `state_specs` and XLA's partitioner inserting the exchanges.

The steps of `steps.py` are written once with a named axis ("data"); a strategy maps them.
`pmap` keeps a copy of the state per local device (stacked on a leading axis);
`sharded` keeps one replicated global array per leaf, so checkpoints and evaluation need
no replicate/unreplicate. Both average gradients and metrics over every device of every
process.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

STRATEGIES = ("auto", "single", "pmap", "sharded", "towers")
AXIS = "data"


def resolve_strategy(name: str) -> str:
    """The strategy that `parallel` = `name` runs: "auto" is `single` on one device of one
    process and `sharded` (jit over a mesh of every device) on more; others are themselves."""
    if name != "auto":
        return name
    return "single" if jax.process_count() == 1 and jax.device_count() == 1 else "sharded"


def maybe_initialize_distributed(config) -> None:
    """Start `jax.distributed` when the config or the environment asks for several processes.

    Explicit: config.coordinator_address, num_processes, process_id (the local launcher sets
    them). `config.distributed=True` alone lets JAX detect the cluster (TPU pods, SLURM,
    Open MPI, GPU clusters with the standard environment variables).
    """
    if jax.distributed.is_initialized():
        return
    address = config.get("coordinator_address", "") or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    if address:
        # Collectives between CPU devices of different processes (only used by CPU runs; no
        # backend may be touched before initialize, so it is set unconditionally).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        num = config.get("num_processes", 0) or int(os.environ.get("JAX_NUM_PROCESSES", "1"))
        pid = config.get("process_id", -1)
        pid = pid if pid >= 0 else int(os.environ.get("JAX_PROCESS_ID", "0"))
        jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
    elif config.get("distributed", False):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # as above
        jax.distributed.initialize()


@dataclasses.dataclass
class Strategy:
    """Mapped steps and the placement of state and batches for one parallel layout."""

    name: str
    train_step: Callable
    eval_step: Callable
    place_state: Callable[[Any], Any]
    gather_state: Callable[[Any], Any]  # placed state -> one global copy (for saving)
    put_train_batch: Callable[[dict], dict]
    put_eval_batch: Callable[[dict], dict]
    first: Callable[[Any], Any]  # mapped metrics -> one copy
    num_devices: int


def _check_divisible(global_batch: int, devices: int, what: str) -> None:
    if global_batch % devices:
        raise ValueError(f"{what} {global_batch} does not divide across {devices} devices "
                         f"({jax.process_count()} process(es) x {jax.local_device_count()})")


def make_strategy(name: str, make_train: Callable[[str | None], Callable],
                  make_eval: Callable[[str | None], Callable], global_batch: int,
                  eval_batch: int, jit_options: Callable[[str], dict | None] | None = None,
                  state_specs: Callable[[Any], Any] | None = None) -> Strategy:
    """Map the per-device steps built by `make_train(axis_name)` / `make_eval(axis_name)`.

    `jit_options("train")` and `jit_options("eval")` are the steps' `jax.jit` compiler
    options (single, sharded, towers; `jax.pmap` takes none). `state_specs(tree)`: the
    PartitionSpecs over ("data", "model") of any part of the state (towers only).
    """
    options = jit_options or (lambda step: None)
    jit = functools.partial(jax.jit, compiler_options=options("train"))
    jit_eval = functools.partial(jax.jit, compiler_options=options("eval"))
    if name not in STRATEGIES:
        raise ValueError(f"parallel={name!r}; expected one of {STRATEGIES}")
    name = resolve_strategy(name)
    if name == "single":
        if jax.process_count() > 1:
            raise ValueError("parallel='single' runs on one device of one process; use 'pmap' "
                             "or 'sharded' with several processes")
        device = jax.local_devices()[0]
        put = lambda b: jax.device_put(b, device)  # noqa: E731
        return Strategy(name, jit(make_train(None), donate_argnums=0),
                        jit_eval(make_eval(None)), put, lambda s: s, put, put, lambda m: m, 1)

    if name == "towers":
        return _towers(make_train(None), make_eval(None), global_batch, eval_batch, jit,
                       jit_eval, state_specs)
    n = jax.device_count()
    _check_divisible(global_batch, n, "batch size")
    _check_divisible(eval_batch, n, "eval batch size")
    if name == "pmap":
        local = jax.local_device_count()
        # pmap takes arrays stacked on a leading axis of local devices; placing them with a
        # sharding over that axis hands each device its slice without a copy on entry.
        stacked = NamedSharding(Mesh(np.asarray(jax.local_devices()), ("local",)), P("local"))

        def put(batch):
            return jax.device_put(jax.tree.map(
                lambda x: np.reshape(x, (local, x.shape[0] // local, *x.shape[1:])), batch),
                stacked)

        def place(state):
            return jax.device_put(jax.tree.map(
                lambda x: np.broadcast_to(fetch(x), (local, *np.shape(x))), state), stacked)

        return Strategy(
            name,
            jax.pmap(make_train(AXIS), axis_name=AXIS, donate_argnums=0, in_axes=(0, 0, None)),
            jax.pmap(make_eval(AXIS), axis_name=AXIS),
            place, lambda s: jax.tree.map(lambda x: fetch(x)[0], s),
            put, put, lambda m: jax.tree.map(lambda x: fetch(x)[0], m), n,
        )

    mesh = Mesh(np.asarray(jax.devices()), (AXIS,))
    replicated = NamedSharding(mesh, P())
    sharded = NamedSharding(mesh, P(AXIS))
    # check_vma=False: the step is pmap-style per-device code that averages its own gradients
    # with pmean. (With varying-axis checks on, the gradient of a replicated input would
    # already be summed over devices by the transpose, and pmean would not make it a mean.)
    train = jax.shard_map(make_train(AXIS), mesh=mesh, in_specs=(P(), P(AXIS), P()),
                          out_specs=(P(), P()), check_vma=False)
    evaluate = jax.shard_map(make_eval(AXIS), mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(),
                             check_vma=False)

    def put(batch):
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharded, x), batch)

    def place(state):
        return jax.tree.map(lambda x: _replicate(x, replicated), state)

    return Strategy(name, jit(train, donate_argnums=0), jit_eval(evaluate), place,
                    lambda s: s, put, put, lambda m: m, n)


def _towers(train_fn: Callable, eval_fn: Callable, global_batch: int, eval_batch: int,
            jit: Callable, jit_eval: Callable, state_specs: Callable[[Any], Any] | None
            ) -> Strategy:
    """The global steps on a (devices / 2, 2) mesh: the batch over "data", each tower's
    half of the split layers (and of their optimizer state and EMA) on one "model" device."""
    from resnet_jax.training.model_parallel import make_mesh

    if state_specs is None:
        raise ValueError("parallel='towers' needs the model's tower layout (AlexNet)")
    if jax.process_count() > 1:
        raise ValueError("parallel='towers' runs in one process (two towers per data row)")
    n = jax.device_count()
    if n % 2:
        raise ValueError(f"parallel='towers' puts the two towers on two devices; found {n}")
    mesh = make_mesh(n // 2, 2)
    _check_divisible(global_batch, n // 2, "batch size")
    _check_divisible(eval_batch, n // 2, "eval batch size")
    rows = NamedSharding(mesh, P(AXIS))
    replicated = NamedSharding(mesh, P())
    compiled: dict[str, Callable] = {}

    def shardings(state):
        return jax.tree.map(lambda spec: NamedSharding(mesh, spec), state_specs(state),
                            is_leaf=lambda x: isinstance(x, P))

    def train(state, batch, rng):
        if "train" not in compiled:  # the state's layout is known at the first call
            s = shardings(state)
            compiled["train"] = jit(train_fn, in_shardings=(s, rows, replicated),
                                    out_shardings=(s, replicated), donate_argnums=0)
        return compiled["train"](state, batch, rng)

    def evaluate(state, batch):
        if "eval" not in compiled:
            compiled["eval"] = jit_eval(eval_fn, in_shardings=(shardings(state), rows),
                                        out_shardings=replicated)
        return compiled["eval"](state, batch)

    def place(state):
        return jax.device_put(jax.tree.map(fetch, state), shardings(state))

    def put(batch):
        return jax.device_put(batch, rows)

    return Strategy("towers", train, evaluate, place, lambda s: jax.tree.map(fetch, s), put,
                    put, lambda m: m, n)


def _replicate(x, sharding: NamedSharding):
    """A global array replicated on every device, from a host value or a local array."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    value = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def fetch(x) -> np.ndarray:
    """A host copy of a (replicated) array, on any process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return np.asarray(jax.device_get(x))
