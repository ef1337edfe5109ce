"""Composable gradient transformations in optax's shape: `init(params) -> state` and
`update(grads, state, params, **extra) -> (updates, state)`; `apply_updates` adds the updates.

An optimizer is a `chain` of small transformations (clip, Adam scaling, decoupled weight decay, learning
rate and schedule), so a research variant swaps one link instead of rewriting the update. States are
plain dicts of tensors (DCP checkpoints and torch.compile see ordinary pytrees); a chain's state is the
union of its links' named states, which keeps AdamW's state `{step, exp_avg, exp_avg_sq}` in the layout
older train-state checkpoints have. `named(name, tx)` nests a link's state when two links would clash.

`extra` carries per-step inputs every link may read: `step` (the 0-dim optimizer step of the train
state) for schedules. Updates leaves may be None (no gradient): such parameters keep their value and
their state, as torch.optim skips them. Scalars are 0-dim tensors, so a compiled step never recompiles
as the schedule moves.

Scalar links defer their factor: an update leaf may be a `Scaled` record (direction, pending factors,
pending decoupled decay) that `apply_updates` rounds once, as p * (1 - lr*wd) + direction * (-lr / bias1)
in float32 with the scalars folded in float64. That is torch.optim.AdamW's (and the earlier optim.py's)
arithmetic, so the AdamW chain is bit-equal to it; multiplying each link's scalar into the tensor would
round once per link. `materialize` turns records into plain tensors for links that need them; a chain's
`update` returns plain tensors (its `deferred` update the records, which the train step applies).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from rfdetr_fn import tree

State = dict[str, Any]
Schedule = Callable[[Tensor], Tensor]
Scalars = float | Mapping[str, Any]  # one value, or a tree of per-leaf values (parameter groups)


class GradientTransformation(NamedTuple):
    """A pure gradient transformation: `init(params) -> state`, `update(grads, state, params, **extra)`.

    A NamedTuple, like optax's, so torch.compile can build one inside a traced step.
    """

    init: Callable[[tree.Params], State]
    update: Callable[..., tuple[tree.Params, State]]
    deferred: Callable[..., tuple[tree.Params, State]] | None = None
    """The same update with `Scaled` leaves left pending (what `apply_updates` rounds once, bit-equal to
    torch.optim); combinators set it and make `update` return plain tensors, as a user expects."""


def deferred_update(tx: GradientTransformation) -> Callable[..., tuple[tree.Params, State]]:
    """`tx`'s update with pending `Scaled` leaves (for `apply_updates`); `update` itself for single links."""
    return tx.deferred or tx.update


def _public(init: Callable, deferred: Callable) -> GradientTransformation:
    """A combinator's transformation: `update` materializes what `deferred` leaves pending."""

    def update(grads, state, params=None, **extra):
        updates, new_state = deferred(grads, state, params, **extra)
        return materialize(updates, params), new_state

    return GradientTransformation(init, update, deferred)


class Scaled(NamedTuple):
    """An update not multiplied out yet: direction * prod(mul) / div + rate * prod(decay_mul) * param.

    Scalar links append to `mul` (and to `decay_mul` once a decay is pending) instead of touching the
    tensor; factors are Python floats or float64 0-dim tensors shared by a whole parameter group.
    """

    direction: Tensor
    mul: tuple[Tensor | float, ...] = ()
    div: Tensor | float = 1.0
    rate: float = 0.0
    decay_mul: tuple[Tensor | float, ...] = ()


def apply_updates(params: tree.Params, updates: tree.Params) -> tree.Params:
    """params + updates; leaves whose update is None or absent (frozen, no gradient) are kept as they are.

    A `Scaled` leaf is applied as torch.optim.AdamW does: p * (1 + rate * decay_mul) first, then plus
    direction * (mul / div), each scalar rounded to the parameter's dtype once.
    """
    flat_p, flat_u = tree.flatten(params), tree.flatten(updates)
    names = [k for k, u in flat_u.items() if u is not None]
    missing = [k for k in names if k not in flat_p]
    if missing:
        raise KeyError(f"apply_updates: updates for leaves not in params: {missing[:5]}")
    new = dict(flat_p)
    for group, first in _groups(flat_u, names):
        ps = [flat_p[n] for n in group]
        if not isinstance(first, Scaled):
            new.update(zip(group, torch._foreach_add(ps, [flat_u[n] for n in group])))
            continue
        if first.rate:
            ps = torch._foreach_mul(ps, _scalar(1.0 + first.rate * _product(first.decay_mul), ps[0]))
        new.update(zip(group, torch._foreach_add(ps, _directions(flat_u, group, first))))
    return tree.unflatten(new)


