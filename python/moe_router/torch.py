"""PyTorch bridge: routing as a differentiable operation, and a drop-in top-k router module.

:func:`route` is a ``torch.autograd.Function``: the forward routes in Rust,
the backward is :meth:`RoutingDecision.backward` (closed form, in Rust), so
the combine weights and the auxiliary loss carry gradients to the logits.
:class:`TopKRouter` is an ``nn.Module`` with Hugging Face's router contract
(``MixtralTopKRouter``, ``Qwen2MoeTopKRouter``): ``forward(hidden) ->
(router_logits, expert_weights, expert_indices)``. :func:`route_op` is the same
routing as the ``torch.library`` custom op ``torch.ops.moe_router.route`` with a
registered autograd formula, which ``torch.compile`` traces without a graph
break. torch is not a dependency of the package; this module imports it.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ._core import ConfigError, ConfigTypeError
from .config import RouterConfig
from .decision import RoutingDecision
from .presets import preset
from .routing import route_logits

__all__ = ["TopKRouter", "combine", "permute", "route", "route_op"]


def _numpy(x: torch.Tensor) -> np.ndarray:
    """A CPU float32/float64 view (float16/bfloat16 are widened to float32, a copy)."""
    x = x.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    return x.cpu().numpy()


def _weight_cotangent(grad: torch.Tensor) -> np.ndarray:
    """A weights' cotangent as NumPy for ``RoutingDecision.backward``: float32 as it
    is (read in place), any other dtype (bfloat16 has no NumPy dtype) as float64."""
    grad = grad.detach()
    return (grad if grad.dtype == torch.float32 else grad.double()).cpu().numpy()


class _Route(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, config: RouterConfig, training: bool, call: Dict[str, Any],
                box: List[RoutingDecision]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dec = route_logits(_numpy(logits), config, training=training, **call)
        box.append(dec)
        ctx.decision, ctx.dtype, ctx.shape = dec, logits.dtype, logits.shape
        lead = tuple(logits.shape[:-1])
        indices = torch.from_numpy(dec.expert_indices.astype(np.int64)).reshape(*lead, dec.top_k)
        # A tensor of its own: the decision's arrays are read-only views.
        weights = torch.from_numpy(dec.expert_weights.copy()).reshape(*lead, dec.top_k)
        aux = torch.tensor(dec.auxiliary_loss, dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)
        ctx.mark_non_differentiable(indices)
        return indices, weights, aux

    @staticmethod
    def backward(ctx: Any, _: Any, grad_weights: Optional[torch.Tensor],
                 grad_aux: Optional[torch.Tensor]) -> Tuple[Any, ...]:
        gw = None if grad_weights is None else _weight_cotangent(grad_weights)
        ga = 0.0 if grad_aux is None else float(grad_aux)
        grad = ctx.decision.backward(gw, ga)
        return torch.from_numpy(grad).to(ctx.dtype).reshape(ctx.shape), None, None, None, None


def route(logits: torch.Tensor, config: RouterConfig, training: bool = True,
          **call: Any) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, RoutingDecision]:
    """Route ``logits`` with autograd: gradients flow to ``logits`` through the weights and the loss.

    Parameters
    ----------
    logits : torch.Tensor, float, shape [T, E] or [B, S, E]
        On the CPU (read without a copy for float32/float64; float16/bfloat16 are widened).
    config : RouterConfig
    training : bool, default True
        Training mode (noise, training capacity factor).
    **call
        ``token_mask``, ``expert_bias``, ``step``, ``replay`` (router replay: the
        recorded experts, gradients through the recomputed weights): as
        :func:`moe_router.route_logits`.

    Returns
    -------
    expert_indices : torch.Tensor, int64, shape [..., k]
        Not differentiable.
    expert_weights : torch.Tensor, float32, shape [..., k]
    auxiliary_loss : torch.Tensor, scalar (float64 for float64 logits, else float32)
    decision : RoutingDecision
        Everything else (drops, counts, the dispatch plan).

    Notes
    -----
    The backward is :meth:`RoutingDecision.backward` (selection fixed, balance counts
    constant, as Megatron-Core and Hugging Face differentiate it); it returns the
    gradient in the logits' dtype.

    Raises
    ------
    ConfigError, InputError, TypeError
        As :func:`moe_router.route_logits`.
    """
    box: List[RoutingDecision] = []
    indices, weights, aux = _Route.apply(logits, config, training, call, box)
    return indices, weights, aux, box[0]


#: The configurations the custom op has seen, by their ``repr`` (an op argument must be a
#: plain value; the ``repr`` of a RouterConfig names every non-default field).
_CONFIGS: Dict[str, RouterConfig] = {}


def _route_call(logits: torch.Tensor, config: str, training: bool, step: int,
                token_mask: Optional[torch.Tensor], expert_bias: Optional[torch.Tensor]) -> RoutingDecision:
    mask = None if token_mask is None else token_mask.detach().cpu().numpy()
    bias = None if expert_bias is None else expert_bias.detach().double().cpu().numpy()
    return route_logits(_numpy(logits), _CONFIGS[config], training=training, step=step, token_mask=mask,
                        expert_bias=bias)


@torch.library.custom_op("moe_router::route", mutates_args=())
def _route_op(logits: torch.Tensor, config: str, training: bool, step: int, token_mask: Optional[torch.Tensor],
              expert_bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dec = _route_call(logits, config, training, step, token_mask, expert_bias)
    lead = tuple(logits.shape[:-1])
    indices = torch.from_numpy(dec.expert_indices.astype(np.int64)).reshape(*lead, dec.top_k)
    weights = torch.from_numpy(dec.expert_weights.copy()).reshape(*lead, dec.top_k)
    return indices, weights, torch.tensor(dec.auxiliary_loss, dtype=_loss_dtype(logits))


def _loss_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


@_route_op.register_fake
def _route_shapes(logits: torch.Tensor, config: str, training: bool, step: int, token_mask: Optional[torch.Tensor],
                  expert_bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k = _CONFIGS[config].top_k
    lead = tuple(logits.shape[:-1])
    return (logits.new_empty(*lead, k, dtype=torch.int64), logits.new_empty(*lead, k, dtype=torch.float32),
            logits.new_empty((), dtype=_loss_dtype(logits)))


@torch.library.custom_op("moe_router::route_backward", mutates_args=())
def _route_backward_op(logits: torch.Tensor, grad_weights: torch.Tensor, grad_aux: torch.Tensor, config: str,
                       training: bool, step: int, token_mask: Optional[torch.Tensor],
                       expert_bias: Optional[torch.Tensor]) -> torch.Tensor:
    # Routing is deterministic in (logits, config, training, step, mask, bias): routing
    # again gives the forward's decision, so no Python object crosses the graph.
    dec = _route_call(logits, config, training, step, token_mask, expert_bias)
    grad = dec.backward(_weight_cotangent(grad_weights), float(grad_aux))
    return torch.from_numpy(grad).to(logits.dtype).reshape(logits.shape)


@_route_backward_op.register_fake
def _route_backward_shapes(logits: torch.Tensor, grad_weights: torch.Tensor, grad_aux: torch.Tensor, config: str,
                           training: bool, step: int, token_mask: Optional[torch.Tensor],
                           expert_bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.empty_like(logits)


def _route_setup(ctx: Any, inputs: Tuple[Any, ...], output: Any) -> None:
    logits, config, training, step, token_mask, expert_bias = inputs
    ctx.save_for_backward(logits, token_mask, expert_bias)
    ctx.config, ctx.training, ctx.step = config, training, step
    ctx.weights_shape = output[1].shape


def _route_grad(ctx: Any, _: Any, grad_weights: Optional[torch.Tensor],
                grad_aux: Optional[torch.Tensor]) -> Tuple[Any, ...]:
    logits, token_mask, expert_bias = ctx.saved_tensors
    if grad_weights is None:
        grad_weights = logits.new_zeros(ctx.weights_shape, dtype=torch.float32)
    if grad_aux is None:
        grad_aux = logits.new_zeros((), dtype=_loss_dtype(logits))
    grad = _route_backward_op(logits, grad_weights, grad_aux, ctx.config, ctx.training, ctx.step, token_mask,
                              expert_bias)
    return grad, None, None, None, None, None


_route_op.register_autograd(_route_grad, setup_context=_route_setup)


def route_op(logits: torch.Tensor, config: RouterConfig, training: bool = True, step: int = 0,
             token_mask: Optional[torch.Tensor] = None,
             expert_bias: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`route` as the custom op ``torch.ops.moe_router.route``, for ``torch.compile``.

    The op and its backward (``torch.ops.moe_router.route_backward``) are registered with
    ``torch.library.custom_op``, with fake (meta) implementations giving the output shapes
    and the autograd formula of :meth:`RoutingDecision.backward`, so a compiled model keeps
    the router in its graph (no graph break) and differentiates through it. No decision
    object crosses the graph: the backward routes the saved logits again (routing is
    deterministic in the logits, configuration, mode, step, mask and bias), which costs one
    more routing pass than :func:`route`; use :func:`route` in eager code, where the
    decision is kept.

    Parameters
    ----------
    logits : torch.Tensor, float, shape [T, E] or [B, S, E] (CPU)
    config : RouterConfig
        A token-choice configuration (the op's output has ``top_k`` columns).
    training : bool, default True
    step : int, default 0
        The RNG step of training noise and reroute draws.
    token_mask : torch.Tensor of bool, shape [T] or [B, S], optional
    expert_bias : torch.Tensor of float, shape [E], optional

    Returns
    -------
    expert_indices : torch.Tensor, int64, shape [..., k]
    expert_weights : torch.Tensor, float32, shape [..., k]
    auxiliary_loss : torch.Tensor, scalar (float64 for float64 logits, else float32)

    Raises
    ------
    ConfigTypeError
        ``config`` is not a RouterConfig.
    ConfigError, InputError, TypeError
        As :func:`moe_router.route_logits`.
    """
    return _route_op(logits, _config_key(config), bool(training), int(step), token_mask, expert_bias)


