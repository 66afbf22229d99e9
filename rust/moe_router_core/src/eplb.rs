//! Placement advice: where to put experts (and copies of the hot ones) so that
//! the expected load of the busiest rank is small. The algorithm is DeepSeek's
//! expert-parallel load balancer (deepseek-ai/EPLB, `eplb.py`:
//! `replicate_experts`, `balanced_packing`, `rebalance_experts_hierarchical`),
//! written anew with the tie rules and the one-copy-per-rank rule below:
//!
//! 1. Nodes (only when `num_nodes > 1`): the experts form `G` contiguous
//!    groups (`G = num_groups`, default E: one expert per group); the groups
//!    are packed onto the nodes, `G/N` per node, by the greedy packing of step 3
//!    on the group loads. Each node then holds `E/N` experts, `P/N` physical
//!    slots and `R/N` ranks, and steps 2-3 run inside each node.
//! 2. Replicas: every expert gets one copy; each further slot goes to the
//!    expert with the highest load per copy `load / copies` (ties to the lower
//!    expert id), among the experts with fewer copies than the node has ranks.
//! 3. Packing: the copies, heaviest (`load / copies`) first (ties: lower
//!    expert id), each go to the lightest rank that is not full (`P/R` slots per
//!    rank) and does not hold that expert yet (ties: lower rank). If every
//!    non-full rank already holds the expert, the copy goes to the lightest
//!    rank without it (which is full) and that rank's lightest copy of an
//!    expert the lightest non-full rank lacks moves there (ties: lower expert
//!    id): so no rank ever holds two copies of one expert.
//!
//! Rank r then holds its experts in physical slots `[r*P/R, (r+1)*P/R)`, in
//! ascending expert order, which is the layout `ExpertPlacement::from_physical`
//! reads. A copy serves `1/copies` of its expert's load (tokens go to copy
//! `token % copies`), so a rank's expected load is `sum load[e] / copies[e]`
//! over the experts it holds.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeSet, BinaryHeap};

use crate::array_arg::ArrayArg;
use crate::error::{Result, RouterError};
use crate::placement::ExpertPlacement;

/// The most physical expert slots a plan may have (`num_replicas`).
pub const MAX_PHYSICAL_SLOTS: usize = 1 << 24;

/// What [`plan_placement`] is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlacementRequest {
    /// R, the ranks (processes), >= 1.
    pub num_ranks: usize,
    /// P, the physical expert slots in total: >= E, a multiple of R. `None` is E (no replicas).
    pub num_replicas: Option<usize>,
    /// N, the nodes (ranks `[n*R/N, (n+1)*R/N)` form node n); N divides R. 1 is the global policy.
    pub num_nodes: usize,
    /// G, the expert groups kept together on one node (when N > 1); G divides
    /// E and is a multiple of N. `None` is E (every expert its own group).
    pub num_groups: Option<usize>,
}

impl PlacementRequest {
    /// `num_ranks` ranks on one node, no replicas.
    pub fn new(num_ranks: usize) -> Self {
        PlacementRequest { num_ranks, num_replicas: None, num_nodes: 1, num_groups: None }
    }
}

/// A planned placement and the expected loads it was planned for.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacementPlan {
    /// The placement (copies of an expert in ascending rank order).
    pub placement: ExpertPlacement,
    /// `[P]`: the logical expert in each physical slot (EPLB's `phy2log` for one layer).
    pub physical: Vec<usize>,
    /// `[E]`: the load planned on (the input summed over layers).
    pub expert_load: Vec<f64>,
    /// `[R]`: each rank's expected load under the plan.
    pub rank_load: Vec<f64>,
    /// `[R]`: each rank's load under the contiguous placement (rank r holds
    /// experts `[r*E/R, (r+1)*E/R)`), when E is a multiple of R.
    pub contiguous_rank_load: Option<Vec<f64>>,
}

