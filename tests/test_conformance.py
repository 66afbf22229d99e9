"""Conformance of the compatibility presets with the peers' own outputs.

Every variant of every vector file in ``../shared/peers/vectors`` and in
``tests/data/saturation`` (Megatron-Core, DeepSpeed and Hugging Face routers run on
fixed logits, the latter large enough for float32 scores to saturate; format in
``../shared/peers/README.md``) is mapped to a preset plus overrides, written
with the peer's own parameter names, and routed by moe_router:

- no ties (``topk_tie_tokens == 0`` and ``capacity_tie_experts == 0`` in the
  variant's ``meta``, and no exact float32 tie found below): the preset must
  reproduce the peer exactly:
  the kept (token, expert) pairs, DeepSpeed's slots, the capacity,
  ``tokens_per_expert`` and the pre-drop counts, the weights (1e-5 relative,
  1e-7 absolute) and the losses (1e-5 relative);
- ties (the peer's answer depends on how ``torch.topk`` broke them: counted in the
  variant's ``meta``, or found here by exact equality of the peer's float32 selection
  values, ``saturation.py``): the invariants hold (kept within routed; per expert,
  kept = min(routed, capacity), or under a ``probs`` drop at least the routed
  assignments of positive float32 priority, since those of priority exactly 0 tie
  with unrouted tokens) and the peer's choices agree with ours wherever no tie is
  involved;
- skipped, with the reason: RNG-dependent variants (DeepSpeed random token
  selection), variants a peer refused (``status: "error: ..."``; what we do
  instead is checked), and behaviours the core does not have yet.

The counts are printed in the terminal summary (``conftest_conformance.py``).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest

import moe_router as mr
from moe_router import presets
import saturation
from conftest import SATURATION_DIR, VECTORS_DIR, shared_missing

# The tally plugin (terminal summary of the counts); imported by pytest, then used below.
pytest_plugins = ["conftest_conformance"]


def _tally():
    import conftest_conformance

    return conftest_conformance


RTOL, ATOL = 1e-5, 1e-7
LOSS_RTOL = 1e-5

# ---------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------
def _vector_files() -> Dict[str, Path]:
    """case -> vector file: the handed vectors (if present) and this repository's saturation vectors."""
    files = sorted(VECTORS_DIR.glob("*.npz")) if VECTORS_DIR.is_dir() else []
    return {path.stem: path for path in files + sorted(SATURATION_DIR.glob("*.npz"))}


VECTOR_FILES = _vector_files()


def _variant_list() -> List[Tuple[str, str]]:
    out: List[Tuple[str, str]] = []
    for case, path in VECTOR_FILES.items():
        with np.load(path) as z:
            variants = json.loads(str(z["config"]))["variants"]
        out.extend((case, vid) for vid in sorted(variants))
    return out


VARIANTS = _variant_list()


@functools.lru_cache(maxsize=None)
def load_case(case: str) -> Tuple[np.ndarray, Dict[str, Any], Dict[str, np.ndarray]]:
    """(logits, config JSON, every array of the file) of one vector file."""
    with np.load(VECTOR_FILES[case]) as z:
        arrays = {key: z[key] for key in z.files}
    config = json.loads(str(arrays.pop("config")))
    return arrays.pop("logits"), config, arrays


def peer_arrays(arrays: Dict[str, np.ndarray], vid: str) -> Dict[str, np.ndarray]:
    prefix = vid + "/"
    return {key[len(prefix):]: value for key, value in arrays.items() if key.startswith(prefix)}


# ---------------------------------------------------------------------------
# variant -> preset
# ---------------------------------------------------------------------------
class Skip(Exception):
    """The variant is skipped for the stated reason."""