@torch._dynamo.assume_constant_result
def _config_key(config: RouterConfig) -> str:
    """The op's string for ``config`` (a constant to ``torch.compile``: configurations are immutable)."""
    if not isinstance(config, RouterConfig):
        raise ConfigTypeError(f"config must be a RouterConfig, got {type(config).__name__}")
    key = repr(config)
    _CONFIGS.setdefault(key, config)
    return key


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, plan: Any) -> torch.Tensor:
        ctx.plan, ctx.shape = plan, hidden.shape
        return torch.from_numpy(plan.permute(_numpy(hidden)))

    @staticmethod
    def backward(ctx: Any, grad_rows: torch.Tensor) -> Tuple[Any, ...]:
        grad = ctx.plan.combine(_numpy(grad_rows.contiguous()), weighted=False)
        return torch.from_numpy(grad).reshape(ctx.shape), None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, expert_out: torch.Tensor, expert_weights: torch.Tensor, plan: Any) -> torch.Tensor:
        out = _numpy(expert_out)
        ctx.plan, ctx.out, ctx.weights_shape = plan, out, expert_weights.shape
        return torch.from_numpy(plan.combine(out))

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> Tuple[Any, ...]:
        plan, g = ctx.plan, _numpy(grad_y.contiguous())
        rows = plan.permute(g)
        rows *= plan.weights[:, None].astype(rows.dtype)
        per_choice = plan.unpermute(ctx.out)  # [*batch, k, D]; zero where dropped
        grad_w = np.einsum("...kd,...d->...k", per_choice, g.reshape(*per_choice.shape[:-2], -1))
        return torch.from_numpy(rows), torch.from_numpy(grad_w.astype(np.float32)).reshape(ctx.weights_shape), None


