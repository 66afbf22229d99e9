//! Expert parallelism in the bindings: `ExpertPlacement`, the all-to-all
//! plans of one rank (`AllToAllPlan`, `ReceivePlan`), and `gather_rows`, the
//! row gather every step of the exchange uses.

use half::f16;
use moe_router_core::{self as core, ExpertPlacement, Payload, ReceivePlan, SendPlan};
use numpy::{Element, PyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::args::count;
use crate::arrays;
use crate::errors::{to_py, wrong_type, Family};
use crate::plan::{as_numpy, int_array, output, payload, run_move, PAYLOAD_ARRAY};

/// An int64 copy of an integer array-like (`TypeError` naming `name` otherwise).
fn int_vector(x: &Bound<'_, PyAny>, name: &str) -> PyResult<Vec<i64>> {
    int_array(x, name).map(|(values, _)| values)
}

/// Which ranks (processes) hold each expert, for expert parallelism.
///
/// Parameters
/// ----------
/// num_experts : int
///     E (logical experts).
/// num_ranks : int
///     R (processes).
/// mapping : array of int, shape [E], optional
///     The rank of each expert. Default: contiguous, rank r holds experts
///     ``[r*E/R, (r+1)*E/R)`` (Megatron-Core's layout; E must be a multiple of R).
/// replicas : dict {expert: ranks} or list of E lists of ranks, optional
///     Further ranks holding a copy of a (hot) expert. A token's assignment
///     to a replicated expert goes to copy ``token % copies`` (primary first,
///     then the replicas in the order given), as vLLM picks replicas.
///
/// Attributes
/// ----------
/// num_experts, num_ranks : int
/// expert_ranks : list of list of int
///     Per expert, the ranks holding it (primary first).
/// replica_counts : numpy.ndarray, int64, shape [E]
///     Copies of each expert.
/// max_local_experts : int
///     The most experts one rank holds.
/// physical : numpy.ndarray, int64, shape [P], or None
///     DeepSeek EPLB's ``phy2log`` for this placement: rank r's experts,
///     ascending, in slots ``[r*P/R, (r+1)*P/R)``; None when the ranks hold
///     different numbers of experts. ``from_physical(physical, R)`` rebuilds
///     the placement when every expert's copies are listed in ascending rank
///     order (as for placements from :func:`plan_placement` and
///     ``from_physical``): that order decides which copy ``token % copies`` picks.
/// planned_load : numpy.ndarray, float64, shape [E], or None
///     The per-expert load :func:`plan_placement` planned on (summed over
///     layers); None for a placement made otherwise. So are the next four.
/// rank_load_after : numpy.ndarray, float64, shape [R], or None
///     Each rank's expected load under this placement, ``rank_loads(planned_load)``.
/// rank_load_before : numpy.ndarray, float64, shape [R], or None
///     The same under the contiguous placement (no replicas); None also when E
///     is not a multiple of R.
/// imbalance_after, imbalance_before : float or None
///     ``max / mean`` of those rank loads (1.0 = perfectly balanced; 1.0 when
///     the load is all zero).
///
/// Notes
/// -----
/// Equality, hashing and pickling see the layout only: a pickled planned
/// placement comes back without its planning figures.
///
/// Raises
/// ------
/// ConfigError
///     A rank outside ``[0, R)``, a rank holding two copies of one expert, or a
///     contiguous placement with E not a multiple of R.
/// InputError
///     ``mapping`` or ``replicas`` of the wrong length.
#[pyclass(frozen, eq, hash, name = "ExpertPlacement", module = "moe_router")]
#[derive(Clone)]
pub struct PyExpertPlacement {
    pub placement: ExpertPlacement,
    /// The expected loads, for a placement made by `plan_placement`.
    pub advice: Option<Advice>,
}

/// What `plan_placement` expects of the placement it made.
#[derive(Clone)]
pub struct Advice {
    /// `[E]`: the load planned on.
    pub expert_load: Vec<f64>,
    /// `[R]`: each rank's expected load under the plan.
    pub rank_load: Vec<f64>,
    /// `[R]`: the same under the contiguous placement, when E is a multiple of R.
    pub contiguous_rank_load: Option<Vec<f64>>,
}

/// Placements are equal when they put the same experts on the same ranks
/// (the planning figures of `plan_placement` do not count).
impl PartialEq for PyExpertPlacement {
    fn eq(&self, other: &Self) -> bool {
        self.placement == other.placement
    }
}
impl Eq for PyExpertPlacement {}
impl std::hash::Hash for PyExpertPlacement {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.placement.hash(state);
    }
}

