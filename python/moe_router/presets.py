"""Compatibility presets: route like Megatron-Core, DeepSpeed or a Hugging Face model.

``preset(name, num_experts, top_k, **overrides)`` returns a :class:`RouterConfig`
whose routing reproduces the named framework's router on the same logits: the
same experts, kept assignments, slots where the framework exposes them,
capacity, weights and losses (checked against the framework's own outputs in
``tests/test_conformance.py``). Each preset has its own function below whose
docstring lists every behaviour it sets and every known difference.

Overrides take this package's field names (any :class:`RouterConfig` argument)
or the framework's own parameter names, so a model's settings can be pasted
as they are::

    preset("megatron", 64, 8, moe_router_pre_softmax=True, moe_expert_capacity_factor=1.25)
    preset("deepspeed", 64, 2, min_capacity=4, drop_tokens=False)
    preset("deepseek_v3", 256, 8, n_group=8, topk_group=4, routed_scaling_factor=2.5)

A setting that changes routing in a way this package cannot reproduce (random
token selection, Gumbel sampling, input jitter) is refused with an explanation
rather than approximated. Where the frameworks' loss definitions differ from
ours, the preset records the framework in ``config.peer`` and every decision
routed with it carries ``peer_load_balance_loss``, the framework's own value.
"""

from __future__ import annotations

from typing import Any, List, Optional, Union

from . import _core, _inputs
from ._core import RouterConfig, RoutingDecision

__all__ = [
    "PRESETS",
    "accepted_names",
    "base",
    "deepseek_v3",
    "deepspeed",
    "fairseq",
    "expert_choice",
    "megatron",
    "mixtral",
    "peer_load_balance_loss",
    "preset",
    "qwen_moe",
    "switch",
    "tutel",
]

#: Names accepted by :func:`preset`.
PRESETS = _core.PRESETS


def accepted_names(name: str) -> List[str]:
    """Every override name :func:`preset` accepts for ``name``: the framework's, then ours."""
    return _core.preset_accepted_names(name)


def preset(name: str, num_experts: int, top_k: Optional[int] = None, **overrides: Any) -> RouterConfig:
    """A :class:`RouterConfig` that routes like the named framework.

    Parameters
    ----------
    name : {"megatron", "deepspeed", "mixtral", "qwen_moe", "deepseek_v3", "switch", "tutel", "fairseq",
            "expert_choice", "base"}
        The framework; see the function of the same name in this module for
        every behaviour it sets.
    num_experts : int
        E. The framework's own name for it (``num_moe_experts``,
        ``num_local_experts``, ``n_routed_experts``) may also be given and must agree.
    top_k : int, optional
        k. The framework's name (``moe_router_topk``/``topk``, DeepSpeed ``k``,
        Hugging Face ``num_experts_per_tok``, Tutel ``k``) may be given instead.
        Default: the framework's default (Megatron 2, DeepSpeed 1, Mixtral 2,
        Qwen-MoE 4, DeepSeek-V3 8, Switch 1, Tutel 1, fairseq 2, expert choice 1:
        flaxformer's capacity has no k, BASE 1).
    **overrides
        Framework parameter names (see :func:`accepted_names`) and
        :class:`RouterConfig` field names. Our names are applied last; giving a
        framework name and our name for the same setting with different values
        is an error.

    Returns
    -------
    RouterConfig
        With ``peer`` set where the framework's loss normalization differs, so that
        decisions carry ``peer_load_balance_loss`` (None for expert choice and for
        ``"base"``, which has no balance loss).

    Raises
    ------
    ConfigError
        Unknown preset name (the message lists them); a value the framework or
        this package rejects, or a setting whose behaviour cannot be reproduced
        (the message says why).
    ConfigTypeError
        (a ``ConfigError`` and a ``TypeError``) an unknown override name (the
        message lists the accepted ones), or a value of the wrong type: E and k
        must be ints, flags bools, coefficients and factors reals.

    Examples
    --------
    >>> import moe_router as mr
    >>> cfg = mr.preset("megatron", 64, 8, moe_router_pre_softmax=True, moe_expert_capacity_factor=1.25)
    >>> cfg.normalize_weights, cfg.capacity_rounding, cfg.drop_policy, cfg.capacity(4096)
    (False, 'megatron', 'probs', 640)
    """
    return _core.preset_config(name, num_experts, top_k, **overrides)