def permute(plan: Any, hidden: torch.Tensor) -> torch.Tensor:
    """``plan.permute(hidden)`` with autograd: the backward is the unweighted ``combine`` of the gradient rows.

    Parameters
    ----------
    plan : DispatchPlan
    hidden : torch.Tensor, float32/float64/float16, shape [T, D] or batch_shape + [D] (CPU)

    Returns
    -------
    torch.Tensor, shape [num_rows, D]

    Raises
    ------
    InputError, TypeError
        As :meth:`DispatchPlan.permute`.
    """
    return _Permute.apply(hidden, plan)


def combine(plan: Any, expert_out: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
    """``plan.combine(expert_out)`` with autograd into the expert outputs and the combine weights.

    ``y_t = sum_j w_tj * expert_out[row_of[t, j]]``; the backward gives ``grad_expert_out[r] =
    w_r * grad_y[token_ids[r]]`` and ``grad_w_tj = <grad_y_t, expert_out[row_of[t, j]]>`` (0 where
    dropped), so gradients reach the router through ``expert_weights`` (then :func:`route`'s backward).

    Parameters
    ----------
    plan : DispatchPlan
        Of the decision whose weights ``expert_weights`` are.
    expert_out : torch.Tensor, float, shape [num_rows, D]
    expert_weights : torch.Tensor, float32, shape batch_shape + [k]
        :func:`route`'s ``expert_weights`` for that decision (their values are the plan's; the
        tensor carries the graph).

    Returns
    -------
    torch.Tensor, shape batch_shape + [D]

    Raises
    ------
    InputError, TypeError
        As :meth:`DispatchPlan.combine`.
    """
    return _Combine.apply(expert_out, expert_weights, plan)


class TopKRouter(torch.nn.Module):
    """A top-k router module with Hugging Face's contract, routed by moe_router.

    Parameters
    ----------
    config : RouterConfig
        E and k come from here (e.g. ``mr.preset("mixtral", 8, 2)``).
    hidden_dim : int
        D.

    Attributes
    ----------
    weight : torch.nn.Parameter, shape [E, D]
        torch's ``nn.Linear`` convention (logits = ``hidden @ weight.T``).
    last_decision : RoutingDecision or None
        The decision of the last forward (losses, statistics, dispatch plan).
    auxiliary_loss : torch.Tensor or None
        The last forward's differentiable auxiliary loss.
    """

    def __init__(self, config: RouterConfig, hidden_dim: int) -> None:
        super().__init__()
        self._setup(config, hidden_dim)
        self.weight = torch.nn.Parameter(torch.randn(config.num_experts, hidden_dim) / hidden_dim ** 0.5)

    def _setup(self, config: RouterConfig, hidden_dim: int) -> None:
        if not isinstance(config, RouterConfig):
            raise TypeError(f"config must be a RouterConfig, got {type(config).__name__}")
        self.config, self.hidden_dim = config, int(hidden_dim)
        self.top_k, self.num_experts = config.top_k, config.num_experts
        self.last_decision: Optional[RoutingDecision] = None
        self.auxiliary_loss: Optional[torch.Tensor] = None

    def forward(self, hidden_states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``hidden_states [N, D] or [B, S, D]`` -> ``(router_logits [N, E], expert_weights [N, k],
        expert_indices [N, k])``, the contract of Hugging Face's ``MixtralTopKRouter``."""
        h = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = torch.nn.functional.linear(h, self.weight)
        indices, weights, aux, dec = route(router_logits, self.config, training=self.training)
        self.last_decision, self.auxiliary_loss = dec, aux
        return router_logits, weights, indices

    @classmethod
    def from_hf(cls, module: torch.nn.Module, config: Optional[RouterConfig] = None) -> "TopKRouter":
        """A router with ``module``'s weight (a copy) that is also an instance of ``module``'s class.

        Hugging Face collects router logits by the router's class (``OutputRecorder``), so the
        returned object subclasses both this class and ``type(module)``.

        Parameters
        ----------
        module : torch.nn.Module
            A Hugging Face router with ``weight [E, D]`` and ``top_k`` (Mixtral, Qwen2/3-MoE).
        config : RouterConfig, optional
            Default: the preset of the module's family (``mixtral``; ``qwen_moe`` with its
            ``norm_topk_prob``).

        Raises
        ------
        ConfigError
            No config given and the module's family is not known.
        """
        weight = module.weight
        e, d = int(weight.shape[0]), int(weight.shape[1])
        if config is None:
            name = type(module).__name__.lower()
            k = int(getattr(module, "top_k"))
            if "mixtral" in name:
                config = preset("mixtral", e, k)
            elif "qwen" in name:
                config = preset("qwen_moe", e, k, norm_topk_prob=bool(getattr(module, "norm_topk_prob", False)))
            else:
                raise ConfigError(f"invalid module: no preset for {type(module).__name__}; pass config=")
        both = type(f"MoeRouter{type(module).__name__}", (cls, type(module)), {})
        router = both.__new__(both)
        torch.nn.Module.__init__(router)
        router._setup(config, d)
        router.weight = torch.nn.Parameter(weight.detach().clone())
        if hasattr(module, "norm_topk_prob"):
            router.norm_topk_prob = module.norm_topk_prob
        return router
