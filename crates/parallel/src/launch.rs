//! `helix-train --nproc-per-node N [--nnodes M --node-rank R --master-addr HOST --master-port P]`:
//! starts this node's ranks as torchrun does (the same binary and arguments, with RANK,
//! LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT and the job token set),
//! prefixes their output with their rank, forwards SIGTERM / SIGINT to them, and if one exits
//! with an error stops the others and exits with its status, naming it.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::Rng;

use crate::env::TOKEN_VAR;

#[derive(Clone, Debug)]
pub struct LaunchOptions {
    pub nproc_per_node: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

/// How long stopped ranks get to exit after SIGTERM before SIGKILL.
const GRACE: Duration = Duration::from_secs(15);

/// Runs this node's ranks of `exe args` to completion; returns the exit status for the
/// launcher to exit with.
pub fn launch(opts: &LaunchOptions, exe: &Path, args: &[OsString]) -> Result<i32> {
    if opts.nproc_per_node == 0 || opts.nnodes == 0 {
        bail!("--nproc-per-node and --nnodes must be at least 1");
    }
    if opts.node_rank >= opts.nnodes {
        bail!(
            "--node-rank {} is outside --nnodes {}",
            opts.node_rank,
            opts.nnodes
        );
    }
    let token = match std::env::var(TOKEN_VAR) {
        Ok(t) if !t.is_empty() => t,
        _ if opts.nnodes == 1 => {
            let bytes: [u8; 16] = rand::rng().random();
            bytes.iter().map(|b| format!("{b:02x}")).collect()
        }
        _ => bail!(
            "{TOKEN_VAR} must be set to the same secret on every node of a multi-node job \
             (e.g. export {TOKEN_VAR}=$(openssl rand -hex 16) in the job script)"
        ),
    };
    let world = opts.nproc_per_node * opts.nnodes;
    let mut children: Vec<(usize, Child)> = Vec::new();
    let mut pipes = Vec::new();
    for local in 0..opts.nproc_per_node {
        let rank = opts.node_rank * opts.nproc_per_node + local;
        let mut child = Command::new(exe)
            .args(args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_WORLD_SIZE", opts.nproc_per_node.to_string())
            .env("MASTER_ADDR", &opts.master_addr)
            .env("MASTER_PORT", opts.master_port.to_string())
            .env(TOKEN_VAR, &token)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start rank {rank} ({})", exe.display()))?;
        pipes.push(prefix_lines(child.stdout.take(), rank, false));
        pipes.push(prefix_lines(child.stderr.take(), rank, true));
        children.push((rank, child));
    }

    let signals = Arc::new(AtomicUsize::new(0));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        let s = signals.clone();
        // SAFETY: the handler only increments an atomic.
        unsafe {
            signal_hook::low_level::register(sig, move || {
                s.fetch_add(1, Ordering::SeqCst);
            })
        }
        .context("cannot install the signal handlers")?;
    }

    let mut forwarded = 0;
    let mut status = 0;
    let mut stopping: Option<Instant> = None;
    while !children.is_empty() {
        let seen = signals.load(Ordering::SeqCst);
        if seen > forwarded {
            // First signal: the ranks save and exit; a second: they exit at once.
            for (_, c) in &children {
                send(c, libc::SIGTERM);
            }
            forwarded = seen;
        }
        let mut i = 0;
        while i < children.len() {
            let Some(s) = children[i].1.try_wait()? else {
                i += 1;
                continue;
            };
            let (rank, _) = children.remove(i);
            let code = exit_code(s);
            if code != 0 && status == 0 {
                status = code;
                eprintln!(
                    "helix-train: rank {rank} exited with {}; stopping the other ranks",
                    describe(s)
                );
                for (_, other) in &children {
                    send(other, libc::SIGTERM);
                }
                stopping = Some(Instant::now());
            }
        }
        if stopping.is_some_and(|t| t.elapsed() > GRACE) {
            for (rank, c) in &children {
                eprintln!("helix-train: rank {rank} did not stop; killing it");
                send(c, libc::SIGKILL);
            }
            stopping = None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in pipes {
        let _ = p.join();
    }
    Ok(status)
}

fn send(c: &Child, sig: libc::c_int) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(c.id() as libc::pid_t, sig);
    }
}

fn exit_code(s: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
}

fn describe(s: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("status {c}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => "an unknown status".into(),
    }
}

/// Copies a child's output line by line with a `[rank N]` prefix.
fn prefix_lines(
    pipe: Option<impl std::io::Read + Send + 'static>,
    rank: usize,
    to_stderr: bool,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let Some(pipe) = pipe else { return };
        for line in BufReader::new(pipe).split(b'\n').map_while(Result::ok) {
            let text = String::from_utf8_lossy(&line);
            // A progress bar redraws with \r: keep the last frame of the line.
            let text = text.rsplit('\r').next().unwrap_or_default();
            if to_stderr {
                let _ = writeln!(std::io::stderr(), "[rank {rank}] {text}");
            } else {
                let _ = writeln!(std::io::stdout(), "[rank {rank}] {text}");
            }
        }
    })
}