impl From<ExpertPlacement> for PyExpertPlacement {
    fn from(placement: ExpertPlacement) -> Self {
        PyExpertPlacement { placement, advice: None }
    }
}

#[pymethods]
impl PyExpertPlacement {
    #[new]
    #[pyo3(signature = (num_experts, num_ranks, mapping=None, replicas=None))]
    fn new(
        num_experts: &Bound<'_, PyAny>,
        num_ranks: &Bound<'_, PyAny>,
        mapping: Option<&Bound<'_, PyAny>>,
        replicas: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let num_experts = count(num_experts, "num_experts", 1, Family::Config)?;
        let num_ranks = count(num_ranks, "num_ranks", 1, Family::Config)?;
        let placement = match (mapping, replicas) {
            (None, None) => ExpertPlacement::contiguous(num_experts, num_ranks).map_err(to_py)?,
            _ => {
                let mapping = match mapping {
                    Some(m) => int_vector(m, "mapping")?,
                    None => ExpertPlacement::contiguous(num_experts, num_ranks)
                        .map_err(to_py)
                        .map(|p| (0..num_experts).map(|e| p.hosts(e)[0] as i64).collect())?,
                };
                let lists = match replicas {
                    None => Vec::new(),
                    Some(r) => replica_lists(r, num_experts)?,
                };
                ExpertPlacement::new(num_experts, num_ranks, &mapping, &lists).map_err(to_py)?
            }
        };
        Ok(placement.into())
    }

    /// A placement from DeepSeek EPLB's physical layout.
    ///
    /// Parameters
    /// ----------
    /// physical : array of int, shape [P]
    ///     Logical expert of each physical slot (EPLB's ``phy2log`` for one layer);
    ///     rank r holds slots ``[r*P/R, (r+1)*P/R)``; P a multiple of R.
    /// num_ranks : int
    /// num_experts : int, optional
    ///     E; default ``max(physical) + 1``.
    ///
    /// Raises
    /// ------
    /// ConfigError, InputError
    ///     As the constructor; also an expert in no slot.
    #[staticmethod]
    #[pyo3(signature = (physical, num_ranks, num_experts=None))]
    fn from_physical(
        physical: &Bound<'_, PyAny>,
        num_ranks: &Bound<'_, PyAny>,
        num_experts: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let num_ranks = count(num_ranks, "num_ranks", 1, Family::Config)?;
        let num_experts = num_experts.map(|e| count(e, "num_experts", 1, Family::Config)).transpose()?;
        let slots = int_vector(physical, "physical")?;
        let e = num_experts.unwrap_or_else(|| slots.iter().copied().max().map_or(0, |m| (m.max(-1) + 1) as usize));
        Ok(ExpertPlacement::from_physical(e, num_ranks, &slots).map_err(to_py)?.into())
    }