# ---------------------------------------------------------------------------
# one function per preset: the documentation of what each one sets
# ---------------------------------------------------------------------------
def megatron(num_experts: int, top_k: Optional[int] = None, **overrides: Any) -> RouterConfig:
    """Megatron-Core's ``TopKRouter`` (``moe_utils.topk_routing_with_score_function``,
    ``get_capacity``, ``apply_router_token_dropping``, ``switch_load_balancing_loss_func``,
    ``z_loss_func``; version 0.16).

    Behaviour set:

    - **Score function and where the softmax happens**: ``score_function="softmax"``
      (``moe_router_score_function``). With ``pre_softmax=False`` (default) the top-k is
      taken on the logits and the softmax runs over the k chosen logits, which equals our
      softmax over all E followed by ``normalize_weights=True``. With ``pre_softmax=True``
      the softmax runs over all E first and the chosen probabilities are not
      renormalized (``normalize_weights=False``). ``score_function="sigmoid"`` or
      ``"sqrtsoftplus"`` (``sqrt(softplus(z))``): those scores, renormalized over the
      chosen experts only when k > 1 (as Megatron).
    - **Scaling**: ``scaling_factor`` / ``moe_router_topk_scaling_factor`` ->
      ``weight_scale`` (None = 1).
    - **Groups**: ``num_groups`` / ``group_topk`` (``moe_router_num_groups``,
      ``moe_router_group_topk``); a group is scored by the sum of its top
      ``topk // group_topk`` scores (``group_score="max"`` for 1, ``"top<n>_sum"``
      otherwise), ranked on the tensor selection runs on: raw logits in the default
      post-softmax mode (``group_score_input="logits"``), probabilities with
      ``pre_softmax``, biased sigmoid scores with ``sigmoid``.
    - **Expert bias**: ``expert_bias`` (values, stored on the config) or
      ``moe_router_enable_expert_bias=True`` (pass the bias to ``route_logits``);
      selection only, sigmoid or sqrtsoftplus only (Megatron's rule).
    - **Capacity**: ``capacity_factor`` / ``moe_expert_capacity_factor`` (default None =
      dropless; negative = dropless, as Megatron) with Megatron's float64 formula
      ``ceil((T*k/E) * cf)`` (``capacity_rounding="megatron"``), no ``min_capacity``
      (Megatron does not pass it when dropping), the same factor in evaluation.
    - **Drop order**: ``drop_policy`` / ``moe_token_drop_policy``: ``"probs"`` (default:
      each expert keeps its C highest final weights; we break ties to the lower token,
      Megatron leaves them to ``torch.topk``) or ``"position"`` (each expert keeps its
      first C tokens; Megatron takes the C returned by ``torch.topk`` over a 0/1 map,
      which on CPU are *not* the first ones when more than C tie, so only the counts
      agree). No renormalization after drops.
    - **Loss normalization**: our ``load_balance_loss`` has Megatron's normalization
      (``E / (k*T) * sum_e n_e P_e`` with ``n_e`` assignments to expert e, 1.0 at
      balance), but Megatron counts ``n_e`` with a fresh plain top-k that ignores the
      expert bias and the group limit (and capacity), while ours counts the routing used. ``peer_load_balance_loss`` reproduces
      Megatron's plain count (re-routing the logits without bias and groups when the
      config has either). ``router_z_loss`` equals ``z_loss_func``. Coefficients:
      ``moe_aux_loss_coeff`` (default 0) -> ``load_balance_loss_coeff`` (or, with
      ``moe_router_load_balancing_type="seq_aux_loss"``, ``seq_load_balance_loss_coeff``);
      ``moe_z_loss_coeff`` (default None = 0) -> ``router_z_loss_coeff``.

    Differences, documented rather than faked:

    - Post-softmax routing (``pre_softmax=False``) with ``group_topk`` such that groups
      are scored by a top-2 sum: Megatron sums the *logits* of a group, we sum the
      softmax probabilities, so the chosen groups can differ.
    - ``pad_to_capacity`` / ``moe_pad_expert_input_to_capacity`` is accepted and changes
      no routing: the kept assignments and weights are those of Megatron; Megatron's
      padding rows (weight 0, ``tokens_per_expert = C``) are a dispatcher matter: size
      each expert buffer ``decision.capacity``.
    - Megatron refuses ``softmax`` with k = 1 unless ``pre_softmax`` (a gradient concern);
      we route it as Megatron's functions do (every weight 1).
    - Megatron scores in float32; so does the preset (``score_precision="float32_logits"``
      after top-k, ``"float32"`` with ``pre_softmax`` or sigmoid, ranking those float32
      scores): probabilities that underflow to 0 and sigmoid scores that saturate to 1.0
      tie, and we give the tie to the lower expert (or token) index where torch's order is
      unspecified. A routed assignment of float32 probability 0 keeps its place before
      unrouted tokens under ``drop_policy="probs"``; Megatron's ``topk`` over the expert's
      column may keep an unrouted token of probability 0 instead.
    - **Sinkhorn**: ``moe_router_load_balancing_type="sinkhorn"`` -> ``routing="sinkhorn"``
      (``sinkhorn_load_balancing``); ``moe_aux_loss_coeff`` must be 0 and no expert bias
      (Megatron's rules); the score function and groups are not used (as in Megatron).
      Our iteration subtracts each row's maximum before ``exp`` and stops after
      ``sinkhorn_max_iterations`` (see ``docs/semantics.md``).
    - ``moe_input_jitter_eps`` and ``global_aux_loss`` are refused.
    """
    return preset("megatron", num_experts, top_k, **overrides)