impl PlacementPlan {
    /// `max / mean` of [`rank_load`](Self::rank_load) (see [`imbalance`]).
    pub fn imbalance(&self) -> f64 {
        imbalance(&self.rank_load)
    }

    /// `max / mean` of [`contiguous_rank_load`](Self::contiguous_rank_load).
    pub fn contiguous_imbalance(&self) -> Option<f64> {
        self.contiguous_rank_load.as_deref().map(imbalance)
    }
}

/// `max / mean` of per-rank loads (1.0 when they sum to 0: no rank is busier
/// than another). The mean is their sum (in rank order) divided by their number.
pub fn imbalance(rank_load: &[f64]) -> f64 {
    let total: f64 = rank_load.iter().sum();
    if rank_load.is_empty() || total <= 0.0 {
        return 1.0;
    }
    let max = rank_load.iter().copied().fold(0.0, f64::max);
    max / (total / rank_load.len() as f64)
}

/// Plan where experts go, from `expert_load` (`[E]` or `[layers, E]`, finite
/// and >= 0; a `[layers, E]` load is summed over the layers, in layer order).
///
/// Errors: `Shape` for another shape, `InvalidEntry` for a negative or
/// non-finite entry (or loads whose sum overflows), `InvalidConfig` naming
/// `num_ranks`, `num_replicas`, `num_nodes` or `num_groups` for a request
/// that has no valid placement (see [`PlacementRequest`]; also
/// `num_replicas / num_ranks > E / num_nodes`, which would put two copies of
/// an expert on one rank, and `num_replicas > MAX_PHYSICAL_SLOTS`).
pub fn plan_placement(expert_load: ArrayArg<'_, f64>, request: &PlacementRequest) -> Result<PlacementPlan> {
    let load = total_load(expert_load)?;
    let shape = Shape::check(load.len(), request)?;
    let mut physical = vec![0usize; shape.slots];
    for (node, experts) in node_experts(&load, &shape)?.iter().enumerate() {
        let copies = replicate(&load, experts, shape.slots / shape.nodes, shape.ranks / shape.nodes);
        let mut items: Vec<(usize, f64)> =
            experts.iter().zip(&copies).flat_map(|(&e, &c)| std::iter::repeat_n((e, load[e] / c as f64), c)).collect();
        items.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(Ordering::Equal));
        let per_rank = shape.slots / shape.ranks;
        let ranks_per_node = shape.ranks / shape.nodes;
        for (local, mut held) in pack(&items, ranks_per_node, per_rank)?.into_iter().enumerate() {
            held.sort_unstable();
            let first = (node * ranks_per_node + local) * per_rank;
            physical[first..first + per_rank].copy_from_slice(&held);
        }
    }
    let as_ids: Vec<i64> = physical.iter().map(|&e| e as i64).collect();
    let placement = ExpertPlacement::from_physical(load.len(), shape.ranks, &as_ids)?;
    let rank_load = placement.rank_loads(&load)?;
    let contiguous_rank_load = load.len().is_multiple_of(shape.ranks).then(|| {
        let per = load.len() / shape.ranks;
        load.chunks(per).map(|c| c.iter().fold(0.0, |s, &x| s + x)).collect()
    });
    Ok(PlacementPlan { placement, physical, expert_load: load, rank_load, contiguous_rank_load })
}

