"""A population: several members trained together in one jitted step, each an ordinary run.

    resnet-jax-train --config fashion_mnist --workdir runs/pop --config.population_size=5
    train_population([config_a, config_b, ...], ["runs/a", "runs/b", ...])

Members that differ only in their seeds (initialisation, data order, augmentation, dropout
and mixing draws) are one `jax.vmap` of the engine's train step over stacked states
(parameters, optimizer state, BatchNorm statistics, EMA); members with other values of the
per-member fields (`MEMBER_FIELDS`: learning rate and schedule values, weight decay, label
smoothing, mixup/CutMix, EMA decay, dropout...) are a group each, every group a vmapped step
inside the same jitted program. Fields that change what the members share (the model's
shapes, the batch, the data, the durations) must agree: `check_members` names the first that
does not.

Each member writes what a single run writes (config.json with its own seed and values,
metrics.jsonl, checkpoints, selected.json, plots), evaluates with the single run's eval step
and takes its own decisions on validation; a member that stops early keeps its state while
the others go on. Every batch of the population is each member's own pipeline's batch,
stacked on a second axis (the strategy splits the first, the batch, over devices, and each
device runs every member on its part); with `population_data='shared'` one pipeline feeds
all (every member has the first member's `data_seed`).

Memory: N members hold N copies of the state (parameters, optimizer state, EMA) and, in a
step, N batches' activations; the pre-flight check compiles the population's step and stops
before training when that does not fit.

Resume: each member checkpoints on its own; a population killed between two members' saves
resumes every member from the newest step they all have (members keep at least 2 latest
checkpoints, so that step is always there).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resnet_jax.training import (compilation_cache, config_json, experiment, guard, loop,
                                 metrics, preflight, rundir, timing, trackers,
                                 transfer)
from resnet_jax.training import checkpoint as checkpoint_lib
from resnet_jax.training.checkpoint import Checkpointer
from resnet_jax.training.config import with_overrides
from resnet_jax.training.parallel import (fetch, make_strategy, maybe_initialize_distributed,
                                          resolve_strategy)
from resnet_jax.training.state import create_train_state

log = logging.getLogger("resnet_jax")

# Fields a member may set to its own value: they change neither shapes, nor the data the
# members share, nor when they evaluate. (`seed`: initialisation, data order, dropout.)
MEMBER_FIELDS = (
    "seed", "data_seed", "tracker_name", "learning_rate", "momentum", "nesterov", "adam_b1",
    "adam_b2", "adam_eps", "weight_decay", "weight_decay_all", "grad_clip", "label_smoothing",
    "mixup_alpha", "cutmix_alpha", "random_erasing", "warmup_init_fraction",
    "cosine_end_fraction", "lr_decay_factor", "onecycle_pct_start", "onecycle_div_factor",
    "onecycle_final_div_factor", "ema_decay", "ema_warmup", "drop_path_rate",
    "early_stopping_patience", "early_stopping_min_delta")
# model_overrides keys a member may set to its own value
MEMBER_OVERRIDES = ("dropout_rate",)
# fields that do not change a member's program: members differing only in these share a group
_NOT_PROGRAM = ("seed", "data_seed", "tracker_name", "early_stopping_patience",
                "early_stopping_min_delta")
POPULATION_FILE = "population.json"


def member_dir(workdir: str, seed: int) -> str:
    """The run directory of a population member with `seed` (as a sweep names a seed's run)."""
    return os.path.join(workdir, f"seed={seed}")


def members_of(config: ml_collections.ConfigDict, workdir: str
               ) -> tuple[list[ml_collections.ConfigDict], list[str]]:
    """The members' configs and run directories of a config with `population_size` N: seeds
    seed, ..., seed + N - 1 in WORKDIR/seed=S; with `population_data='shared'` every member
    has the first one's data seed."""
    n = config.population_size
    if n < 1:
        raise ValueError(f"population_size={n}: expected >= 1 members")
    shared = experiment.data_seed(config) if config.population_data == "shared" else -1
    seeds = range(config.seed, config.seed + n)
    configs = [with_overrides(config, seed=s, data_seed=shared if shared >= 0
                              else config.data_seed, population_size=0,
                              population_data="own") for s in seeds]
    return configs, [member_dir(workdir, s) for s in seeds]


def _flat(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return config_json.config_to_dict(config)


def check_members(configs: Sequence[ml_collections.ConfigDict]) -> None:
    """A one-line ValueError naming the first field a member sets apart from member 0 that
    members must share."""
    if not configs:
        raise ValueError("a population needs at least one member")
    first = _flat(configs[0])
    for k, config in enumerate(configs[1:], start=1):
        other = _flat(config)
        for name in sorted(first):
            if name in MEMBER_FIELDS or first[name] == other[name]:
                continue
            if name == "model_overrides":
                a, b = first[name] or {}, other[name] or {}
                keys = sorted(key for key in set(a) | set(b)
                              if key not in MEMBER_OVERRIDES and a.get(key) != b.get(key))
                if not keys:
                    continue
                name, first_value, value = f"model_overrides.{keys[0]}", a.get(keys[0]), \
                    b.get(keys[0])
            else:
                first_value, value = first[name], other[name]
            raise ValueError(
                f"population member {k} has {name}={value!r} but member 0 has "
                f"{first_value!r}: members share {name} (it changes the shapes, the data or "
                f"the schedule of the step they run together); per member: "
                f"{', '.join(MEMBER_FIELDS)}, model_overrides.{', '.join(MEMBER_OVERRIDES)}")


def fits(first: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> bool:
    """Whether `config` may join a population whose first member is `first`."""
    try:
        check_members([first, config])
    except ValueError:
        return False
    return True


def groups(configs: Sequence[ml_collections.ConfigDict]) -> list[list[int]]:
    """Member indices by program: members whose configs differ only in seeds (and names)."""
    keyed: dict[str, list[int]] = {}
    for k, config in enumerate(configs):
        flat = {name: v for name, v in _flat(config).items() if name not in _NOT_PROGRAM}
        keyed.setdefault(json.dumps(flat, sort_keys=True, default=str), []).append(k)
    return list(keyed.values())


def check_devices(config: ml_collections.ConfigDict, members: int) -> None:
    """A one-line ValueError where the population cannot run on this process's devices."""
    name = resolve_strategy(config.parallel)
    if name == "towers":
        raise ValueError(f"parallel='towers' splits one AlexNet over two devices; a population "
                         f"of {members} members runs with 'single', 'pmap' or 'sharded' "
                         "(members on every device, each batch split)")
    if jax.process_count() > 1:
        raise ValueError(f"a population of {members} members trains in one process "
                         f"({jax.process_count()} were started): launch one process with "
                         "several devices, or train the members as separate runs")
    n = jax.device_count() if name != "single" else 1
    if config.batch_size % n:
        raise ValueError(f"a population of {members} members on {n} devices: every member's "
                         f"batch_size {config.batch_size} is split over the devices and does "
                         f"not divide by {n}; use a batch_size that does, or "
                         "parallel='single'")


def train_population(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str]
                     ) -> list[dict[str, Any]]:
    """Train the members (one config and one run directory each) together; each member's
    directory is an ordinary run. Returns each member's last record, as `train_and_evaluate`
    does for one run. Running it again resumes every member."""
    entered = time.monotonic()
    if len(configs) != len(workdirs):
        raise ValueError(f"{len(configs)} member configs but {len(workdirs)} workdirs")
    if len({os.path.abspath(w) for w in workdirs}) < len(workdirs):
        raise ValueError("two population members share a workdir")
    for workdir in workdirs:
        guard.check_workdir(workdir)
    check_members(configs)
    trackers.check(configs[0])
    compilation_cache.configure(configs[0].compilation_cache)
    maybe_initialize_distributed(configs[0])
    check_devices(configs[0], len(configs))
    exps = [experiment.setup(c) for c in configs]
    steps_of = {(e.durations.total_steps, e.durations.steps_per_epoch) for e in exps}
    if len(steps_of) > 1:
        raise ValueError(f"population members would train for different steps {steps_of}: "
                         "their training sets differ in size")
    with contextlib.ExitStack() as held:
        for workdir in workdirs:
            held.enter_context(guard.workdir_lock(workdir))
        stop = held.enter_context(guard.StopSignal())
        for exp, workdir in zip(exps, workdirs):
            loop._write_config(exp.config, workdir)
        population = Population(exps, list(workdirs), entered)
        try:
            try:
                population.run(stop)
            finally:
                population.close()
            return population.results()
        finally:
            for member in population.members:
                member.trackers.close()


def train_population_config(config: ml_collections.ConfigDict, workdir: str
                            ) -> list[dict[str, Any]]:
    """`train_population` of a config with `population_size`: its members (`members_of`)
    under `workdir`, listed in WORKDIR/population.json."""
    configs, workdirs = members_of(config, workdir)
    check_members(configs)
    check_devices(config, len(configs))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, POPULATION_FILE), "w") as f:
        json.dump({"members": [{"workdir": os.path.basename(w), "seed": c.seed}
                               for c, w in zip(configs, workdirs)],
                   "data": config.population_data}, f, indent=2)
    return train_population(configs, workdirs)