def deepspeed(num_experts: int, top_k: Optional[int] = None, **overrides: Any) -> RouterConfig:
    """DeepSpeed-MoE's ``TopKGate`` (``sharded_moe.top1gating`` / ``top2gating`` /
    ``topkgating``; version 0.19), chosen by k as ``TopKGate`` dispatches: k = 1 ->
    top-1, k = 2 -> top-2, k >= 3 -> top-k (override with ``gate="top1"|"top2"|"topk"``).

    Behaviour set:

    - **Score function**: softmax over all E (DeepSpeed's ``gates``); experts chosen by
      the highest probability (argmax for the first, and for top-2's second among the
      rest). The weights are the raw probabilities (``normalize_weights=False``).
    - **Renormalization**: top-2 and top-k renormalize each token's weights over its
      *surviving* experts after drops (``renormalize_after_drop=True``); top-1 keeps
      the raw probability.
    - **Capacity**: DeepSpeed's float32 formula ``max(ceil(float32(T/E) *
      float32(k*cf)), min_capacity)`` (``capacity_rounding="deepspeed"``) with the
      DeepSpeed ``MoE`` layer defaults ``capacity_factor=1.0``,
      ``eval_capacity_factor=1.0`` (used when ``training=False``), ``min_capacity=4``
      (``TopKGate``'s own default is 8). ``drop_tokens=False`` is dropless.
    - **Drop order and slots**: top-1: tokens in order (``"position"``); top-2: every
      first choice before any second choice (``"rank"``), with DeepSpeed's slots (a
      second choice's slot counts all first choices of its expert); top-k:
      ``drop_policy="probs"`` (default; each expert keeps its C highest probabilities,
      slots in token order) or ``"position"`` (token order over all choices).
    - **Loss normalization**: top-1 and top-2 ``l_aux = E * sum_e f1_e P_e`` counts
      first choices only, top-k ``l_aux`` = ours. ``peer_load_balance_loss`` gives
      DeepSpeed's value; ``load_balance_loss`` stays ours (all k choices). DeepSpeed has
      no z-loss (``router_z_loss_coeff=0``); ``load_balance_loss_coeff`` keeps our
      default (DeepSpeed leaves the coefficient to the caller).

    Differences, documented rather than faked (refused when asked for):

    - Random token selection (``use_rts=True``, DeepSpeed's default for top-1) and
      top-2's Gumbel sampling of the second expert (``top2_2nd_expert_sampling=True``,
      its default) draw from torch's RNG, in evaluation too; they are refused, so pass
      ``False``. Top-1 without RTS keeps whichever C tokens ``torch.topk`` returns
      among equal 0/1 values (on CPU not the first ones); we keep the first C in token
      order, so the counts agree but the set can differ when an expert overflows.
    - ``noisy_gate_policy`` ``'Jitter'``/``'RSample'`` are refused (RNG).
    - DeepSpeed's top-1 asserts ``T >= min_capacity``; we route any T (a capacity above
      T is simply not binding).
    - DeepSpeed's dense ``[T, E, C]`` output silently loses routes whose weight
      underflowed to 0; we keep them, as its ``sparse_routes`` path does.
    - Gates are float32 as in DeepSpeed (``score_precision``): top-k ranks them (gates that
      underflow to 0 tie, to the lower expert index; under ``drop_policy="probs"`` a routed
      gate of 0 keeps its place before unrouted tokens, where DeepSpeed's ``topk`` may not),
      top-1/top-2 take the argmax of the logits; renormalization divides by
      ``max(sum, float32 eps)`` as DeepSpeed does.
    """
    return preset("deepspeed", num_experts, top_k, **overrides)


