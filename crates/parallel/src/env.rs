//! Where this process stands in a job, read from the environment a launcher sets: torchrun's
//! variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, as `helix-train
//! --nproc-per-node` sets them too) or Slurm's (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, the
//! first host of SLURM_JOB_NODELIST). No variables: a single process.

use anyhow::{bail, Context, Result};

/// The default rendezvous port (torchrun's).
pub const DEFAULT_PORT: u16 = 29500;

/// The job token variable: every connection must present it.
pub const TOKEN_VAR: &str = "HELIX_JOB_TOKEN";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessEnv {
    pub rank: usize,
    pub local_rank: usize,
    pub world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// Shared by every rank of the job; connections without it are refused.
    pub token: String,
    /// Which launcher the variables came from, for messages.
    pub source: &'static str,
}

impl ProcessEnv {
    /// Reads the process environment; `None` when no launcher set one (a single process).
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// The same from any variable lookup (tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let num = |k: &str| -> Result<Option<usize>> {
            var(k)
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .with_context(|| format!("{k}={v} is not a number"))
                })
                .transpose()
        };
        let port = |default: u16| -> Result<u16> {
            match var("MASTER_PORT") {
                Some(p) => p
                    .trim()
                    .parse()
                    .with_context(|| format!("MASTER_PORT={p} is not a port")),
                None => Ok(default),
            }
        };
        let (rank, local_rank, world_size, master_addr, master_port, source, default_token) =
            if let Some(rank) = num("RANK")? {
                let world = num("WORLD_SIZE")?.context("RANK is set but WORLD_SIZE is not")?;
                let addr = var("MASTER_ADDR").context("RANK is set but MASTER_ADDR is not")?;
                let local = num("LOCAL_RANK")?.unwrap_or(rank);
                (
                    rank,
                    local,
                    world,
                    addr,
                    port(DEFAULT_PORT)?,
                    "torchrun",
                    None,
                )
            } else if let Some(rank) = num("SLURM_PROCID")? {
                let world =
                    num("SLURM_NTASKS")?.context("SLURM_PROCID is set but SLURM_NTASKS is not")?;
                let local = num("SLURM_LOCALID")?.unwrap_or(0);
                let nodes = var("SLURM_JOB_NODELIST")
                    .or_else(|| var("SLURM_NODELIST"))
                    .context("SLURM_PROCID is set but SLURM_JOB_NODELIST is not")?;
                let addr = match var("MASTER_ADDR") {
                    Some(a) => a,
                    None => first_host(&nodes)?,
                };
                let job = var("SLURM_JOB_ID").unwrap_or_default();
                // A port per job, so two jobs sharing a node do not meet.
                let default_port =
                    DEFAULT_PORT + job.parse::<u64>().map_or(0, |j| (j % 1000) as u16);
                let token = (!job.is_empty()).then(|| format!("slurm-job-{job}"));
                (
                    rank,
                    local,
                    world,
                    addr,
                    port(default_port)?,
                    "Slurm",
                    token,
                )
            } else {
                return Ok(None);
            };
        if world_size == 0 || rank >= world_size {
            bail!("rank {rank} is outside a world of {world_size} ({source} variables)");
        }
        let token = match var(TOKEN_VAR) {
            Some(t) if !t.is_empty() => t,
            _ => default_token.with_context(|| {
                format!(
                    "{TOKEN_VAR} is not set: every rank of a job needs the same secret token \
                     (helix-train --nproc-per-node makes one; under srun, export \
                     {TOKEN_VAR}=$(openssl rand -hex 16) before it)"
                )
            })?,
        };
        Ok(Some(Self {
            rank,
            local_rank,
            world_size,
            master_addr,
            master_port,
            token,
            source,
        }))
    }
}

/// The first host of a Slurm node list: `node[01-04,07],gpu5` → `node01`.
pub fn first_host(list: &str) -> Result<String> {
    let list = list.trim();
    // The first top-level entry: commas inside brackets belong to ranges.
    let mut depth = 0;
    let end = list
        .char_indices()
        .find(|&(_, c)| {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                _ => {}
            }
            c == ',' && depth == 0
        })
        .map_or(list.len(), |(i, _)| i);
    let entry = &list[..end];
    let Some(open) = entry.find('[') else {
        if entry.is_empty() {
            bail!("SLURM_JOB_NODELIST is empty");
        }
        return Ok(entry.to_string());
    };
    let close = entry
        .find(']')
        .with_context(|| format!("SLURM_JOB_NODELIST entry '{entry}' has no closing ]"))?;
    let first = entry[open + 1..close]
        .split(',')
        .next()
        .and_then(|r| r.split('-').next())
        .filter(|s| !s.is_empty())
        .with_context(|| format!("SLURM_JOB_NODELIST entry '{entry}' has an empty range"))?;
    Ok(format!("{}{first}{}", &entry[..open], &entry[close + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Option<ProcessEnv>> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ProcessEnv::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn torchrun_and_slurm_variables_are_read() -> Result<()> {
        assert_eq!(env(&[])?, None);
        let t = env(&[
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("WORLD_SIZE", "4"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29555"),
            (TOKEN_VAR, "abc"),
        ])?
        .unwrap();
        assert_eq!((t.rank, t.local_rank, t.world_size), (3, 1, 4));
        assert_eq!((t.master_addr.as_str(), t.master_port), ("10.0.0.1", 29555));
        let s = env(&[
            ("SLURM_PROCID", "9"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_JOB_NODELIST", "xe9680-[07-08]"),
            ("SLURM_JOB_ID", "123456"),
        ])?
        .unwrap();
        assert_eq!((s.rank, s.local_rank, s.world_size), (9, 1, 16));
        assert_eq!(s.master_addr, "xe9680-07");
        assert_eq!(s.master_port, DEFAULT_PORT + 456);
        assert_eq!(s.token, "slurm-job-123456");
        Ok(())
    }

    #[test]
    fn bad_variables_are_named() {
        let err = |pairs: &[(&str, &str)]| env(pairs).unwrap_err().to_string();
        assert!(err(&[("RANK", "x")]).contains("RANK=x"));
        assert!(err(&[("RANK", "0")]).contains("WORLD_SIZE"));
        let e = err(&[("RANK", "4"), ("WORLD_SIZE", "4"), ("MASTER_ADDR", "h")]);
        assert!(e.contains("rank 4 is outside a world of 4"), "{e}");
        let e = err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")]);
        assert!(e.contains(TOKEN_VAR), "{e}");
        let e = err(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "99999"),
        ]);
        assert!(e.contains("MASTER_PORT=99999"), "{e}");
    }

    #[test]
    fn first_host_of_a_slurm_node_list() -> Result<()> {
        assert_eq!(first_host("node[01-04,07],gpu5")?, "node01");
        assert_eq!(first_host("gpu5,node[1-2]")?, "gpu5");
        assert_eq!(first_host("a[3,5]-ib")?, "a3-ib");
        assert_eq!(first_host("single")?, "single");
        assert!(first_host("bad[01-").is_err());
        assert!(first_host("").is_err());
        Ok(())
    }
}