def map_mode(config: ml_collections.ConfigDict) -> str:
    """`population_map` resolved: 'auto' is 'unroll' on the CPU backend (where a vmapped step
    measured slower than the members' own steps, experiments/results/population/) and
    'vmap' on accelerators."""
    if config.population_map != "auto":
        return config.population_map
    return "unroll" if jax.default_backend() == "cpu" else "vmap"


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _mapped(step, mode: str, members: int):
    """`step(state, batch, rng)` over `members` states, batches (stacked on axis 1) and
    keys: one vmapped program over states stacked on axis 0, or each member's own step on
    its own state (a tuple of them), side by side in one program. Unrolled, a member's
    arrays are never sliced out of a stack inside the program, so XLA compiles each member's
    step as it compiles a single run's (slices fused into reductions changed their order)."""
    if mode == "vmap":
        return jax.vmap(step, in_axes=(0, 1, 0))

    def unrolled(states, batch, rngs):  # states: a tuple of the members' own
        outs = [step(states[k], jax.tree.map(lambda x: x[:, k], batch), rngs[k])
                for k in range(members)]
        return tuple(o[0] for o in outs), _stack([o[1] for o in outs])

    return unrolled


def _no_eval(state, batch):
    raise NotImplementedError("members evaluate with their own run's eval step")