def mixtral(num_experts: int, top_k: Optional[int] = None, **overrides: Any) -> RouterConfig:
    """Hugging Face Mixtral's ``MixtralTopKRouter`` and ``load_balancing_loss_func``
    (transformers 5).

    Behaviour set:

    - **Score function**: float32 softmax over all E, then top-k, then the k weights are
      renormalized to sum 1 (``normalize_weights=True``); no scaling.
    - **Capacity**: none (dropless: every expert processes every token routed to it);
      no drop order applies.
    - **Loss normalization**: Mixtral's loss is ``E * sum_e f_e P_e`` with ``f_e`` over
      all k choices *not* divided by k: it equals k times our ``load_balance_loss``
      (k at balance, ours 1). ``peer_load_balance_loss`` gives Mixtral's value. Mixtral
      pools the logits of all layers into one loss; ours is per call (per layer).
      ``router_aux_loss_coef`` (default 0.001) becomes ``load_balance_loss_coeff =
      coef * k``, so ``auxiliary_loss`` equals Mixtral's added term. No z-loss.

    Differences: ``router_jitter_noise`` multiplies the hidden states (router *and*
    experts) in Hugging Face; only 0 is accepted. The preset scores in float32 as Mixtral
    does (``score_precision="float32"``): probabilities that underflow to 0 tie where the
    logits do not, and the tie goes to the lower expert index (torch's order among equal
    values is unspecified).
    """
    return preset("mixtral", num_experts, top_k, **overrides)


def qwen_moe(num_experts: int, top_k: Optional[int] = None, **overrides: Any) -> RouterConfig:
    """Hugging Face Qwen2-MoE / Qwen3-MoE (``Qwen2MoeTopKRouter``, ``Qwen3MoeTopKRouter``)
    and their ``load_balancing_loss_func`` (transformers 5).

    Behaviour set:

    - **Score function**: float32 softmax over all E, top-k; the k weights are
      renormalized only with ``norm_topk_prob=True`` (default False, as
      ``Qwen2MoeConfig``; Qwen3 checkpoints usually set True) -> ``normalize_weights``.
    - **Capacity**: none (dropless); no drop order applies.
    - **Loss normalization**: as Mixtral, k times our ``load_balance_loss``
      (``peer_load_balance_loss``); ``router_aux_loss_coef`` (0.001) becomes
      ``load_balance_loss_coeff = coef * k``. No z-loss.

    Differences: Qwen2-MoE's shared expert (gated by its own sigmoid) is outside the
    router and not modelled. Ties as for Mixtral.
    """
    return preset("qwen_moe", num_experts, top_k, **overrides)


