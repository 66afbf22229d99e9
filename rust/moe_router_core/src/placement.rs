//! `ExpertPlacement`: which ranks (processes) hold each expert, for expert
//! parallelism. A logical expert lives on one rank or, replicated, on several;
//! each rank numbers the experts it holds (its local experts) in ascending
//! expert order.

use crate::error::{Result, RouterError};

/// An empty list of `n` per-item lists, or `TooLarge` naming `argument`.
fn lists(n: usize, argument: &'static str) -> Result<Vec<Vec<usize>>> {
    let mut v: Vec<Vec<usize>> = Vec::new();
    let bytes = (n as u128) * std::mem::size_of::<Vec<usize>>() as u128;
    v.try_reserve_exact(n).map_err(|_| RouterError::TooLarge { argument, bytes })?;
    v.resize_with(n, Vec::new);
    Ok(v)
}

/// Experts spread over `num_ranks` processes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ExpertPlacement {
    num_experts: usize,
    num_ranks: usize,
    /// Per expert, the ranks holding a copy: the primary first, then the replicas.
    hosts: Vec<Vec<usize>>,
    /// Per rank, the experts it holds, ascending.
    local: Vec<Vec<usize>>,
}

impl ExpertPlacement {
    /// Megatron-Core's layout: rank r holds experts `[r*E/R, (r+1)*E/R)`.
    /// E must be a multiple of R.
    pub fn contiguous(num_experts: usize, num_ranks: usize) -> Result<Self> {
        check_sizes(num_experts, num_ranks)?;
        if !num_experts.is_multiple_of(num_ranks) {
            return Err(RouterError::config(
                "num_ranks",
                num_ranks,
                format!("the contiguous placement needs num_experts ({num_experts}) to be a multiple of num_ranks; pass a mapping"),
            ));
        }
        let per = num_experts / num_ranks;
        let mut hosts = lists(num_experts, "num_experts")?;
        for (e, h) in hosts.iter_mut().enumerate() {
            h.push(e / per);
        }
        Self::from_hosts(num_experts, num_ranks, hosts)
    }

