//! `plan_placement`: the core's placement advice (DeepSeek EPLB) as a Python
//! function returning an `ExpertPlacement` that carries its expected loads.

use moe_router_core::{self as core, ArrayArg, PlacementRequest};
use numpy::{PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::errors::{to_py, unborrowable, unreadable, wrong_type};
use crate::exchange::{Advice, PyExpertPlacement};
use crate::plan::as_numpy;

const LOAD_ARRAY: &str = "a float or integer array of shape [E] or [layers, E]";

/// Run `f` on `expert_load` read as C-contiguous float64 (integer and other
/// float dtypes converted once; bool and other kinds refused with a `TypeError`).
pub fn with_load<R>(expert_load: &Bound<'_, PyAny>, f: impl FnOnce(ArrayArg<'_, f64>) -> R) -> PyResult<R> {
    let array = as_numpy(expert_load, "expert_load")?;
    let kind: String = array.getattr("dtype")?.getattr("kind")?.extract()?;
    if !matches!(kind.as_str(), "i" | "u" | "f") {
        return Err(wrong_type("expert_load", LOAD_ARRAY, &array));
    }
    let numpy = array.py().import("numpy")?;
    let typed = numpy.call_method1("ascontiguousarray", (array, "float64"))?;
    let view = typed.cast::<PyArrayDyn<f64>>()?.try_readonly().map_err(|e| unborrowable("expert_load", e))?;
    let data = view.as_slice().map_err(|e| unreadable("expert_load", e))?;
    Ok(f(ArrayArg { name: "expert_load", data, shape: view.shape() }))
}

/// A count argument: an integer >= 0 (Python or NumPy; not a bool); 0 and the
/// ranges are the core's to refuse. Anything else is a `ConfigError` naming it.
fn count(name: &str, value: &Bound<'_, PyAny>) -> PyResult<usize> {
    crate::args::count(value, name, 0, crate::errors::Family::Config)
}

/// An optional count (None stays None).
fn maybe_count(name: &str, value: Option<&Bound<'_, PyAny>>) -> PyResult<Option<usize>> {
    value.filter(|v| !v.is_none()).map(|v| count(name, v)).transpose()
}