def deepseek_v3(num_experts: int, top_k: Optional[int] = None, **overrides: Any) -> RouterConfig:
    """Hugging Face DeepSeek-V3's ``DeepseekV3TopkRouter`` (transformers 5), the
    ``noaux_tc`` router of the DeepSeek-V3 report.

    Behaviour set:

    - **Score function**: element-wise sigmoid (``scoring_func="sigmoid"``), no softmax.
    - **Selection**: scores plus ``e_score_correction_bias`` (the selection bias, stored
      on the config; it never reaches the weights); ``n_group`` (8) contiguous groups,
      each scored by the sum of its two best biased scores (``group_score="top2_sum"``);
      only the best ``topk_group`` (4) groups are eligible; then top-k.
    - **Renormalization and scaling**: with ``norm_topk_prob=True`` (default) the k
      unbiased scores are divided by their sum; then times ``routed_scaling_factor``
      (2.5) -> ``weight_scale``.
    - **Capacity**: none (dropless); no drop order applies.
    - **Loss normalization**: Hugging Face computes no balance loss for DeepSeek-V3.
      The report's sequence-wise loss has our normalization (1 at balance, sigmoid
      scores normalized per token): ``aux_loss_alpha`` (0.001) with ``seq_aux=True``
      becomes ``seq_load_balance_loss_coeff`` (for ``[B, S, E]`` input), or
      ``load_balance_loss_coeff`` with ``seq_aux=False``. ``peer_load_balance_loss`` =
      ours. No z-loss.

    Differences, documented rather than faked:

    - Hugging Face sets the experts of excluded groups to 0.0 before the top-k, not to
      -inf; when a token's allowed groups hold fewer than k experts (or biased scores
      <= 0), it can pick excluded experts with weight from their real score. We never
      route outside the allowed groups (missing choices are unrouted fillers).
    - Hugging Face fails on groups of a single expert (``topk(2)`` inside a group); our
      ``top2_sum`` of a one-expert group is that expert's score.
    - The order of ``topk_idx`` in Hugging Face is unspecified (``sorted=False``); ours
      is best first. Compare the sets.
    - Scores, weights and the 1e-20 added to the renormalization denominator are float32
      as in Hugging Face (``score_precision="float32"``): sigmoid scores that saturate to
      1.0 tie, and the tie goes to the lower expert index.
    """
    return preset("deepseek_v3", num_experts, top_k, **overrides)


def switch(num_experts: int, top_k: Optional[int] = None, **overrides: Any) -> RouterConfig:
    """Hugging Face Switch Transformers' ``SwitchTransformersTop1Router`` and its
    ``load_balancing_loss_func`` / ``router_z_loss_func`` (transformers 5).

    Behaviour set:

    - **Score function**: float32 softmax over all E; top-1 (argmax, the lower index on
      ties); the weight is the raw top-1 probability (no renormalization). k must be 1.
    - **Capacity**: a fixed ``expert_capacity`` per expert (default 64), whatever T; no
      capacity factor. ``expert_capacity=None`` with our ``capacity_factor`` uses the
      formula instead.
    - **Drop order**: tokens in order (``"position"``): an expert keeps its first
      ``expert_capacity`` tokens; a dropped token has no expert (residual only).
    - **Loss normalization**: Switch's ``E * sum_e f_e P_e`` on first (only) choices and
      its z-loss equal ours; ``router_aux_loss_coef`` and ``router_z_loss_coef``
      (0.001 each) map to ``load_balance_loss_coeff`` and ``router_z_loss_coeff``.

    Differences: Hugging Face applies ``expert_capacity`` per sequence of a
    ``[B, S, E]`` batch; we apply it per call (route each sequence separately, or pass
    ``[S, E]``, to match). Hugging Face's model passes the capacity-masked argmax to the
    loss, so dropped tokens count as routed to expert 0; ``peer_load_balance_loss``
    follows the loss function (pre-drop choices), as the vectors do.
    ``router_jitter_noise`` (Hugging Face default 0.01, on the router input) is refused
    unless 0.
    """
    return preset("switch", num_experts, top_k, **overrides)