def config_for(peer: str, params: Dict[str, Any], E: int) -> mr.RouterConfig:
    """The preset and overrides that should reproduce ``peer`` called with ``params``.

    The peer's parameter names are passed through unchanged (the presets accept them).
    """
    p = dict(params)
    if peer == "megatron":
        return mr.preset("megatron", E, p.pop("topk"), **p)
    if peer == "deepspeed":
        p.pop("rts_seed", None)
        if p.get("use_rts"):
            raise Skip("rng-dependent: DeepSpeed random token selection (use_rts) keeps tokens by torch's RNG")
        if p.get("top2_2nd_expert_sampling"):
            raise Skip("rng-dependent: DeepSpeed top-2 second-expert Gumbel sampling")
        gate = p.pop("gate")
        k = p.pop("k", {"top1": 1, "top2": 2}.get(gate))
        return mr.preset("deepspeed", E, k=k, gate=gate, **p)
    if peer == "hf-mixtral":
        return mr.preset("mixtral", E, num_experts_per_tok=p["k"])
    if peer in ("hf-qwen2moe", "hf-qwen3moe"):
        return mr.preset("qwen_moe", E, num_experts_per_tok=p["k"], norm_topk_prob=p["norm_topk_prob"])
    if peer == "hf-dsv3":
        return mr.preset("deepseek_v3", E, num_experts_per_tok=p["k"], n_group=p["n_group"],
                         topk_group=p["topk_group"], routed_scaling_factor=p["routed_scaling_factor"],
                         norm_topk_prob=p["norm_topk_prob"],
                         e_score_correction_bias=p["e_score_correction_bias"])
    if peer == "hf-switch":
        return mr.preset("switch", E, expert_capacity=p["expert_capacity"])
    raise AssertionError(f"no preset mapping for peer {peer!r}")


# ---------------------------------------------------------------------------
# the peer's selection values (to find the tokens whose choice is a tie)
# ---------------------------------------------------------------------------
def near_tie_rows(values: np.ndarray, k: int) -> np.ndarray:
    """bool[T]: the k-th and (k+1)-th largest values of a row are equal or nearly so."""
    T, E = values.shape
    if k <= 0 or k >= E:
        return np.zeros(T, bool)
    s = -np.sort(-values.astype(np.float64), axis=1)
    a, b = s[:, k - 1], s[:, k]
    return (a == b) | np.isclose(a, b, rtol=1e-6, atol=0.0)