def materialize(updates: tree.Params, params: tree.Params | None = None) -> tree.Params:
    """`updates` with every `Scaled` leaf multiplied out to a tensor (params needed for a pending decay)."""
    flat_u = tree.flatten(updates)
    names = [k for k, u in flat_u.items() if isinstance(u, Scaled)]
    out = dict(flat_u)
    for group, first in _groups(flat_u, names):
        ds = _directions(flat_u, group, first)
        if first.rate:
            if params is None:
                raise ValueError("materialize: a decayed update needs params")
            flat_p = tree.flatten(params)
            rate = _scalar(first.rate * _product(first.decay_mul), ds[0])
            ds = torch._foreach_add(ds, torch._foreach_mul([flat_p[n] for n in group], rate))
        out.update(zip(group, ds))
    return tree.unflatten(out)


# ---------------------------------------------------------------- combinators


def chain(*links: GradientTransformation) -> GradientTransformation:
    """Apply links in order; the state is the union of their (disjoint) states."""

    def init(params):
        state: State = {}
        for link in links:
            part = link.init(params)
            clash = sorted(set(part) & set(state))
            if clash:
                raise ValueError(f"chain: state keys {clash} appear in two links; wrap one with named()")
            state.update(part)
        return state

    def update(grads, state, params=None, **extra):
        new_state: State = {}
        for link in links:  # each link reads its own keys of the union and returns only those
            grads, part = deferred_update(link)(grads, state, params, **extra)
            new_state.update(part)
        return grads, new_state

    return _public(init, update)


def named(name: str, link: GradientTransformation) -> GradientTransformation:
    """Keep `link`'s state under `name` (for two links of the same kind in one chain)."""
    return _public(
        lambda params: {name: link.init(params)},
        lambda grads, state, params=None, **extra: _wrap(
            name, deferred_update(link)(grads, state[name], params, **extra)
        ),
    )


def _wrap(name: str, result: tuple[tree.Params, State]) -> tuple[tree.Params, State]:
    return result[0], {name: result[1]}


def masked(link: GradientTransformation, where: tree.Where) -> GradientTransformation:
    """Run `link` on the leaves `where` selects (state for those only); the others pass through."""

    def init(params):
        return link.init(tree.partition(params, where)[0])

    def update(grads, state, params=None, **extra):
        chosen, rest = tree.partition(grads, where)
        sub_params = None if params is None else tree.partition(params, where)[0]
        out, state = deferred_update(link)(chosen, state, sub_params, **extra)
        return tree.combine(out, rest), state

    return _public(init, update)


def multi_transform(links: Mapping[str, GradientTransformation], labels: tree.Params) -> GradientTransformation:
    """A different link per label; `labels` is a tree of label strings (see `tree.labels`).

    State is `{label: that link's state}` over that label's leaves only.
    """
    flat_labels = tree.flatten(labels)
    unknown = sorted(set(flat_labels.values()) - set(links))
    if unknown:
        raise ValueError(f"multi_transform: labels {unknown} have no transformation")

    def part(t, label):
        return tree.partition(t, lambda key, leaf: flat_labels.get(key) == label)[0]

    def init(params):
        return {label: link.init(part(params, label)) for label, link in links.items()}

    def update(grads, state, params=None, **extra):
        outs, new_state = [], {}
        for label, link in links.items():
            sub_params = None if params is None else part(params, label)
            out, new_state[label] = deferred_update(link)(part(grads, label), state[label], sub_params, **extra)
            outs.append(out)
        return tree.combine(*outs), new_state

    return _public(init, update)


# ---------------------------------------------------------------- links


def identity() -> GradientTransformation:
    return _stateless(lambda grads, params, extra: grads)