/// The `[E]` load of an `[E]` or `[layers, E]` input: checked (finite, >= 0)
/// and summed over its layers (from 0.0, in layer order). Errors as [`plan_placement`].
pub fn total_load(expert_load: ArrayArg<'_, f64>) -> Result<Vec<f64>> {
    let shape = expert_load.shape;
    let (layers, experts) = match *shape {
        [e] => (1, e),
        [l, e] => (l, e),
        _ => (0, 0),
    };
    if layers == 0 || experts == 0 || layers * experts != expert_load.data.len() {
        return Err(RouterError::shape(
            "expert_load",
            "[E] or [layers, E] with E >= 1 and layers >= 1",
            format!("{shape:?}"),
        ));
    }
    if let Some(i) = expert_load.data.iter().position(|x| !(x.is_finite() && *x >= 0.0)) {
        let index = if shape.len() == 1 { format!("[{i}]") } else { format!("[{}, {}]", i / experts, i % experts) };
        return Err(RouterError::InvalidEntry {
            argument: "expert_load",
            index,
            value: expert_load.data[i].to_string(),
            allowed: "every load must be finite and >= 0".into(),
        });
    }
    let mut load = vec![0.0f64; experts];
    for row in expert_load.data.chunks(experts) {
        load.iter_mut().zip(row).for_each(|(s, &x)| *s += x);
    }
    if !load.iter().sum::<f64>().is_finite() {
        return Err(RouterError::InvalidEntry {
            argument: "expert_load",
            index: "'s total".into(),
            value: "inf".into(),
            allowed: "the loads must sum to a finite float64 (scale them down)".into(),
        });
    }
    Ok(load)
}

/// The validated sizes of a request.
struct Shape {
    ranks: usize,
    slots: usize,
    nodes: usize,
    groups: usize,
}

impl Shape {
    fn check(experts: usize, request: &PlacementRequest) -> Result<Shape> {
        let ranks = request.num_ranks;
        if ranks == 0 {
            return Err(RouterError::config("num_ranks", 0, "must be an integer >= 1"));
        }
        let nodes = request.num_nodes;
        if nodes == 0 || !ranks.is_multiple_of(nodes) {
            return Err(RouterError::config(
                "num_nodes",
                nodes,
                format!("must be an integer >= 1 that divides num_ranks ({ranks})"),
            ));
        }
        let slots = request.num_replicas.unwrap_or(experts);
        let default =
            if request.num_replicas.is_none() { " (the default is num_experts; pass num_replicas)" } else { "" };
        if slots < experts || slots > MAX_PHYSICAL_SLOTS {
            return Err(RouterError::config(
                "num_replicas",
                slots,
                format!(
                    "must be in [num_experts, 2**24] = [{experts}, {MAX_PHYSICAL_SLOTS}] (physical slots in total)"
                ),
            ));
        }
        if !slots.is_multiple_of(ranks) {
            return Err(RouterError::config(
                "num_replicas",
                slots,
                format!("must be a multiple of num_ranks ({ranks}), for an equal number of slots per rank{default}"),
            ));
        }
        let groups = match request.num_groups {
            Some(g) if g == 0 || !experts.is_multiple_of(g) => {
                return Err(RouterError::config(
                    "num_groups",
                    g,
                    format!("must be an integer >= 1 that divides num_experts ({experts})"),
                ));
            }
            Some(g) => g,
            None => experts,
        };
        if nodes > 1 && !groups.is_multiple_of(nodes) {
            let (field, value) =
                if request.num_groups.is_some() { ("num_groups", groups) } else { ("num_nodes", nodes) };
            return Err(RouterError::config(
                field,
                value,
                format!(
                    "the hierarchical policy needs num_groups ({groups}; default num_experts) to be a multiple of \
                     num_nodes ({nodes}); pass num_nodes=1 for the global policy"
                ),
            ));
        }
        if slots / ranks > experts / nodes {
            return Err(RouterError::config(
                "num_replicas",
                slots,
                format!(
                    "each rank would hold num_replicas / num_ranks = {} experts, but only num_experts / num_nodes \
                     = {} distinct ones are on its node (a rank holds at most one copy of an expert)",
                    slots / ranks,
                    experts / nodes
                ),
            ));
        }
        Ok(Shape { ranks, slots, nodes, groups })
    }
}