def tie_tokens(peer: str, params: Dict[str, Any], logits: np.ndarray,
               rows: Callable[[np.ndarray, int], np.ndarray] = near_tie_rows) -> np.ndarray:
    """bool[T]: tokens whose peer choice may depend on a tie, by ``rows`` on the peer's float32
    selection values (``near_tie_rows``: conservative, near ties count; ``saturation.boundary_ties``:
    exact)."""
    T, E = logits.shape
    v = saturation.selection_values(peer, params, logits)
    if v is None:
        return np.zeros(T, bool)
    groups: Optional[int] = None
    per_group = group_topk = 0
    if peer == "megatron":
        k = params["topk"]
        if params.get("group_topk"):
            groups, group_topk = params["num_groups"], params["group_topk"]
            per_group = k // group_topk
    elif peer == "hf-dsv3":
        k = params["k"]
        groups, group_topk, per_group = params["n_group"], params["topk_group"], 2
    else:
        k = params.get("k", 1)
    if groups is None:
        return rows(v, k)
    g = v.reshape(T, groups, E // groups)
    gscore = (-np.sort(-g, axis=2))[:, :, :per_group].sum(axis=2, dtype=np.float32)
    ambiguous = rows(gscore, group_topk)
    best = np.argsort(-gscore, axis=1, kind="stable")[:, :group_topk]
    allowed = np.zeros((T, groups), bool)
    np.put_along_axis(allowed, best, True, axis=1)
    masked = np.where(np.repeat(allowed, E // groups, axis=1), v, -np.inf)
    return ambiguous | rows(masked, k)


#: Peers whose outputs include their top-k in their own order (``topk_idx``), compared exactly.
ORDERED_TOPK = ("hf-mixtral", "hf-qwen2moe", "hf-qwen3moe")


def saturation_tied(peer: str, params: Dict[str, Any], logits: np.ndarray) -> bool:
    """Whether the peer's float32 selection values tie exactly where the variant's ``meta`` saw none.

    The k chosen are a tie where the k-th and (k+1)-th values are equal; for the routers
    compared by their ``topk_idx`` order, also where two chosen values are equal (torch's
    order among equal values is unspecified).
    """
    if tie_tokens(peer, params, logits, saturation.boundary_ties).any():
        return True
    if peer in ORDERED_TOPK:
        return bool(saturation.order_ties(saturation.softmax32(logits), params["k"]).any())
    return False


def aux_count_values(score_function: str, logits: np.ndarray) -> np.ndarray:
    """The float32 scores Megatron's aux loss counts a plain top-k on
    (``compute_routing_scores_for_aux_loss``)."""
    if score_function == "sigmoid":
        return saturation.normalized_sigmoid32(logits)
    return saturation.softmax32(logits)


# ---------------------------------------------------------------------------
# our decision in the peers' sparse form
# ---------------------------------------------------------------------------
def ours_coo(dec: mr.RoutingDecision) -> Dict[str, np.ndarray]:
    t, j = np.nonzero(dec.kept)
    e = dec.expert_indices[t, j]
    order = np.lexsort((e, t))
    return {"token": t[order], "expert": e[order].astype(np.int64), "weight": dec.expert_weights[t, j][order],
            "slot": dec.expert_slots[t, j][order]}


def routed_pairs(dec: mr.RoutingDecision) -> set:
    T, k = dec.expert_indices.shape
    routed = dec.expert_weights >= 0  # every choice of an active token with a finite logit is routed
    tok = np.repeat(np.arange(T), k).reshape(T, k)
    return set(zip(tok[routed].tolist(), dec.expert_indices[routed].tolist()))


def pairs(token: np.ndarray, expert: np.ndarray) -> List[Tuple[int, int]]:
    return list(zip(np.asarray(token).tolist(), np.asarray(expert).tolist()))


def expert_counts(pair_list: List[Tuple[int, int]], E: int) -> np.ndarray:
    return np.bincount(np.asarray([e for _, e in pair_list], dtype=np.int64), minlength=E)


def close(ours: Any, theirs: Any, what: str, rtol: float = RTOL, atol: float = ATOL) -> None:
    np.testing.assert_allclose(np.asarray(ours, np.float64), np.asarray(theirs, np.float64), rtol=rtol, atol=atol,
                               err_msg=what)


def capacity_of(dec: mr.RoutingDecision) -> Optional[int]:
    return None if dec.dropless else int(dec.capacity)


# ---------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------
def plain_topk_config(cfg: mr.RouterConfig) -> mr.RouterConfig:
    """``cfg`` without bias, groups and capacity: the plain top-k Megatron counts in its loss."""
    return cfg.replace(num_groups=None, group_top_k=None, group_score="max", capacity_factor=None,
                       eval_capacity_factor=None, expert_capacity=None, min_capacity=0, overflow="drop",
                       expert_bias=None, peer=None)


def check_losses(peer: str, cfg: mr.RouterConfig, dec: mr.RoutingDecision, a: Dict[str, np.ndarray],
                 logits: np.ndarray) -> None:
    if peer == "megatron":
        close(dec.router_z_loss, a["z_loss"], "Megatron z_loss", LOSS_RTOL, 0.0)
        plain = mr.route_logits(logits, plain_topk_config(cfg)).pre_drop_tokens_per_expert
        if cfg.num_groups is None and cfg.expert_bias is None:
            assert dec.peer_load_balance_loss == pytest.approx(dec.load_balance_loss, rel=1e-12)
        if near_tie_rows(aux_count_values(cfg.score_function, logits), dec.top_k).any():
            # Megatron's loss counts a plain top-k (no bias, no groups) on the scores; the
            # variant's tie statistics cover the routing used, not that count, so where the
            # plain top-k has ties its count is torch's choice: check only its total.
            assert int(a["aux_tokens_per_expert"].sum()) == int(plain.sum()) == dec.active_tokens * dec.top_k
        else:
            np.testing.assert_array_equal(plain, a["aux_tokens_per_expert"], "Megatron aux_tokens_per_expert")
            close(dec.peer_load_balance_loss, a["aux_loss"], "Megatron aux_loss", LOSS_RTOL, 0.0)
    elif peer == "deepspeed":
        close(dec.peer_load_balance_loss, a["l_aux"], "DeepSpeed l_aux", LOSS_RTOL, 0.0)
    elif peer in ("hf-mixtral", "hf-qwen2moe", "hf-qwen3moe"):
        close(dec.peer_load_balance_loss, a["aux_loss"], "HF load_balancing_loss_func", LOSS_RTOL, 0.0)
        assert dec.peer_load_balance_loss == pytest.approx(dec.top_k * dec.load_balance_loss, rel=1e-12)
    elif peer == "hf-switch":
        close(dec.peer_load_balance_loss, a["aux_loss"], "Switch aux loss", LOSS_RTOL, 0.0)
        close(dec.load_balance_loss, a["aux_loss"], "Switch aux loss (ours)", LOSS_RTOL, 0.0)
        close(dec.router_z_loss, a["z_loss"], "Switch z loss", LOSS_RTOL, 0.0)


def check_counts(peer: str, dec: mr.RoutingDecision, a: Dict[str, np.ndarray]) -> None:
    if peer == "megatron":
        np.testing.assert_array_equal(dec.pre_drop_tokens_per_expert, a["pre_drop_tokens_per_expert"],
                                      "pre-drop tokens per expert")
        cap = int(a["capacity"])
        assert capacity_of(dec) == (None if cap < 0 else cap), ("capacity", capacity_of(dec), cap)
    elif peer == "deepspeed":
        np.testing.assert_array_equal(dec.pre_drop_tokens_per_expert, a["exp_counts"], "exp_counts")
        assert dec.capacity == int(a["capacity"]), ("capacity", dec.capacity, int(a["capacity"]))
    elif peer == "hf-switch":
        assert dec.capacity == int(a["capacity"]), ("capacity", dec.capacity, int(a["capacity"]))
    else:  # Hugging Face top-k routers are dropless
        assert dec.dropless and dec.kept_assignments == dec.total_tokens * dec.top_k


def check_exact(peer: str, params: Dict[str, Any], cfg: mr.RouterConfig, dec: mr.RoutingDecision,
                a: Dict[str, np.ndarray], logits: np.ndarray) -> None:
    T, E = logits.shape
    ours = ours_coo(dec)
    peer_pairs = pairs(a["coo_token"], a["coo_expert"])
    our_pairs = pairs(ours["token"], ours["expert"])
    if peer == "megatron" and params.get("pad_to_capacity"):
        # Megatron pads every expert to C rows with unrouted tokens of weight 0 (a dispatcher
        # matter, not routing): its routed rows must be exactly our kept pairs.
        routed = routed_pairs(dec)
        peer_routed = [i for i, pq in enumerate(peer_pairs) if pq in routed]
        padding = [i for i, pq in enumerate(peer_pairs) if pq not in routed]
        assert [peer_pairs[i] for i in peer_routed] == our_pairs, \
            _pair_diff(our_pairs, [peer_pairs[i] for i in peer_routed])
        close(ours["weight"], a["coo_weight"][peer_routed], "weights")
        assert np.all(a["coo_weight"][padding] == 0), "padding rows must carry weight 0"
        np.testing.assert_array_equal(a["tokens_per_expert"], np.full(E, min(int(a["capacity"]), T)),
                                      "Megatron pads every expert to min(C, T) rows")
    else:
        assert our_pairs == peer_pairs, _pair_diff(our_pairs, peer_pairs)
        close(ours["weight"], a["coo_weight"], "weights")
        np.testing.assert_array_equal(dec.tokens_per_expert, a["tokens_per_expert"], "tokens_per_expert")
    if "coo_slot" in a:
        np.testing.assert_array_equal(ours["slot"], a["coo_slot"], "slots")
    if peer in ("hf-mixtral", "hf-qwen2moe", "hf-qwen3moe"):
        # these routers return their top-k best first, as we do
        np.testing.assert_array_equal(dec.expert_indices, a["topk_idx"], "top-k order")
    if peer == "hf-switch":
        kept_tok = ours["token"]
        close(ours["weight"], a["router_prob_max"][kept_tok], "router_prob_max")
    check_counts(peer, dec, a)
    check_losses(peer, cfg, dec, a, logits)


def _pair_diff(ours: List[Tuple[int, int]], theirs: List[Tuple[int, int]]) -> str:
    a, b = set(ours), set(theirs)
    return (f"kept pairs differ: {len(a)} ours, {len(b)} peer; only ours {sorted(a - b)[:6]}, "
            f"only peer {sorted(b - a)[:6]}")


def probs_drop(peer: str, params: Dict[str, Any]) -> bool:
    """Whether the peer drops by priority (``drop_policy="probs"``) with a capacity."""
    if peer == "megatron":
        return params.get("capacity_factor") is not None and params.get("drop_policy", "probs") == "probs"
    return (peer == "deepspeed" and params["gate"] == "topk" and params.get("drop_tokens", True)
            and params.get("drop_policy", "probs") == "probs")


def peer_kept_range(peer: str, params: Dict[str, Any], dec: mr.RoutingDecision, logits: np.ndarray,
                    routed: np.ndarray, maybe: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per expert, the least and most kept assignments the peer may report: ``min(routed, capacity)``,
    except under a ``probs`` drop where routed assignments of float32 priority exactly 0 tie with the
    unrouted tokens (also 0) and torch may keep either. ``routed`` [E] are the peer's pre-drop
    counts; ``maybe`` bool[T] marks tokens whose choices may differ from ours (ties): only the
    other tokens' positive assignments surely are the peer's too."""
    cap = capacity_of(dec)
    most = routed if cap is None else np.minimum(routed, cap)
    if cap is None or not probs_drop(peer, params):
        return most, most
    zero = saturation.zero_priority(peer, params, logits, dec.expert_indices)
    positive = (dec.expert_weights >= 0) & ~zero & ~maybe[:, None]  # surely the peer's too
    E = logits.shape[1]
    return saturation.kept_bounds(routed, np.bincount(dec.expert_indices[positive], minlength=E), cap, len(logits))


def within(counts: np.ndarray, lo: np.ndarray, hi: np.ndarray, what: str) -> None:
    bad = np.nonzero((counts < lo) | (counts > hi))[0]
    assert bad.size == 0, f"{what}: experts {bad.tolist()} kept {counts[bad].tolist()}, allowed " \
                          f"{lo[bad].tolist()}..{hi[bad].tolist()}"


def check_tied(peer: str, params: Dict[str, Any], topk_tied: bool, cfg: mr.RouterConfig,
               dec: mr.RoutingDecision, a: Dict[str, np.ndarray], logits: np.ndarray) -> None:
    """Invariants where the peer's answer depends on how torch broke a tie (``topk_tied``: of
    the top-k choice itself; otherwise of the capacity selection or the order of the top-k)."""
    T, E = logits.shape
    cap = capacity_of(dec)
    routed = routed_pairs(dec)
    # ours: kept within routed, per expert kept = min(routed, capacity)
    ours = ours_coo(dec)
    our_pairs = pairs(ours["token"], ours["expert"])
    assert set(our_pairs) <= routed
    limit = dec.pre_drop_tokens_per_expert if cap is None else np.minimum(dec.pre_drop_tokens_per_expert, cap)
    np.testing.assert_array_equal(dec.tokens_per_expert, limit, "ours: kept = min(routed, capacity)")

    peer_pairs = pairs(a["coo_token"], a["coo_expert"])
    assert len(set(peer_pairs)) == len(peer_pairs), "peer COO has duplicate pairs"
    pad = peer == "megatron" and params.get("pad_to_capacity")
    if pad:
        pcap = int(a["capacity"])
        np.testing.assert_array_equal(np.bincount(np.asarray(a["coo_expert"], np.int64), minlength=E),
                                      np.full(E, min(pcap, T)), "Megatron pads each expert to C rows")
    peer_count = np.bincount(np.asarray(a["coo_expert"], np.int64), minlength=E)
    if cap is not None and not pad:
        assert np.all(peer_count <= cap), "peer kept more than the capacity"
    peer_pre = a.get("pre_drop_tokens_per_expert", a.get("exp_counts"))

    if not topk_tied:
        # the routed sets agree; only which tied tokens an expert kept is torch's choice
        if peer_pre is not None:
            np.testing.assert_array_equal(dec.pre_drop_tokens_per_expert, peer_pre, "pre-drop counts")
        kept_routed = [pq for pq in peer_pairs if pq in routed]
        if not pad:
            assert len(kept_routed) == len(peer_pairs), "peer kept a pair that is not routed"
        lo, hi = peer_kept_range(peer, params, dec, logits, dec.pre_drop_tokens_per_expert, np.zeros(T, bool))
        within(expert_counts(kept_routed, E), lo, hi, "peer: kept = min(routed, capacity)")
        if pad:
            rest = [i for i, pq in enumerate(peer_pairs) if pq not in routed]
            assert np.all(a["coo_weight"][rest] == 0), "padding rows must carry weight 0"
        # weights of the pairs both kept, where a weight does not depend on the other survivors
        if not cfg.renormalize_after_drop:
            mine = dict(zip(our_pairs, ours["weight"].tolist()))
            both = [i for i, pq in enumerate(peer_pairs) if pq in mine]
            close([mine[peer_pairs[i]] for i in both], a["coo_weight"][both], "weights of common pairs")
        check_counts(peer, dec, a)
        check_losses(peer, cfg, dec, a, logits)
    else:
        # tokens whose choice is not a tie: the peer's experts are among ours
        tied = tie_tokens(peer, params, logits)
        by_token: Dict[int, set] = {}
        for t, e in routed:
            by_token.setdefault(t, set()).add(e)
        bad = [(t, e) for i, (t, e) in enumerate(peer_pairs) if not tied[t] and e not in by_token.get(t, set())
               and not (pad and a["coo_weight"][i] == 0)]  # Megatron padding rows are unrouted
        assert not bad, f"peer routed untied tokens elsewhere: {bad[:6]}"
        # a token's weights depend only on its own routed and kept experts: compare them on
        # untied tokens whose kept sets agree
        mine: Dict[int, Dict[int, float]] = {}
        for (t, e), w in zip(our_pairs, ours["weight"].tolist()):
            mine.setdefault(t, {})[e] = w
        theirs: Dict[int, Dict[int, float]] = {}
        for (t, e), w in zip(peer_pairs, a["coo_weight"].tolist()):
            if (t, e) in routed or not pad:
                theirs.setdefault(t, {})[e] = w
        same = [t for t in theirs if not tied[t] and mine.get(t, {}).keys() == theirs[t].keys()]
        close([mine[t][e] for t in same for e in sorted(mine[t])],
              [theirs[t][e] for t in same for e in sorted(theirs[t])], "weights of untied tokens")
        if peer_pre is not None:
            assert int(np.sum(peer_pre)) == int(dec.pre_drop_tokens_per_expert.sum())
            if cap is not None and not pad:
                lo, hi = peer_kept_range(peer, params, dec, logits, peer_pre, tied)
                within(peer_count, lo, hi, "peer: kept = min(routed, capacity)")
        if cap is None and peer in ("hf-mixtral", "hf-qwen2moe", "hf-qwen3moe", "hf-dsv3"):
            assert len(peer_pairs) == T * dec.top_k


# ---------------------------------------------------------------------------
# peer refusals
# ---------------------------------------------------------------------------
def check_refusal(peer: str, params: Dict[str, Any], status: str, logits: np.ndarray) -> str:
    """What we do where the peer refused; returns the skip reason."""
    T, E = logits.shape
    if peer == "deepspeed" and "min_capacity" in status:
        # DeepSpeed's top-1 asserts T >= min_capacity; we route any T, the capacity is just not binding.
        p = {k: v for k, v in params.items() if k not in ("rts_seed", "use_rts")}
        gate = p.pop("gate")
        dec = mr.route_logits(logits, mr.preset("deepspeed", E, 1, gate=gate, **p), training=True)
        assert dec.capacity == params["min_capacity"] and dec.kept.all()
        return "peer error not reproduced by design: DeepSpeed top1 asserts T >= min_capacity; " \
               "moe_router routes any T (capacity above T is not binding)"
    if peer == "hf-dsv3" and "out of range" in status:
        # HF takes the top-2 inside each group and fails on one-expert groups; our top2_sum of a
        # one-expert group is that expert's score, so routing is well defined.
        cfg = config_for(peer, params, E)
        dec = mr.route_logits(logits, cfg)
        assert dec.kept.all() and np.isfinite(dec.expert_weights).all()
        return "peer error not reproduced by design: HF DeepSeek-V3 fails on one-expert groups; " \
               "moe_router's top2_sum is defined there"
    raise AssertionError(f"unexpected peer refusal {status!r}: decide whether the preset must refuse too")


# ---------------------------------------------------------------------------
# the tests
# ---------------------------------------------------------------------------
def run_variant(case: str, vid: str) -> str:
    """Check one variant; returns its outcome (tally key); raises AssertionError on failure."""
    logits, config, arrays = load_case(case)
    v = config["variants"][vid]
    peer, params, status, meta = v["peer"], v["params"], v["status"], v.get("meta", {})
    E = logits.shape[1]
    if status != "ok":
        return "skipped: " + check_refusal(peer, params, status, logits)
    if any(isinstance(x, str) and "rng-dependent" in x for x in meta.values()):
        return "skipped: rng-dependent: DeepSpeed random token selection (use_rts) keeps tokens by torch's RNG"
    try:
        cfg = config_for(peer, params, E)
    except Skip as exc:
        return f"skipped: {exc}"
    dec = mr.route_logits(logits, cfg, training=True)
    a = peer_arrays(arrays, vid)
    topk_tied = meta.get("topk_tie_tokens", 0) > 0 or tie_tokens(peer, params, logits, saturation.boundary_ties).any()
    if not topk_tied and meta.get("capacity_tie_experts", 0) == 0 and not saturation_tied(peer, params, logits):
        check_exact(peer, params, cfg, dec, a, logits)
        return _tally().EXACT
    check_tied(peer, params, topk_tied, cfg, dec, a, logits)
    return _tally().TIED


@pytest.mark.parametrize("case,vid", VARIANTS or [(None, None)], ids=[f"{c}:{v}" for c, v in VARIANTS] or ["no-vectors"])
def test_peer_variant(case: str, vid: str) -> None:
    if case is None:
        shared_missing("peer vectors", VECTORS_DIR)
    tally = _tally()
    key = f"{case}:{vid}"
    try:
        outcome = run_variant(case, vid)
    except Exception:
        tally.record(key, tally.FAILED)
        raise
    tally.record(key, outcome)
    if outcome.startswith("skipped: "):
        pytest.skip(outcome[len("skipped: "):])


def test_every_variant_accounted_for() -> None:
    """Runs last in this module: every variant ran and none failed (counts in the terminal summary)."""
    tally = _tally()
    if not VARIANTS:
        shared_missing("peer vectors", VECTORS_DIR)
    ran = {key for key in tally.OUTCOMES if key.split(":", 1)[0] in {c for c, _ in VARIANTS}}
    if len(ran) < len(VARIANTS):
        pytest.skip(f"only {len(ran)} of {len(VARIANTS)} variants ran in this session (selection)")
    failed = sorted(k for k, o in tally.OUTCOMES.items() if o == tally.FAILED)
    assert not failed, "\n".join(tally.summary_lines() + failed[:20])
    assert tally.COUNTS[tally.EXACT] > 0
    if not VECTORS_DIR.is_dir():
        shared_missing("peer vectors", VECTORS_DIR)  # only this repository's vectors ran