def set_to_zero() -> GradientTransformation:
    """Zero updates (a frozen group inside multi_transform; `partition` also drops the state)."""
    return _stateless(lambda grads, params, extra: tree.map_(_zeros_or_none, grads))


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """torch's clip_grad_norm_ as a link (the step uses `global_norm_clip` directly to log the norm)."""
    return _stateless(lambda grads, params, extra: global_norm_clip(materialize(grads, params), max_norm)[0])


def global_norm_clip(grads: tree.Params, max_norm: float) -> tuple[tree.Params, Tensor]:
    """torch.nn.utils.clip_grad_norm_ (L2, out of place): scale by min(1, max_norm / (norm + 1e-6)).

    None leaves pass through. max_norm 0 disables clipping (Lightning's gradient_clip_val=0); the norm is
    still returned for logging.
    """
    if max_norm < 0:
        raise ValueError(f"clip_max_norm={max_norm} must be >= 0")
    flat = tree.flatten(grads)
    names = [n for n, g in flat.items() if g is not None]
    if not names:
        raise ValueError("clip_by_global_norm: every gradient is None")
    gs = [flat[n] for n in names]
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(gs, 2.0)), 2.0)
    if max_norm == 0:
        return grads, total
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return tree.unflatten({**flat, **dict(zip(names, torch._foreach_mul(gs, coef)))}), total


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Adam's direction m_hat / (sqrt(v_hat) + eps), with torch's arithmetic (eps after bias correction);
    the first moment's bias correction stays a pending divisor (`Scaled.div`), folded into the step size.

    State `{step: float32 0-dim, exp_avg, exp_avg_sq}`; one shared step count (torch counts per
    parameter, which differs only for a parameter that first gets a gradient after step 1).
    """

    def init(params):
        device = next(tree.leaves(params)).device if tree.flatten(params) else None
        return {
            "step": torch.zeros((), dtype=torch.float32, device=device),
            "exp_avg": tree.map_(torch.zeros_like, params),
            "exp_avg_sq": tree.map_(torch.zeros_like, params),
        }

    def update(grads, state, params=None, **extra):
        flat_g = tree.flatten(materialize(grads, params))
        flat_m, flat_v = tree.flatten(state["exp_avg"]), tree.flatten(state["exp_avg_sq"])
        names = [n for n, g in flat_g.items() if g is not None]
        missing = [n for n in names if n not in flat_m]
        if missing:
            raise KeyError(f"scale_by_adam: gradients for leaves without state: {missing[:5]}")
        step = state["step"] + 1
        if not names:
            return grads, {**state, "step": step}
        step64 = step.to(torch.float64)
        gs = [flat_g[n] for n in names]
        bias2_sqrt = _scalar(torch.sqrt(1.0 - b2**step64), gs[0])
        bias1 = 1.0 - b1**step64
        ms, vs, direction = [], [], []
        for lo, hi in tree.chunks(gs):  # temporaries per chunk, not per model
            g = gs[lo:hi]
            m = torch._foreach_lerp([flat_m[n] for n in names[lo:hi]], g, 1.0 - b1)
            v = torch._foreach_addcmul(torch._foreach_mul([flat_v[n] for n in names[lo:hi]], b2), g, g, value=1.0 - b2)
            denom = torch._foreach_add(torch._foreach_div(torch._foreach_sqrt(v), bias2_sqrt), eps)
            direction += [Scaled(d, div=bias1) for d in torch._foreach_div(m, denom)]
            ms += m
            vs += v
        new_m, new_v = {**flat_m, **dict(zip(names, ms))}, {**flat_v, **dict(zip(names, vs))}
        state = {"step": step, "exp_avg": tree.unflatten(new_m), "exp_avg_sq": tree.unflatten(new_v)}
        return tree.unflatten({**flat_g, **dict(zip(names, direction))}), state

    return GradientTransformation(init, update)


def trace(momentum: float, nesterov: bool = False) -> GradientTransformation:
    """torch SGD's momentum buffer (dampening 0): b = momentum * b + g, the first step b = g."""

    def init(params):
        return {"momentum_buffer": tree.map_(torch.zeros_like, params)}

    def update(grads, state, params=None, **extra):
        flat_g, flat_b = tree.flatten(materialize(grads, params)), tree.flatten(state["momentum_buffer"])
        names = [n for n, g in flat_g.items() if g is not None]
        gs = [flat_g[n] for n in names]
        bs = torch._foreach_add(torch._foreach_mul([flat_b[n] for n in names], momentum), gs)
        out = torch._foreach_add(gs, torch._foreach_mul(bs, momentum)) if nesterov else bs
        state = {"momentum_buffer": tree.unflatten({**flat_b, **dict(zip(names, bs))})}
        return tree.unflatten({**flat_g, **dict(zip(names, out))}), state

    return GradientTransformation(init, update)