class _StepMetrics:
    """One population step's metrics ((members,) per key), fetched to the host once."""

    def __init__(self, out, first):
        self.out, self.first, self.host = out, first, None

    def member(self, index: int) -> dict[str, Any]:
        if self.host is None:
            self.host = jax.tree.map(fetch, self.first(self.out))
        return {k: v[index] for k, v in self.host.items()}


class Member(loop._Loop):
    """One member's run: its experiment, checkpoints, records, decisions and clock, as a
    single run's loop keeps them; its state is a view of the population's, refreshed by the
    population before the member evaluates or saves."""

    def __init__(self, exp: experiment.Experiment, workdir: str, entered: float, strategy,
                 index: int):
        config, self.d = exp.config, exp.durations
        self.exp, self.config, self.workdir = exp, config, workdir
        self.chief, self.strategy, self.index, self.entered = True, strategy, index, entered
        init_rng, self.dropout_rng = jax.random.split(jax.random.key(config.seed))
        self.initial = jax.jit(create_train_state, static_argnums=(0, 1, 3, 4))(
            exp.model, exp.tx, init_rng, exp.image_shape, config.ema_decay > 0)
        self.where = rundir.path(workdir, rundir.CHECKPOINTS)
        # two at least: the newest step every member has is then always kept
        self.ckpt = Checkpointer(self.where, keep=max(2, config.keep_checkpoints))
        self.data = self.batches = None
        self.done = False  # stopped early; its state stays as it was then

    def start(self, state, saved: dict, feeds: bool, first: bool) -> None:
        """Begin at `state` (restored or initial) with the checkpoint's `saved` meta; a
        member that `feeds` opens its own training pipeline."""
        self.start_step = self.step = int(state.step)
        self.state = None  # a view of the population's, set before it evaluates or saves
        if feeds:
            self._open_data(saved.get("pipeline"), put=lambda batch: batch)
        else:
            self.data_state = (saved.get("pipeline") or {}).get("state")
        self._open_records(saved.get("decisions"), self.entered)
        if not first:  # one progress bar, one profile and one time estimate per population
            self.bar.close()
            self.bar = metrics.progress_bar(self.d.total_steps, self.start_step, False)
            self.clock.profile = timing.Profile((), self.workdir, False)
            self.clock.durations = None

    def next_batch(self, step: int) -> dict[str, np.ndarray]:
        """This member's batch of step `step`, on the host."""
        (batch, bad), self.data_state = self.clock.next_batch(self.batches, step)
        self.corrupt += bad
        return batch

    def _fetch_pending(self) -> list[dict[str, Any]]:
        return [shared.member(self.index) for shared in self.pending]