/// The experts of each node, ascending: all on one node, or the groups packed onto the nodes.
fn node_experts(load: &[f64], shape: &Shape) -> Result<Vec<Vec<usize>>> {
    if shape.nodes == 1 {
        return Ok(vec![(0..load.len()).collect()]);
    }
    let size = load.len() / shape.groups;
    let mut groups: Vec<(usize, f64)> =
        load.chunks(size).map(|c| c.iter().fold(0.0, |s, &x| s + x)).enumerate().collect();
    groups.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(Ordering::Equal));
    let packed = pack(&groups, shape.nodes, shape.groups / shape.nodes)?;
    Ok(packed
        .into_iter()
        .map(|mut held| {
            held.sort_unstable();
            held.iter().flat_map(|&g| g * size..(g + 1) * size).collect()
        })
        .collect())
}

/// Copies of each of `experts` (same order) filling `slots`: one each, then each
/// further slot to the highest `load / copies` (ties: the lower expert id)
/// among the experts with fewer than `cap` copies.
fn replicate(load: &[f64], experts: &[usize], slots: usize, cap: usize) -> Vec<usize> {
    let mut copies = vec![1usize; experts.len()];
    // Max-heap on (load per copy, then lower expert id); `experts` is ascending.
    let key = |i: usize, c: usize| (PerCopy(load[experts[i]] / c as f64), Reverse(i));
    let mut heap: BinaryHeap<_> = (0..experts.len()).filter(|_| cap > 1).map(|i| key(i, 1)).collect();
    for _ in experts.len()..slots {
        let Some((_, Reverse(i))) = heap.pop() else { break };
        copies[i] += 1;
        if copies[i] < cap {
            heap.push(key(i, copies[i]));
        }
    }
    copies
}

/// A finite, non-negative f64 with a total order (the loads are checked).
#[derive(Debug, Clone, Copy, PartialEq)]
struct PerCopy(f64);