    /// Expert `e` on rank `mapping[e]`, plus `replicas[e]` (further ranks
    /// holding a copy; may be empty).
    pub fn new(num_experts: usize, num_ranks: usize, mapping: &[i64], replicas: &[Vec<i64>]) -> Result<Self> {
        check_sizes(num_experts, num_ranks)?;
        if mapping.len() != num_experts {
            return Err(RouterError::shape(
                "mapping",
                format!("[{num_experts}] (one rank per expert)"),
                format!("{} values", mapping.len()),
            ));
        }
        if !replicas.is_empty() && replicas.len() != num_experts {
            return Err(RouterError::shape(
                "replicas",
                format!("[{num_experts}] lists of ranks"),
                format!("{} lists", replicas.len()),
            ));
        }
        let rank = |field: &'static str, r: i64| -> Result<usize> {
            usize::try_from(r)
                .ok()
                .filter(|&r| r < num_ranks)
                .ok_or_else(|| RouterError::config(field, r, format!("every rank must be in [0, {num_ranks})")))
        };
        let mut hosts = lists(0, "num_experts")?;
        hosts
            .try_reserve_exact(num_experts)
            .map_err(|_| RouterError::TooLarge { argument: "num_experts", bytes: num_experts as u128 })?;
        for (e, &primary) in mapping.iter().enumerate() {
            let mut ranks = vec![rank("mapping", primary)?];
            for &r in replicas.get(e).map(Vec::as_slice).unwrap_or(&[]) {
                let r = rank("replicas", r)?;
                if ranks.contains(&r) {
                    return Err(RouterError::config(
                        "replicas",
                        format!("rank {r} for expert {e}"),
                        "a rank holds at most one copy of an expert",
                    ));
                }
                ranks.push(r);
            }
            hosts.push(ranks);
        }
        Self::from_hosts(num_experts, num_ranks, hosts)
    }

    /// DeepSeek EPLB's physical layout: physical expert slot p holds logical
    /// expert `physical[p]`, and rank r holds slots `[r*P/R, (r+1)*P/R)`.
    pub fn from_physical(num_experts: usize, num_ranks: usize, physical: &[i64]) -> Result<Self> {
        check_sizes(num_experts, num_ranks)?;
        let p = physical.len();
        if p == 0 || !p.is_multiple_of(num_ranks) {
            return Err(RouterError::shape(
                "physical",
                format!("a multiple of num_ranks = {num_ranks} slots"),
                format!("{p} slots"),
            ));
        }
        let per = p / num_ranks;
        let mut hosts = lists(num_experts, "num_experts")?;
        for (slot, &e) in physical.iter().enumerate() {
            let e = usize::try_from(e).ok().filter(|&e| e < num_experts).ok_or_else(|| {
                RouterError::config("physical", e, format!("every logical expert id must be in [0, {num_experts})"))
            })?;
            let r = slot / per;
            if hosts[e].contains(&r) {
                return Err(RouterError::config(
                    "physical",
                    format!("expert {e} twice on rank {r}"),
                    "a rank holds at most one copy of an expert",
                ));
            }
            hosts[e].push(r);
        }
        Self::from_hosts(num_experts, num_ranks, hosts)
    }

    fn from_hosts(num_experts: usize, num_ranks: usize, hosts: Vec<Vec<usize>>) -> Result<Self> {
        if let Some(e) = hosts.iter().position(Vec::is_empty) {
            return Err(RouterError::config(
                "physical",
                format!("expert {e} on no rank"),
                "every expert must be placed",
            ));
        }
        let mut local = lists(num_ranks, "num_ranks")?;
        for (e, ranks) in hosts.iter().enumerate() {
            for &r in ranks {
                local[r].push(e);
            }
        }
        Ok(ExpertPlacement { num_experts, num_ranks, hosts, local })
    }

    /// E.
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    /// R.
    pub fn num_ranks(&self) -> usize {
        self.num_ranks
    }

    /// The ranks holding expert `e` (primary first).
    pub fn hosts(&self, e: usize) -> &[usize] {
        &self.hosts[e]
    }

    /// The experts rank `r` holds, ascending.
    pub fn local_experts(&self, r: usize) -> &[usize] {
        &self.local[r]
    }

    /// The most experts any rank holds.
    pub fn max_local_experts(&self) -> usize {
        self.local.iter().map(Vec::len).max().unwrap_or(0)
    }

    /// Each rank's expected load `[R]` for a per-expert load `[E]`: the sum, over
    /// the experts the rank holds (ascending), of `expert_load[e] / copies(e)`,
    /// since tokens spread over a replicated expert's copies by `token % copies`.
    pub fn rank_loads(&self, expert_load: &[f64]) -> Result<Vec<f64>> {
        if expert_load.len() != self.num_experts {
            return Err(RouterError::shape(
                "expert_load",
                format!("[{}] (one load per expert)", self.num_experts),
                format!("[{}]", expert_load.len()),
            ));
        }
        Ok(self
            .local
            .iter()
            .map(|experts| experts.iter().fold(0.0, |s, &e| s + expert_load[e] / self.hosts[e].len() as f64))
            .collect())
    }

    /// Where token `token`'s assignment to expert `e` goes: `(rank, local
    /// expert index on that rank)`. A replicated expert's copy is chosen by
    /// `token % replicas` (vLLM's rule), so the choice is deterministic.
    pub fn destination(&self, e: usize, token: usize) -> (usize, usize) {
        let ranks = &self.hosts[e];
        let r = ranks[token % ranks.len()];
        let l = self.local[r].binary_search(&e).unwrap_or(0);
        (r, l)
    }
}

fn check_sizes(num_experts: usize, num_ranks: usize) -> Result<()> {
    if num_experts == 0 {
        return Err(RouterError::config("num_experts", 0, "must be an integer >= 1"));
    }
    if num_ranks == 0 {
        return Err(RouterError::config("num_ranks", 0, "must be an integer >= 1"));
    }
    // Expert ids are int32 throughout (the decision's expert_indices).
    if num_experts > i32::MAX as usize {
        return Err(RouterError::config("num_experts", num_experts, "must be at most 2**31 - 1"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_and_destinations() {
        let p = ExpertPlacement::contiguous(8, 4).expect("valid");
        assert_eq!(p.local_experts(1), &[2, 3]);
        assert_eq!(p.destination(3, 7), (1, 1));
        let r = ExpertPlacement::new(4, 2, &[0, 0, 1, 1], &[vec![1], vec![], vec![], vec![]]).expect("valid");
        assert_eq!(r.local_experts(1), &[0, 2, 3]);
        assert_eq!(r.destination(0, 4), (0, 0));
        assert_eq!(r.destination(0, 5), (1, 0));
        let phys = ExpertPlacement::from_physical(3, 2, &[0, 1, 2, 0]).expect("valid");
        assert_eq!(phys.hosts(0), &[0, 1]);
        assert!(ExpertPlacement::contiguous(6, 4).is_err());
        assert!(ExpertPlacement::new(2, 2, &[0, 2], &[]).is_err());
        assert!(ExpertPlacement::new(2, 2, &[0, 1], &[vec![0], vec![]]).is_err());
        assert!(ExpertPlacement::from_physical(3, 2, &[0, 1, 0, 1]).is_err());
        assert_eq!(phys.rank_loads(&[4.0, 1.0, 2.0]).expect("valid"), vec![3.0, 4.0]);
        assert!(phys.rank_loads(&[1.0]).is_err());
    }
}