/// Plan an expert placement from per-expert loads, as DeepSeek's EPLB does.
///
/// Minimizes the expected load of the busiest rank: replicate the hot
/// experts, then pack the physical experts (copies) onto the ranks, an equal
/// number per rank, heaviest first. The algorithm is DeepSeek's
/// expert-parallel load balancer (github.com/deepseek-ai/EPLB, ``eplb.py``:
/// ``replicate_experts``, ``balanced_packing``,
/// ``rebalance_experts_hierarchical``), computed in the Rust core:
///
/// 1. Nodes (``num_nodes > 1``, the hierarchical policy): the ``num_groups``
///    contiguous expert groups are packed onto the nodes, ``G/N`` per node,
///    by step 3's rule on the group loads; then steps 2-3 run inside each
///    node with its ``E/N`` experts, ``P/N`` slots and ``R/N`` ranks
///    (ranks ``[n*R/N, (n+1)*R/N)`` form node n). Copies never leave the node.
/// 2. Replicas: one copy per expert; each of the ``P - E`` further slots goes
///    to the expert with the highest load per copy, ``load / copies`` (ties
///    to the lower expert id), among those with fewer copies than the node
///    has ranks.
/// 3. Packing: copies in order of ``load / copies``, highest first (ties:
///    lower expert id), each to the lightest rank that has a free slot and
///    does not hold that expert (ties: lower rank). If every rank with a free
///    slot holds it, the copy goes to the lightest rank without it, and that
///    rank's lightest copy of an expert the lightest free rank lacks moves to
///    the free rank (ties: lower expert id). A rank never holds two copies of
///    one expert (EPLB itself does not ensure this).
///
/// Rank r holds physical slots ``[r*P/R, (r+1)*P/R)``, its experts in
/// ascending order (EPLB's ``phy2log``: the placement's ``physical``).
/// A copy serves ``1/copies`` of its expert's load, since
/// ``expert_parallel_forward`` sends a token to copy ``token % copies``.
///
/// Parameters
/// ----------
/// expert_load : array of float or int, shape [E] or [layers, E]
///     Per-expert load (tokens or assignments routed to each expert, e.g.
///     ``RoutingDecision.tokens_per_expert`` or
///     ``LoadBalancer.expert_loads``); finite and >= 0; converted to float64.
///     A ``[layers, E]`` load is summed over the layers (in layer order) and
///     one placement is planned for that sum; for one placement per layer
///     (EPLB's per-layer ``phy2log``), call this once per layer.
/// num_ranks : int
///     R, the ranks (processes) of the expert-parallel group, >= 1.
/// num_replicas : int, optional
///     P, the physical expert slots in total (EPLB's ``num_replicas``): at
///     least E, a multiple of R, and at most ``R * E / num_nodes`` (a rank holds
///     at most one copy of an expert) and 2**24. Default E: no replicas
///     (then E must be a multiple of R).
/// num_nodes : int, default 1
///     N, dividing R. 1 plans globally; N > 1 plans hierarchically (step 1).
/// num_groups : int, optional
///     G, the expert groups kept whole on one node when ``num_nodes > 1``
///     (the groups of group-limited routing, ``RouterConfig.num_groups``):
///     divides E and is a multiple of N. Default E (each expert its own
///     group). Unused when ``num_nodes == 1``, but still checked.
///
/// Returns
/// -------
/// ExpertPlacement
///     With the planning figures set: ``planned_load`` [E],
///     ``rank_load_after`` and ``rank_load_before`` [R] (expected per-rank
///     loads in the unit of ``expert_load``; before = the contiguous placement
///     without replicas, None unless E is a multiple of R), and
///     ``imbalance_after``/``imbalance_before``, their ``max / mean``.
///
/// Raises
/// ------
/// InputError
///     ``expert_load`` not [E] or [layers, E] with E, layers >= 1, a
///     negative, NaN or infinite load (the message names the first one), or
///     loads whose total overflows float64.
/// ConfigError
///     Naming ``num_ranks`` (not an integer >= 1; so for every count), ``num_replicas`` (< E, not a multiple of R,
///     above ``R * E / N`` or 2**24), ``num_nodes`` (< 1, not dividing R, or
///     not dividing E when ``num_groups`` is None) or ``num_groups`` (not
///     dividing E, or not a multiple of N when N > 1; EPLB would fall back to
///     the global policy there, this refuses: pass ``num_nodes=1``).
/// TypeError
///     A non-numeric ``expert_load``.
///
/// Notes
/// -----
/// Greedy packing does not always beat the contiguous layout: it is only
/// guaranteed not to be worse when each rank holds at most two experts and
/// there are no replicas (then it is the optimal pairing, heaviest with
/// lightest). Compare ``imbalance_after`` with ``imbalance_before``.
///
/// Examples
/// --------
/// >>> import moe_router as mr
/// >>> p = mr.plan_placement([90, 10, 10, 10, 40, 40, 0, 0], num_ranks=4, num_replicas=12)
/// >>> p.expert_ranks[0], round(p.imbalance_before, 3), round(p.imbalance_after, 3)
/// ([0, 1, 2], 2.0, 1.0)
#[pyfunction]
#[pyo3(
    signature = (expert_load, num_ranks, num_replicas=None, num_nodes=None, num_groups=None),
    text_signature = "(expert_load, num_ranks, num_replicas=None, num_nodes=1, num_groups=None)"
)]
pub fn plan_placement(
    py: Python<'_>,
    expert_load: &Bound<'_, PyAny>,
    num_ranks: &Bound<'_, PyAny>,
    num_replicas: Option<&Bound<'_, PyAny>>,
    num_nodes: Option<&Bound<'_, PyAny>>,
    num_groups: Option<&Bound<'_, PyAny>>,
) -> PyResult<PyExpertPlacement> {
    let request = PlacementRequest {
        num_ranks: count("num_ranks", num_ranks)?,
        num_replicas: maybe_count("num_replicas", num_replicas)?,
        num_nodes: maybe_count("num_nodes", num_nodes)?.unwrap_or(1),
        num_groups: maybe_count("num_groups", num_groups)?,
    };
    let plan = with_load(expert_load, |load| py.detach(|| core::plan_placement(load, &request)))?.map_err(to_py)?;
    let advice = Advice {
        expert_load: plan.expert_load,
        rank_load: plan.rank_load,
        contiguous_rank_load: plan.contiguous_rank_load,
    };
    Ok(PyExpertPlacement { placement: plan.placement, advice: Some(advice) })
}