impl Eq for PerCopy {}
impl PartialOrd for PerCopy {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for PerCopy {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// Greedy balanced packing of `items` (key, weight), taken in the given order,
/// into `bins` bins of exactly `per_bin` items, no bin holding one key twice:
/// each item to the lightest non-full bin without its key (ties: lower bin),
/// else the repair swap of the module notes. Returns each bin's keys.
fn pack(items: &[(usize, f64)], bins: usize, per_bin: usize) -> Result<Vec<Vec<usize>>> {
    let mut held: Vec<Vec<(usize, f64)>> = vec![Vec::with_capacity(per_bin); bins];
    let mut load = vec![0.0f64; bins];
    // The non-full bins by (load, bin): the first one without the key is the choice.
    let mut open: BTreeSet<(PerCopy, usize)> = (0..bins).map(|b| (PerCopy(0.0), b)).collect();
    let holds = |held: &[Vec<(usize, f64)>], b: usize, key: usize| held[b].iter().any(|&(k, _)| k == key);
    for &(key, w) in items {
        let choice = open.iter().map(|&(_, b)| b).find(|&b| !holds(&held, b, key));
        let (target, moved) = match choice {
            Some(b) => (b, None),
            None => {
                let stuck = open.iter().next().map(|&(_, b)| b).ok_or_else(no_room)?;
                let full = (0..bins)
                    .filter(|&b| !holds(&held, b, key))
                    .min_by(|&a, &b| load[a].total_cmp(&load[b]).then(a.cmp(&b)))
                    .ok_or_else(no_room)?;
                let out = (0..held[full].len())
                    .filter(|&i| !holds(&held, stuck, held[full][i].0))
                    .min_by(|&i, &j| {
                        let (a, b) = (held[full][i], held[full][j]);
                        a.1.total_cmp(&b.1).then(a.0.cmp(&b.0))
                    })
                    .ok_or_else(no_room)?;
                let (out_key, out_w) = held[full][out];
                held[full][out] = (key, w);
                load[full] = load[full] - out_w + w;
                (stuck, Some((out_key, out_w)))
            }
        };
        let (key, w) = moved.unwrap_or((key, w));
        open.remove(&(PerCopy(load[target]), target));
        held[target].push((key, w));
        load[target] += w;
        if held[target].len() < per_bin {
            open.insert((PerCopy(load[target]), target));
        }
    }
    if held.iter().any(|h| h.len() != per_bin) {
        return Err(no_room());
    }
    Ok(held.into_iter().map(|h| h.into_iter().map(|(k, _)| k).collect()).collect())
}

/// Unreachable for validated requests (the swap always exists; see the module notes).
fn no_room() -> RouterError {
    RouterError::config("num_replicas", "this request", "no placement with one copy of an expert per rank was found")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(load: &[f64], request: PlacementRequest) -> Result<PlacementPlan> {
        plan_placement(ArrayArg { name: "expert_load", data: load, shape: &[load.len()] }, &request)
    }

    fn request(ranks: usize, replicas: Option<usize>, nodes: usize, groups: Option<usize>) -> PlacementRequest {
        PlacementRequest { num_ranks: ranks, num_replicas: replicas, num_nodes: nodes, num_groups: groups }
    }

    #[test]
    fn packs_heaviest_first_onto_the_lightest_rank() {
        // 9 -> r0; 8 -> r1; 8 -> r1 (16); 6 -> r0 (15); 6 -> r0 (21, full); 2 -> r1 (18)
        let p = plan(&[6.0, 6.0, 8.0, 2.0, 8.0, 9.0], PlacementRequest::new(2)).expect("valid");
        assert_eq!(p.physical, vec![0, 1, 5, 2, 3, 4]);
        assert_eq!(p.rank_load, vec![21.0, 18.0]);
        // the contiguous layout is better here: greedy packing does not always improve on it
        assert_eq!(p.contiguous_rank_load, Some(vec![20.0, 19.0]));
        assert!((p.imbalance() - 21.0 / 19.5).abs() < 1e-15);
    }

    #[test]
    fn replicas_go_to_the_highest_load_per_copy() {
        // E=4, R=2, P=6: 9 -> 2 copies (4.5), then 8 -> 2 copies (4)
        let p = plan(&[2.0, 8.0, 1.0, 9.0], request(2, Some(6), 1, None)).expect("valid");
        assert_eq!(p.placement.hosts(3), &[0, 1]);
        assert_eq!(p.placement.hosts(1), &[0, 1]);
        // 4.5 r0, 4.5 r1, 4 r0 (8.5), 4 r1 (8.5), 2 r0 (10.5), 1 r1 (9.5)
        assert_eq!(p.physical, vec![0, 1, 3, 1, 2, 3]);
        assert_eq!(p.rank_load, vec![10.5, 9.5]);
        // ties to the lower expert id; a rank holds every expert at most once
        let flat = plan(&[1.0; 4], request(2, Some(8), 1, None)).expect("valid");
        assert_eq!(flat.physical, vec![0, 1, 2, 3, 0, 1, 2, 3]);
    }

    #[test]
    fn copies_are_capped_at_the_ranks_and_spread_over_them() {
        // one hot expert: at most R copies, one per rank
        let p = plan(&[100.0, 1.0, 1.0, 1.0], request(2, Some(6), 1, None)).expect("valid");
        assert_eq!(p.placement.hosts(0), &[0, 1]);
        assert_eq!(p.placement.hosts(1), &[0, 1], "the second extra slot goes to the next expert, not a third copy");
        assert_eq!(p.placement.local_experts(0).len(), 3);
        for e in 0..4 {
            let hosts = p.placement.hosts(e);
            assert!(hosts.windows(2).all(|w| w[0] < w[1]), "expert {e} twice on a rank");
        }
    }

    #[test]
    fn the_repair_swap_keeps_copies_on_distinct_ranks() {
        // 3 ranks of 3 slots; the last expert's three copies arrive when only
        // two ranks are open and both already hold it after the first copy.
        let items = [(0, 100.0), (1, 50.0), (2, 1.0), (3, 1.0), (4, 1.0), (5, 1.0), (6, 0.1), (6, 0.1), (6, 0.1)];
        let bins = pack(&items, 3, 3).expect("a placement exists");
        for (b, keys) in bins.iter().enumerate() {
            assert_eq!(keys.len(), 3);
            let mut k = keys.clone();
            k.sort_unstable();
            k.dedup();
            assert_eq!(k.len(), 3, "bin {b} holds a key twice: {keys:?}");
        }
        assert_eq!(bins.iter().filter(|b| b.contains(&6)).count(), 3);
    }

    #[test]
    fn hierarchical_keeps_groups_and_replicas_inside_nodes() {
        // 8 experts in 4 groups of 2, 2 nodes of 2 ranks, 12 slots.
        let load = [10.0, 9.0, 1.0, 1.0, 5.0, 5.0, 2.0, 0.0];
        let p = plan(&load, request(4, Some(12), 2, Some(4))).expect("valid");
        // group loads 19, 2, 10, 2: g0 -> n0 (19), g2 -> n1 (10), g1 -> n1 (12, full), g3 -> n0
        for e in 0..8 {
            let node = |r: usize| r / 2;
            let hosts = p.placement.hosts(e);
            assert!(hosts.iter().all(|&r| node(r) == node(hosts[0])), "expert {e} on two nodes");
            let home = if (2..6).contains(&e) { 1 } else { 0 };
            assert_eq!(node(hosts[0]), home, "expert {e}");
        }
        assert_eq!(p.placement.hosts(0).len(), 2);
        assert_eq!(p.physical.len(), 12);
    }

    #[test]
    fn sums_layers_and_refuses_bad_input() {
        let two = [1.0, 2.0, 3.0, 4.0, 0.5, 0.5, 0.5, 0.5];
        let p = plan_placement(ArrayArg { name: "expert_load", data: &two, shape: &[2, 4] }, &PlacementRequest::new(2))
            .expect("valid");
        assert_eq!(p.expert_load, vec![1.5, 2.5, 3.5, 4.5]);
        let err = |load: &[f64], r: PlacementRequest| plan(load, r).expect_err("refused").to_string();
        assert!(err(&[1.0, -1.0], PlacementRequest::new(1)).contains("expert_load[1] is -1"));
        assert!(err(&[1.0, f64::NAN], PlacementRequest::new(1)).contains("expert_load[1] is NaN"));
        assert!(err(&[f64::MAX, f64::MAX], PlacementRequest::new(1)).contains("total"));
        assert!(err(&[1.0; 4], PlacementRequest::new(0)).contains("num_ranks"));
        assert!(err(&[1.0; 6], PlacementRequest::new(4)).contains("num_replicas"));
        assert!(err(&[1.0; 4], request(2, Some(3), 1, None)).contains("num_replicas"));
        assert!(err(&[1.0; 4], request(2, Some(10), 1, None)).contains("at most one copy"));
        assert!(err(&[1.0; 4], request(4, None, 3, None)).contains("num_nodes"));
        assert!(err(&[1.0; 6], request(2, None, 2, Some(3))).contains("num_groups"));
        assert!(err(&[1.0; 6], request(2, None, 1, Some(4))).contains("num_groups"));
        assert!(err(&[1.0; 4], request(4, Some(12), 2, None)).contains("at most one copy"));
        let empty = plan_placement(ArrayArg { name: "expert_load", data: &[], shape: &[0] }, &PlacementRequest::new(1));
        assert!(empty.expect_err("refused").to_string().contains("expert_load has shape [0]"));
    }

    #[test]
    fn zero_load_is_balanced() {
        let p = plan(&[0.0; 8], request(4, Some(12), 1, None)).expect("valid");
        assert_eq!(p.imbalance(), 1.0);
        assert_eq!(p.contiguous_imbalance(), Some(1.0));
        assert_eq!(p.physical.len(), 12);
    }
}