def add_decayed_weights(rate: Scalars) -> GradientTransformation:
    """Weight decay: updates + rate * params; `rate` is one value or a tree of per-leaf values, 0 skips.

    On plain gradients (SGD's coupled decay) the sum is computed here, as torch.optim.SGD does. On a
    pending `Scaled` update (after `scale_by_adam`: AdamW's decoupled decay) it stays pending: the later
    learning rate scales it and `apply_updates` multiplies the weight by 1 - lr * rate first, as torch.
    """

    def fn(grads, params, extra):
        if params is None:
            raise ValueError("add_decayed_weights needs params: call update(grads, state, params)")
        flat_g, flat_p = tree.flatten(grads), tree.flatten(params)
        rates = _per_leaf(rate, flat_g)
        out = dict(flat_g)
        for value, names in _buckets(rates, flat_g).items():
            if value == 0.0:
                continue
            pending = {n for n in names if isinstance(flat_g[n], Scaled) and not flat_g[n].rate}
            out.update((n, flat_g[n]._replace(rate=value)) for n in pending)
            now = [n for n in names if n not in pending]
            if now:
                gs = tree.flatten(materialize(tree.unflatten({n: flat_g[n] for n in now}), params))
                out.update(zip(now, torch._foreach_add(list(gs.values()), [flat_p[n] for n in now], alpha=value)))
        return tree.unflatten(out)

    return _stateless(fn)


def scale_by_learning_rate(lr: Scalars, schedule: Schedule | None = None) -> GradientTransformation:
    """updates * -(lr * schedule(step)): descent; `lr` is one value or a tree of per-leaf values (groups).

    The factor is folded in float64 (-(schedule * lr), as torch's group lr) and left pending on the
    update (`Scaled`). With a schedule, `update` needs `step=` (a 0-dim tensor) among its extra arguments.
    """

    def fn(grads, params, extra):
        flat_g = tree.flatten(grads)
        factor = _schedule_factor(schedule, extra)
        out = dict(flat_g)
        for value, names in _buckets(_per_leaf(lr, flat_g), flat_g).items():
            out.update(_scale(flat_g, names, -(factor * value)))
        return tree.unflatten(out)

    return _stateless(fn)


def report_lr(lr: float, schedule: Schedule | None = None) -> GradientTransformation:
    """Keep the learning rate `lr * schedule(step)` in the state as "lr" (gradients pass through): the train
    step logs it as the `lr` metric for a custom chain, which owns its schedule."""

    def update(grads, state, params=None, **extra):
        return grads, {"lr": torch.as_tensor(_schedule_factor(schedule, extra), dtype=torch.float64) * lr}

    return GradientTransformation(lambda params: {"lr": torch.tensor(float(lr), dtype=torch.float64)}, update)


def scale_by_schedule(schedule: Schedule) -> GradientTransformation:
    """updates * schedule(step), left pending (needs `step=` among the extra arguments of `update`)."""

    def fn(grads, params, extra):
        flat_g = tree.flatten(grads)
        names = [n for n, g in flat_g.items() if g is not None]
        return tree.unflatten({**flat_g, **_scale(flat_g, names, _schedule_factor(schedule, extra))})

    return _stateless(fn)


# ---------------------------------------------------------------- ready-made optimizers


def adamw(
    lr: Scalars,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: Scalars = 1e-2,
    schedule: Schedule | None = None,
) -> GradientTransformation:
    """AdamW (torch.optim.AdamW's update, optax's composition); per-leaf lr/weight_decay trees allowed."""
    return chain(scale_by_adam(b1, b2, eps), add_decayed_weights(weight_decay), scale_by_learning_rate(lr, schedule))


def adam(lr: Scalars, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, schedule=None) -> GradientTransformation:
    return chain(scale_by_adam(b1, b2, eps), scale_by_learning_rate(lr, schedule))