def tutel(num_experts: int, top_k: Optional[int] = None, **overrides: Any) -> RouterConfig:
    """Tutel's ``moe_layer.MOELayer`` routing: ``fast_dispatch.extract_critical`` with
    ``losses.gshard_loss`` (microsoft/tutel, commit 82af7aa).

    Behaviour set:

    - **Score function and noise**: softmax over all E of the logits (``MOELayer.forward``,
      ``routing()``); in training with ``gate_noise > 0`` (default 0) the logits get
      ``gate_noise * N(0, 1) / E`` first (``noise_std = gate_noise / E``), and the
      noisy scores make the selection, the weights and the loss, as in Tutel.
    - **Selection and weights**: top-k of the scores (``torch.topk``; we break ties to
      the lower expert index); the gates are the chosen scores, divided by their sum
      over the k choices **before** capacity (``normalize_gate=True``, default, k > 1
      only: ``normalize_weights``), so a dropped choice stays in the denominator and
      the survivors are not renormalized. Tutel's ``max(sum, eps)`` clamp never binds
      (the sum is at least the top score, >= 1/E).
    - **Capacity**: ``k * floor(cf * ceil(T / E))`` (``capacity_rounding="tutel"``),
      with ``capacity_factor`` (default 1.0, Tutel's ``CAP_FACTOR``) taken as its exact
      decimal (Tutel multiplies Python floats; they differ when the float product lands
      just below an integer). ``cf = 0`` (Tutel: capacity = the largest need) is dropless
      routing; ``cf < 0`` (Tutel: ``min(needed, k * int(-cf * ceil(T/E)))``) keeps
      exactly what the bound ``-cf`` keeps, so it routes with ``capacity_factor = -cf``
      (the decision's ``capacity`` then reports the bound, not the minimum). Then rounded
      up to a multiple of Tutel's alignment (``capacity_alignment``):
      ``sharded_count * a2a_ffn_overlap_degree`` rounded up to ``megablocks_size`` (when
      > 0), then to a multiple of 128 when above 256 (``MOELayer.forward``).
    - **Drop order and slots**: rank-major (``drop_policy="rank"``: every first choice,
      in token order, before any second choice; Tutel's ``cumsum - 1`` per rank offset
      by the earlier ranks' totals before dropping). ``batch_prioritized_routing=True``:
      tokens ordered by their top score, highest first, then rank-major in that order
      (``drop_policy="bpr_rank"``, ``compute_sorted_location``); we break ties by token
      order (Tutel's ``argsort`` leaves them open) and compare the scores in float32.
    - **Loss normalization**: ``gshard_loss`` is ``E * sum_e f1_e P_e`` over the first
      choices (``peer_load_balance_loss``, balanced value 1); ``load_balance_loss``
      stays ours (all k choices). No z-loss; ``load_balance_loss_coeff`` keeps our
      default (Tutel returns ``l_aux`` for the caller to weigh).

    Differences, documented rather than faked:

    - ``gate_noise`` draws from our counter-based RNG, not torch's: the same
      distribution, other draws. Tutel's noise is off in evaluation, as ours.
    - ``is_gshard_loss=False`` (``load_importance_loss``) is refused.
    - With fewer than k eligible experts (``-inf`` logits) Tutel routes the extra
      choices with gate 0 and they take capacity; ours are unrouted fillers.
    - ``cf <= 0`` with ``batch_prioritized_routing``: Tutel reads the capacity from the
      last row of the un-sorted locations, which then underestimates the need
      (anchors.md 4.4); we route dropless (``cf = 0``) or by the bound (``cf < 0``).
    - Tutel resets ``megablocks_size`` to 0 with one local expert, with gradients
      enabled or with several workers; pass 0 then. ``inequivalent_tokens`` (T taken
      as the maximum over workers) is not modelled: route the batch you have.

    Tutel is not installable here (CUDA/C++ extensions); ``tests/test_peer_presets.py``
    checks this preset against a NumPy transcription of the functions above.
    """
    return preset("tutel", num_experts, top_k, **overrides)