    #[getter]
    fn num_experts(&self) -> usize {
        self.placement.num_experts()
    }
    #[getter]
    fn num_ranks(&self) -> usize {
        self.placement.num_ranks()
    }
    #[getter]
    fn expert_ranks(&self) -> Vec<Vec<usize>> {
        (0..self.placement.num_experts()).map(|e| self.placement.hosts(e).to_vec()).collect()
    }
    #[getter]
    fn replica_counts<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        let counts: Vec<i64> =
            (0..self.placement.num_experts()).map(|e| self.placement.hosts(e).len() as i64).collect();
        arrays::vector(py, counts).into_any()
    }
    #[getter]
    fn max_local_experts(&self) -> usize {
        self.placement.max_local_experts()
    }
    #[getter]
    fn physical<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyAny>> {
        let p = &self.placement;
        let per = p.local_experts(0).len();
        let equal = (0..p.num_ranks()).all(|r| p.local_experts(r).len() == per);
        equal.then(|| {
            let slots = (0..p.num_ranks()).flat_map(|r| p.local_experts(r).iter().map(|&e| e as i64)).collect();
            arrays::vector(py, slots).into_any()
        })
    }
    #[getter]
    fn planned_load<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyAny>> {
        self.advice.as_ref().map(|a| arrays::vector(py, a.expert_load.clone()).into_any())
    }
    #[getter]
    fn rank_load_after<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyAny>> {
        self.advice.as_ref().map(|a| arrays::vector(py, a.rank_load.clone()).into_any())
    }
    #[getter]
    fn rank_load_before<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyAny>> {
        let before = self.advice.as_ref().and_then(|a| a.contiguous_rank_load.clone());
        before.map(|b| arrays::vector(py, b).into_any())
    }
    #[getter]
    fn imbalance_after(&self) -> Option<f64> {
        self.advice.as_ref().map(|a| core::imbalance(&a.rank_load))
    }
    #[getter]
    fn imbalance_before(&self) -> Option<f64> {
        self.advice.as_ref().and_then(|a| a.contiguous_rank_load.as_deref().map(core::imbalance))
    }

    /// Each rank's expected load for a per-expert load.
    ///
    /// A rank's load is the sum, over the experts it holds, of
    /// ``expert_load[e] / copies[e]``: a replicated expert's tokens spread
    /// evenly over its copies (``token % copies`` picks the copy). Its
    /// ``max / mean`` next to the experts' own ``max / mean`` shows whether hot
    /// experts make a rank hot.
    ///
    /// Parameters
    /// ----------
    /// expert_load : array of float or int, shape [E] or [layers, E]
    ///     Loads (e.g. ``RoutingDecision.tokens_per_expert``), finite and >= 0;
    ///     ``[layers, E]`` is summed over the layers.
    ///
    /// Returns
    /// -------
    /// numpy.ndarray, float64, shape [R]
    ///     In the unit of ``expert_load`` (tokens, assignments, ...).
    ///
    /// Raises
    /// ------
    /// InputError
    ///     Another shape or E, or a negative or non-finite load.
    /// TypeError
    ///     A non-numeric ``expert_load``.
    fn rank_loads<'py>(&self, py: Python<'py>, expert_load: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let load = crate::eplb::with_load(expert_load, core::total_load)?.map_err(to_py)?;
        let ranks = self.placement.rank_loads(&load).map_err(to_py)?;
        Ok(arrays::vector(py, ranks).into_any())
    }

    /// The experts rank ``rank`` holds, ascending (its local expert ``l`` is entry ``l``).
    ///
    /// Raises
    /// ------
    /// ConfigError
    ///     ``rank`` outside ``[0, R)``.
    fn local_experts<'py>(&self, py: Python<'py>, rank: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let r = self.rank(count(rank, "rank", 0, Family::Config)?)?;
        let experts: Vec<i64> = self.placement.local_experts(r).iter().map(|&e| e as i64).collect();
        Ok(arrays::vector(py, experts).into_any())
    }

    fn __getnewargs__(&self) -> (usize, usize, Vec<i64>, Vec<Vec<i64>>) {
        let e = self.placement.num_experts();
        let primary = (0..e).map(|x| self.placement.hosts(x)[0] as i64).collect();
        let extra = (0..e).map(|x| self.placement.hosts(x)[1..].iter().map(|&r| r as i64).collect()).collect();
        (e, self.placement.num_ranks(), primary, extra)
    }

    fn __repr__(&self) -> String {
        let copies: usize = (0..self.placement.num_experts()).map(|e| self.placement.hosts(e).len()).sum();
        let planned = match (self.imbalance_before(), self.imbalance_after()) {
            (Some(b), Some(a)) => format!(", imbalance_before={b:.4}, imbalance_after={a:.4}"),
            (None, Some(a)) => format!(", imbalance_after={a:.4}"),
            _ => String::new(),
        };
        format!(
            "ExpertPlacement(num_experts={}, num_ranks={}, copies={copies}, max_local_experts={}{planned})",
            self.placement.num_experts(),
            self.placement.num_ranks(),
            self.placement.max_local_experts()
        )
    }
}

impl PyExpertPlacement {
    fn rank(&self, rank: usize) -> PyResult<usize> {
        if rank < self.placement.num_ranks() {
            Ok(rank)
        } else {
            Err(crate::errors::config_error(format!(
                "invalid rank: got {rank}; must be in [0, {})",
                self.placement.num_ranks()
            )))
        }
    }
}