def sgd(
    lr: Scalars, momentum: float = 0.0, nesterov: bool = False, weight_decay: Scalars = 0.0, schedule=None
) -> GradientTransformation:
    """torch.optim.SGD: coupled weight decay added to the gradient, then momentum, then the LR."""
    links = [add_decayed_weights(weight_decay)]
    if momentum:
        links.append(trace(momentum, nesterov))
    return chain(*links, scale_by_learning_rate(lr, schedule))


# ---------------------------------------------------------------- helpers


def _stateless(fn: Callable[[tree.Params, tree.Params | None, dict], tree.Params]) -> GradientTransformation:
    return GradientTransformation(
        lambda params: {}, lambda grads, state, params=None, **extra: (fn(grads, params, extra), {})
    )


def _schedule_factor(schedule: Schedule | None, extra: dict) -> Tensor | float:
    """schedule(step) in float64 (a Python float stays one)."""
    if schedule is None:
        return 1.0
    if "step" not in extra:
        raise ValueError("a scheduled transformation needs update(..., step=<0-dim tensor>)")
    factor = schedule(extra["step"])
    return factor.to(torch.float64) if isinstance(factor, Tensor) else float(factor)


def _scale(flat_g: Mapping[str, Any], names: list[str], factor: Tensor | float) -> dict[str, Scaled]:
    """The leaves `names` with one more pending factor (shared: one scalar op per group, not per leaf)."""
    out = {}
    for name in names:
        u = flat_g[name] if isinstance(flat_g[name], Scaled) else Scaled(flat_g[name])
        out[name] = u._replace(mul=(*u.mul, factor), decay_mul=(*u.decay_mul, factor) if u.rate else ())
    return out


def _product(factors: tuple[Tensor | float, ...]) -> Tensor | float:
    out: Tensor | float = 1.0
    for f in factors:
        out = out * f
    return out


def _groups(flat_u: Mapping[str, Any], names: list[str]) -> list[tuple[list[str], Any]]:
    """Leaves whose updates share every pending scalar (plain tensors form one group): one foreach each."""
    out: dict[Any, list[str]] = {}
    for name in names:
        out.setdefault(_group_key(flat_u[name]), []).append(name)
    return [(group, flat_u[group[0]]) for group in out.values()]


def _group_key(u: Tensor | Scaled) -> Any:
    if not isinstance(u, Scaled):
        return None
    ident = [f if isinstance(f, float) else id(f) for f in (*u.mul, u.div, *u.decay_mul)]
    return (len(u.mul), u.rate, *ident)


def _directions(flat_u: Mapping[str, Scaled], group: list[str], first: Scaled) -> list[Tensor]:
    """direction * (prod(mul) / div) for one group, the scalar rounded once to the tensors' dtype."""
    ds = [flat_u[n].direction for n in group]
    scale = _product(first.mul) / first.div
    if isinstance(scale, float) and scale == 1.0:
        return ds
    return torch._foreach_mul(ds, _scalar(scale, ds[0]))


def _per_leaf(value: Scalars, flat_g: Mapping[str, Any]) -> dict[str, float]:
    if isinstance(value, Mapping):
        flat = tree.flatten(value)
        missing = [n for n, g in flat_g.items() if g is not None and n not in flat]
        if missing:
            raise KeyError(f"per-leaf values missing for {missing[:5]}")
        return {n: float(flat[n]) for n in flat_g}
    return dict.fromkeys(flat_g, float(value))


def _buckets(values: Mapping[str, float], flat_g: Mapping[str, Any]) -> dict[float, list[str]]:
    """Leaves with a gradient grouped by equal value (one foreach call per parameter group)."""
    out: dict[float, list[str]] = {}
    for name, g in flat_g.items():
        if g is not None:
            out.setdefault(values[name], []).append(name)
    return out


def _scalar(value: Tensor | float, like: Tensor) -> Tensor:
    """A 0-dim tensor on `like`'s device and dtype (what torch does with its Python-float scalars)."""
    return torch.as_tensor(value, dtype=torch.float64).to(device=like.device, dtype=like.dtype)


def _zeros_or_none(g: Tensor | Scaled | None) -> Tensor | None:
    if g is None:
        return None
    return torch.zeros_like(g.direction if isinstance(g, Scaled) else g)