def fairseq(num_experts: int, top_k: Optional[int] = None, **overrides: Any) -> RouterConfig:
    """fairseq's MoE gates, ``fairseq/modules/moe/top1gate.py`` ``top1gating`` (k = 1)
    and ``top2gate.py`` ``top2gating`` (k = 2) (branch ``moe``, commit ebea007).

    Behaviour set:

    - **Score function**: softmax over all E; the first expert is the argmax of the
      probabilities, the second (top-2) the argmax of the logits without the first
      (ties to the lower index, as ``torch.argmax``): ``second_expert_policy='all'``.
    - **Capacity**: training: top-1 ``floor(cf * ceil(T / E))`` (``capacity_factor``,
      default 1.0, exact decimal), top-2 ``2 * ceil(T / E)`` whatever the factor
      (``capacity_rounding="fairseq"``). Evaluation: ``ceil(fraction * T)`` with
      ``moe_eval_capacity_token_fraction`` (default 0.25; <= 0 means the training
      formula) -> ``eval_capacity_token_fraction``, exact on the decimal.
    - **Drop order and slots**: top-1 in token order; top-2 rank-major (all first
      choices before the second ones, ``drop_policy="rank"``);
      ``batch_prioritized_routing=True`` (top-2 only) orders tokens by their top
      probability first (``drop_policy="bpr_rank"``, ties by token order, float32).
    - **Weights**: top-1 the raw probability. Top-2 with
      ``normalize_gate_prob_before_dropping=False`` (default): the survivors'
      probabilities renormalized to sum 1 after drops (``renormalize_after_drop``);
      with True: ``g_j / (g1 + g2)`` before capacity (``normalize_weights``).
    - **Loss normalization**: ``l_aux = E^2 * mean_e(me * ce)`` = ``E * sum_e f1_e P_e``
      over first choices before drops (``peer_load_balance_loss``, balanced value 1).
      No z-loss; ``load_balance_loss_coeff`` keeps our default.

    Differences, documented rather than faked:

    - ``second_expert_policy='sampling'`` (fairseq's default: Gumbel noise on the
      logits choosing the second expert, in evaluation too) and ``'random'`` (keep the
      second expert with probability ``min(1, 2 * g2)``) draw from torch's RNG and act
      on the second choice only, which our noise (every logit, training only) cannot
      express: they are refused.
    - Padding (``token_mask``): fairseq removes padding tokens from the masks (they
      take no capacity, as ours), but its capacity ``ceil(T/E)`` and the means of
      ``l_aux`` count every token, padding included; ours count active tokens, so
      with padding the capacity and ``peer_load_balance_loss`` differ.
    - ``use_fp32`` / ``moe_gating_use_fp32`` is accepted: we score in float64 always.
    - With Tutel installed, fairseq hands the locations to Tutel's kernels; the kept
      assignments are the same.

    fairseq's MoE branch is not installable here (old torch); ``tests/test_peer_presets.py``
    checks this preset against a NumPy transcription of ``top1gating``/``top2gating``.
    """
    return preset("fairseq", num_experts, top_k, **overrides)


def expert_choice(num_experts: int, top_k: Optional[int] = None, **overrides: Any) -> RouterConfig:
    """flaxformer's ``ExpertsChooseMaskedRouter`` (expert-choice routing, Zhou et al. 2022,
    "Mixture-of-Experts with Expert Choice Routing") for one group of tokens.

    Behaviour set:

    - **Score function and selection**: ``routing="expert_choice"``: a float64 softmax over all E; every
      expert takes the C tokens with the highest probability for it (slots in
      descending probability, ties to the lower token, as ``jax.lax.top_k``); the
      combine weight is that probability. A token gets 0..E experts. No drop order applies:
      an expert never overflows.
    - **Capacity**: ``C = max(int(round(cf * T / E)), min_expert_capacity)`` with
      Python's banker's ``round`` computed exactly on the decimal factor and no k
      factor (``capacity_rounding="flaxformer"``); ``train_capacity_factor`` and
      ``eval_capacity_factor`` (default 1.0 each) map to ``capacity_factor`` and
      ``eval_capacity_factor``, ``min_expert_capacity`` (default 4) to ``min_capacity``.
    - **Loss normalization**: flaxformer's expert-choice router returns an auxiliary loss of 0:
      ``load_balance_loss_coeff`` is 0 (``load_balance_loss`` is still reported, from the
      real counts); ``router_z_loss_factor`` (default 0.0) maps to ``router_z_loss_coeff``.
    - ``jitter_noise`` (on the router input) is refused unless 0.

    Groups: flaxformer splits a batch into groups (``num_groups``, about 4096 tokens
    each in its gin configs) and routes every group on its own. This preset routes one
    group: pass one group's tokens per call. ``expert_choice_cap=`` adds our EC-CAP
    (at most that many experts per token), which flaxformer does not have.

    Not causal: a token's experts depend on the other tokens of the group, later ones
    included; flaxformer's docstring warns that it must not be used in decoders.

    Differences: flaxformer computes the softmax in float32, we in float64, so tokens
    whose float32 probabilities tie can be ordered differently; flaxformer treats all-zero
    input rows as padding with ``ignore_padding_tokens``, we use ``token_mask``.
    """
    return preset("expert_choice", num_experts, top_k, **overrides)