/// `replicas` as E lists of ranks, from a dict {expert: ranks} or a sequence of E sequences.
fn replica_lists(replicas: &Bound<'_, PyAny>, num_experts: usize) -> PyResult<Vec<Vec<i64>>> {
    let typed = |_| wrong_type("replicas", "a dict {expert: [ranks]} or a list of E lists of ranks", replicas);
    if let Ok(dict) = replicas.cast::<pyo3::types::PyDict>() {
        let mut lists = vec![Vec::new(); num_experts];
        for (key, value) in dict.iter() {
            let e: i64 = key.extract().map_err(typed)?;
            let e = usize::try_from(e).ok().filter(|&e| e < num_experts).ok_or_else(|| {
                crate::errors::config_error(format!("invalid replicas: expert {e} is not in [0, {num_experts})"))
            })?;
            lists[e] = value.extract().map_err(typed)?;
        }
        Ok(lists)
    } else {
        replicas.extract().map_err(typed)
    }
}

/// What one rank sends in the all-to-all of expert parallelism.
///
/// Made by :meth:`DispatchPlan.all_to_all`. The plan's real rows travel
/// (padding does not), ordered by destination rank, then the destination's
/// local expert, then slot.
///
/// Attributes
/// ----------
/// num_ranks : int
///     R.
/// max_local_experts : int
///     L, the width of ``expert_counts``.
/// send_counts : numpy.ndarray, int64, shape [R]
///     Rows sent to each rank: ``input_split_sizes`` of
///     ``torch.distributed.all_to_all_single``; times D, the MPI ``Alltoallv``
///     send counts in elements.
/// send_rows : numpy.ndarray, int64, shape [M]
///     The plan rows in send order.
/// send_tokens : numpy.ndarray, int64, shape [M]
///     The source token of each sent row (``hidden[send_tokens]`` is the send buffer).
/// send_position : numpy.ndarray, int64, shape [N]
///     Position in send order of each plan row; -1 for padding rows.
/// expert_counts : numpy.ndarray, int64, shape [R, L]
///     Rows sent to rank r for its local expert l: exchanged (an equal-split
///     all-to-all of L values per rank) so each receiver can order its rows.
#[pyclass(frozen, name = "AllToAllPlan", module = "moe_router")]
pub struct PyAllToAllPlan {
    send: SendPlan,
    placement: ExpertPlacement,
}

impl PyAllToAllPlan {
    pub fn new(send: SendPlan, placement: ExpertPlacement) -> Self {
        PyAllToAllPlan { send, placement }
    }
}

#[pymethods]
impl PyAllToAllPlan {
    #[getter]
    fn num_ranks(&self) -> usize {
        self.send.num_ranks
    }
    #[getter]
    fn max_local_experts(&self) -> usize {
        self.send.max_local_experts
    }
    #[getter]
    fn send_counts<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        arrays::vector(py, self.send.send_counts.clone()).into_any()
    }
    #[getter]
    fn send_rows<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        arrays::vector(py, self.send.send_rows.clone()).into_any()
    }
    #[getter]
    fn send_tokens<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        arrays::vector(py, self.send.send_tokens.clone()).into_any()
    }
    #[getter]
    fn send_position<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        arrays::vector(py, self.send.send_position.clone()).into_any()
    }
    #[getter]
    fn expert_counts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let (r, l) = (self.send.num_ranks, self.send.max_local_experts);
        Ok(arrays::matrix(py, self.send.expert_counts.clone(), r, l)?.into_any())
    }

    /// The receive side for rank ``rank``, from the ``[R, L]`` counts the
    /// ranks sent it (row s: rank s's ``expert_counts[rank]``).
    ///
    /// Returns
    /// -------
    /// ReceivePlan
    ///
    /// Raises
    /// ------
    /// ConfigError
    ///     ``rank`` outside ``[0, R)``.
    /// InputError
    ///     Counts of the wrong shape, negative, or for experts the rank does not hold.
    fn receive(&self, received_counts: &Bound<'_, PyAny>, rank: &Bound<'_, PyAny>) -> PyResult<PyReceivePlan> {
        let rank = count(rank, "rank", 0, Family::Config)?;
        if rank >= self.send.num_ranks {
            return Err(crate::errors::config_error(format!(
                "invalid rank: got {rank}; must be in [0, {})",
                self.send.num_ranks
            )));
        }
        let counts = int_vector(received_counts, "received_counts")?;
        let local = self.placement.local_experts(rank).len();
        let plan = ReceivePlan::new(&counts, self.send.num_ranks, self.send.max_local_experts, local).map_err(to_py)?;
        let experts = self.placement.local_experts(rank).iter().map(|&e| e as i64).collect();
        Ok(PyReceivePlan { plan, experts })
    }

    fn __repr__(&self) -> String {
        format!("AllToAllPlan(num_ranks={}, send_counts={:?})", self.send.num_ranks, self.send.send_counts)
    }
}