class Population:
    """The members' loops driven by one train step over their stacked states."""

    def __init__(self, exps: list[experiment.Experiment], workdirs: list[str], entered: float):
        c = exps[0].config
        self.d, self.config, self.shared_data = exps[0].durations, c, \
            len({experiment.data_seed(e.config) for e in exps}) == 1 and len(exps) > 1
        self.groups, self.mode = groups([e.config for e in exps]), map_mode(c)
        order = [k for group in self.groups for k in group]  # members by group
        evals = {k: experiment.build_strategy(exps[group[0]])
                 for group in self.groups for k in group}
        self.members = [Member(exps[k], workdirs[k], entered, evals[k], order.index(k))
                        for k in range(len(exps))]
        self.stacked = [self.members[k] for k in order]  # in the population step's order
        try:
            self.strategy = self._strategy(exps)
            restored = self._restore()
            self.rngs = jnp.stack([m.dropout_rng for m in self.stacked])
            self.states = self._stack([[s for s, _ in restored[lo:hi]]
                                       for lo, hi in self._spans()])
            first = self.stacked[0]
            preflight.check_population(first.exp, self.strategy, self.states, self.rngs,
                                       len(exps), first.strategy,
                                       first.strategy.place_state(restored[0][0]))
            for i, (member, (state, saved)) in enumerate(zip(self.stacked, restored)):
                member.start(state, saved, feeds=i == 0 or not self.shared_data, first=i == 0)
        except BaseException:
            for member in self.members:
                member.ckpt.close()
            raise
        self.step = self.stacked[0].step
        self.views: dict[int, Any] = {}

    def _spans(self) -> list[tuple[int, int]]:
        spans, lo = [], 0
        for group in self.groups:
            spans.append((lo, lo + len(group)))
            lo += len(group)
        return spans

    def _strategy(self, exps):
        """The strategy of the population step: each group's train step vmapped over its
        members (states on axis 0, batches on axis 1), the groups one after another."""
        c, spans = exps[0].config, self._spans()
        firsts = [exps[group[0]] for group in self.groups]

        mode = self.mode

        def make_train(axis):
            group_steps = [_mapped(experiment.train_step(e.config, e.model, e.tx, e.schedule,
                                                         axis), mode, len(group))
                           for e, group in zip(firsts, self.groups)]

            def population_step(states, batch, rngs):
                new, outs = [], []
                for step, state, (lo, hi) in zip(group_steps, states, spans):
                    part = jax.tree.map(lambda x: x[:, lo:hi], batch)
                    state, out = step(state, part, rngs[lo:hi])
                    new.append(state)
                    outs.append(out)
                return tuple(new), {k: jnp.concatenate([o[k] for o in outs]) for k in outs[0]}

            return population_step

        return make_strategy(c.parallel, make_train, lambda axis: _no_eval, c.batch_size,
                             experiment.eval_batch_size(c), experiment.jit_options(c))

    def _restore(self) -> list[tuple[Any, dict]]:
        """Each member's (state, checkpoint meta) at the newest step every member has."""
        found = []
        for m in self.stacked:
            identity = experiment.run_identity(m.exp)
            found.append(m.ckpt.restore_checked(m.initial, check=lambda meta, saved, m=m,
                                                identity=identity: checkpoint_lib.check_fits(
                                                    identity, meta, saved, m.initial, m.where)))
        steps = [r.step if r is not None else 0 for r in found]
        common = min(steps)
        if max(steps) > common:
            log.info("members saved steps %s; the population resumes from step %d, the newest "
                     "all of them have", steps, common)
        out = []
        for m, r in zip(self.stacked, found):
            if r is not None and r.step > common:
                r = m.ckpt.restore_step("latest", common, m.initial) if common else None
            if r is not None:
                out.append((r.state, r.meta))
            elif m.config.init_from:
                out.append((transfer.init_from_pretrained(m.initial, m.exp.tx,
                                                           m.config.init_from), {}))
            else:
                out.append((m.initial, {}))
        if common:
            log.info("resumed from step %d", common)
            print(f"resumed from step {common}", file=sys.stderr, flush=True)
        return out

    def _stack(self, states_by_group: list[list[Any]]):
        """The population's state: per group the members' states stacked (vmap) or as a
        tuple (unroll), placed by the strategy."""
        if self.mode == "unroll":
            return tuple(tuple(self.strategy.place_state(s) for s in states)
                         for states in states_by_group)
        return tuple(self.strategy.place_state(jax.tree.map(
            lambda *xs: np.stack([fetch(x) for x in xs]), *states)) for states in states_by_group)

    # -- the loop ---------------------------------------------------------------------------

    def active(self) -> list[Member]:
        return [m for m in self.stacked if not m.done]

    def run(self, stop: guard.StopSignal) -> None:
        """Steps until the end (or every member stopped early, or a stop signal), each
        member flushing, evaluating and checkpointing as its single run would."""
        d, c = self.d, self.config
        while self.step < d.end_step and self.active():
            self._train_step()
            for m in self.active():
                if len(m.pending) >= c.log_every_steps or self.step % d.steps_per_epoch == 0 \
                        or self.step == d.end_step:
                    m._flush()
            if self.step % d.eval_every_steps == 0 or self.step == d.total_steps:
                self._each(loop._Loop._end_period)
            elif d.checkpoint_every_steps and self.step % d.checkpoint_every_steps == 0:
                self._each(loop._Loop._save)
            for m in self.active():
                if m.early:
                    log.info("%s: early stopping at step %d", m.workdir, self.step)
                    m._save()
                    m.done = True
            if guard.stop_requested(stop, self.step, c.log_every_steps):
                for m in self.active():
                    m.stopped = stop.name or "stop"
                self._each(loop._Loop._save)
                break
        if self.step == d.end_step:
            self._each(loop._Loop._save)

    def _train_step(self) -> None:
        step = self.step + 1
        if self.shared_data:
            batches = [self.stacked[0].next_batch(step)] * len(self.stacked)
            for m in self.stacked[1:]:
                m.data_state, m.corrupt = self.stacked[0].data_state, self.stacked[0].corrupt
        else:
            batches = [m.next_batch(step) for m in self.stacked]
        batch = self.strategy.put_train_batch(
            {key: np.stack([b[key] for b in batches], axis=1) for key in ("image", "label")})
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            self.states, out = self.strategy.train_step(self.states, batch, self.rngs)
        shared = _StepMetrics(out, self.strategy.first)
        self.step = step
        for m in self.active():
            m.pending.append(shared)
            m.step = step
            m.clock.after(step, out)

    def _view(self, i: int):
        """Member i's (population order) state, placed as the eval strategy places one."""
        g = next(g for g, (lo, hi) in enumerate(self._spans()) if lo <= i < hi)
        j = i - self._spans()[g][0]
        if self.mode == "unroll":
            return self.states[g][j]
        if self.strategy.name == "pmap":
            return jax.tree.map(lambda x: x[:, j], self.states[g])
        return jax.tree.map(lambda x: x[j], self.states[g])

    def _each(self, method) -> None:
        """`method` of every active member on its current state; a state a member changed
        (a plateau's new learning-rate scale) goes back into the population's."""
        for i, m in enumerate(self.stacked):
            if not m.done:
                m.state = self.views[i] = self._view(i)
        for m in self.active():
            method(m)
        changed = [i for i, m in enumerate(self.stacked) if not m.done and
                   m.state is not self.views[i]]
        if changed:
            self.states = self._stack([[self.stacked[i].strategy.gather_state(
                self.stacked[i].state if not self.stacked[i].done else self._view(i))
                for i in range(lo, hi)] for lo, hi in self._spans()])

    def close(self) -> None:
        for m in self.members:
            m.close()

    def results(self) -> list[dict[str, Any]]:
        """Each member's last record, in the order the members were given."""
        for i, m in enumerate(self.stacked):
            if not m.done:
                m.state = self._view(i)
        return [m.result() for m in self.members]