def base(num_experts: int, top_k: Optional[int] = None, **overrides: Any) -> RouterConfig:
    """fairseq's BASE layer (``fairseq/modules/base_layer.py`` with
    ``clib/libbase/balanced_assignment.cpp``; Lewis et al. 2021, "BASE Layers").

    Behaviour set:

    - **Training assignment**: ``routing="balanced"``, ``balanced_solver="fairseq_auction"``:
      fairseq's auction on the logits (``x . centroid_e``), reproduced step for step in
      the logits' precision: ``eps = max(1e-4, (max - min) / 50)``, bids
      ``top_j - top_{jpw+1} + eps``, 100 rounds that keep the winners' bids, then its
      approximation; non-finite logits replaced by the smallest finite one.
      ``balanced_solver="exact"`` gives the optimum of the same problem.
    - **Capacity**: none applies; every expert gets exactly ``T_active / E`` tokens in
      training (T_active must divide by E), and evaluation is greedy top-1 without
      capacity (``greedy_assignment``). No drop order applies: nothing is dropped; slots
      are in token order within an expert.
    - **Score function**: ``sigmoid``: the weight is ``sigmoid(logit)`` of the assigned
      expert, BASE's ``alpha``; the layer's output is ``alpha * expert(x) + (1 - alpha) * x``,
      the residual part outside the router.
    - **Loss normalization**: BASE has no auxiliary loss: both coefficients are 0 and
      ``peer`` is None.

    Differences: ``torch.topk`` leaves the order of equal values unspecified; here
    the lower token index ranks first. ``base_shuffle`` (a random permutation of
    the tokens across workers before routing) is refused unless False. E is
    fairseq's number of data-parallel workers (``num_workers``).
    The C++ extension cannot be built here: the tests check this preset against a
    NumPy transcription of the C++ algorithm (``tests/balanced_reference.py``).
    """
    return preset("base", num_experts, top_k, **overrides)


def peer_load_balance_loss(decision: RoutingDecision, config_or_preset_name: Union[RouterConfig, str], *,
                           logits: Any = None, token_mask: Any = None) -> float:
    """The load-balance loss of ``decision`` as the framework computes it (coefficient 1).

    Parameters
    ----------
    decision : RoutingDecision
        A routing result (its ``expert_prob_mean`` is ``P_e``).
    config_or_preset_name : RouterConfig or str
        A preset's configuration (its ``peer``), a preset name (``"deepspeed"`` picks
        the gate by the decision's k) or a ``RouterConfig.peer`` value such as
        ``"deepspeed_top2"``.
    logits : array_like [T, E] or [B, S, E], optional
        Megatron-Core only: the logits as routed. Megatron counts ``f_e`` with a
        plain top-k that ignores the expert bias and groups; the core counts it
        from these logits when given. Without them: the plain counts the decision
        kept (a decision routed with a Megatron preset under a bias or groups has
        them, from logits or hidden states alike), else its own pre-drop counts
        (exact when there was no bias and no group limit).
    token_mask : array_like of bool, optional
        Megatron-Core with ``logits``: the mask the decision was routed with.

    Returns
    -------
    float
        - Hugging Face Mixtral / Qwen-MoE: ``k * load_balance_loss`` (``E * sum_e f_e
          P_e`` with ``f_e`` summing to k).
        - DeepSpeed top-1 / top-2: ``E * sum_e f1_e P_e`` with ``f1_e`` the fraction of
          tokens whose *first* choice is e (before drops).
        - DeepSpeed top-k, Switch, DeepSeek-V3: ``load_balance_loss`` (same
          normalization).
        - Megatron-Core: ``E / (k*T) * sum_e n_e P_e`` with ``n_e`` counted by a plain
          top-k (no bias, no groups).

    Raises
    ------
    ConfigError
        An unknown peer name, or a configuration without a peer.
    ConfigTypeError
        ``config_or_preset_name`` is neither a RouterConfig nor a string.
    InputTypeError
        ``decision`` is not a RoutingDecision, or ``logits`` not a real array.
    InputError
        ``logits`` do not match the decision (last dimension E, batch shape).

    Examples
    --------
    >>> import numpy as np, moe_router as mr
    >>> x = np.random.default_rng(0).normal(size=(64, 8))
    >>> dec = mr.route_logits(x, mr.preset("mixtral", 8, 2))
    >>> bool(np.isclose(dec.peer_load_balance_loss, 2 * dec.load_balance_loss))
    True
    """
    rows = batch_shape = mask = None
    if logits is not None and isinstance(decision, RoutingDecision):
        rows, batch_shape, mask = _inputs.rows_and_mask(logits, "logits", decision.num_experts, "num_experts",
                                                        token_mask, kinds=_inputs.LOGITS_KINDS)
    return _core.peer_load_balance_loss(decision, config_or_preset_name, rows, batch_shape, mask)