/// How one rank orders the rows it receives (Megatron-Core's "permutation 2").
///
/// Attributes
/// ----------
/// recv_counts : numpy.ndarray, int64, shape [R]
///     Rows received from each rank (``output_split_sizes``).
/// local_experts : numpy.ndarray, int64, shape [L_r]
///     The rank's experts (global ids), in local order.
/// expert_offsets : numpy.ndarray, int64, shape [L_r + 1]
///     Rows of local expert l in expert-major order: ``expert_offsets[l]:expert_offsets[l+1]``.
/// order : numpy.ndarray, int64, shape [M_r]
///     ``received[order]`` is expert-major (by local expert, then source rank, then slot).
/// inverse : numpy.ndarray, int64, shape [M_r]
///     ``expert_major[inverse]`` is back in received order (for the return trip).
#[pyclass(frozen, name = "ReceivePlan", module = "moe_router")]
pub struct PyReceivePlan {
    plan: ReceivePlan,
    experts: Vec<i64>,
}

#[pymethods]
impl PyReceivePlan {
    #[getter]
    fn recv_counts<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        arrays::vector(py, self.plan.recv_counts.clone()).into_any()
    }
    #[getter]
    fn local_experts<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        arrays::vector(py, self.experts.clone()).into_any()
    }
    #[getter]
    fn expert_offsets<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        arrays::vector(py, self.plan.expert_offsets.clone()).into_any()
    }
    #[getter]
    fn order<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        arrays::vector(py, self.plan.order.clone()).into_any()
    }
    #[getter]
    fn inverse<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        arrays::vector(py, self.plan.inverse.clone()).into_any()
    }

    fn __repr__(&self) -> String {
        format!("ReceivePlan(recv_counts={:?}, local_experts={:?})", self.plan.recv_counts, self.experts)
    }
}

fn gather_typed<'py, P: Payload + Element>(
    py: Python<'py>,
    src: &Bound<'py, PyAny>,
    index: &[i64],
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyArrayDyn<P>>> {
    let input = payload::<P>(src, "src")?;
    let shape = input.shape().to_vec();
    if shape.len() != 2 {
        return Err(to_py(core::RouterError::shape("src", "[rows, D]", format!("{shape:?}"))));
    }
    let d = shape[1];
    let target = output::<P>(py, out, &[index.len(), d], "src")?;
    run_move(py, &input, &target, "src", |x, y| core::gather_rows(x, d, index, y))?;
    Ok(target)
}

/// ``out[i] = src[index[i]]``, and zero where ``index[i] < 0``: the row gather
/// of the expert-parallel exchange, in Rust with the GIL released.
///
/// Parameters
/// ----------
/// src : array, float32/float64/float16, shape [n, D]
///     C-contiguous.
/// index : array of int, shape [m]
///     Rows of ``src`` (< n), or negative for a zero row.
/// out : numpy.ndarray, optional
///     ``[m, D]`` of ``src``'s dtype.
///
/// Returns
/// -------
/// numpy.ndarray, shape [m, D]
///
/// Raises
/// ------
/// TypeError
///     ``src`` or ``index`` of the wrong dtype.
/// InputError
///     ``src`` not 2-D or not C-contiguous, an index >= n, ``out`` of the wrong shape.
#[pyfunction]
#[pyo3(signature = (src, index, out=None))]
pub fn gather_rows<'py>(
    py: Python<'py>,
    src: &Bound<'py, PyAny>,
    index: &Bound<'py, PyAny>,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let index = int_vector(index, "index")?;
    let src = as_numpy(src, "src")?;
    with_dtype!(&src, "src", PAYLOAD_ARRAY, [f32, f64, f16], P => Ok(gather_typed::<P>(py, &src, &index, out)?.into_any()))
}

/// The module's exchange classes and functions.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyExpertPlacement>()?;
    m.add_class::<PyAllToAllPlan>()?;
    m.add_class::<PyReceivePlan>()?;
    m.add_function(wrap_pyfunction!(gather_rows, m)?)?;
    m.add_function(wrap_pyfunction!(crate::eplb::plan_placement, m)?)?;
    Ok(())
}
