//! The rendezvous store rank 0 serves: a small key-value store (ring addresses, barriers)
//! and the job's failure detector.
//!
//! Every rank keeps a heartbeat connection to the store. The store marks a rank failed when
//! that connection drops without a goodbye (the process died) or stays silent longer than the
//! timeout (it hangs or was stopped); every other rank learns it on its next heartbeat and
//! exits non-zero naming that rank, whatever its main thread is blocked on. If rank 0 itself
//! goes, the others lose the store and exit naming it. A job never hangs silently.

use std::collections::HashMap;
use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::wire::{accept_hello, hello, read_frame, write_frame, Role, MAX_CONTROL_FRAME};

const SET: u8 = 1;
const GET: u8 = 2;
const ADD: u8 = 3;
const BEAT: u8 = 4;
const BYE: u8 = 5;
/// A rank's own error, which fails the job with it.
const FAIL: u8 = 6;
/// The failure, for a rank whose wait it ended.
const WHY: u8 = 7;

/// How often ranks send heartbeats.
pub const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);

#[derive(Default)]
struct State {
    kv: HashMap<String, Vec<u8>>,
    /// Last heartbeat of each rank, and whether it said goodbye.
    beats: HashMap<usize, (Instant, bool)>,
    /// The first failure seen: what every rank is told.
    failed: Option<String>,
    /// Ranks that have heard of the failure, or are gone.
    told: std::collections::HashSet<usize>,
}

impl State {
    /// Whether a rank of `world` other than rank 0 has not yet heard of the failure.
    fn untold(&self, world: usize) -> bool {
        (1..world).any(|r| !self.told.contains(&r))
    }
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    token: String,
    timeout: Duration,
    /// Connections refused so far (bad hello, wrong token): see [`log_refusal`].
    refused: AtomicU64,
}

/// The store, served by rank 0 on the rendezvous port.
pub struct StoreServer {
    shared: Arc<Shared>,
    pub addr: std::net::SocketAddr,
    _threads: Vec<JoinHandle<()>>,
}

impl StoreServer {
    /// Serves on `port` of every interface (0: any free port), refusing connections without
    /// `token`; a rank silent for `timeout` is failed.
    pub fn start(port: u16, token: &str, timeout: Duration) -> Result<Self> {
        let listener = TcpListener::bind(("0.0.0.0", port))
            .with_context(|| format!("cannot serve the rendezvous store on port {port}"))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            token: token.to_string(),
            timeout,
            refused: AtomicU64::new(0),
        });
        let accept = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("helix-store".into())
                .spawn(move || {
                    for stream in listener.incoming().flatten() {
                        let shared = shared.clone();
                        let _ = std::thread::Builder::new()
                            .name("helix-store-conn".into())
                            .spawn(move || serve(stream, &shared));
                    }
                })?
        };
        let monitor = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("helix-store-monitor".into())
                .spawn(move || loop {
                    std::thread::sleep(HEARTBEAT_EVERY / 2);
                    let mut st = shared.state.lock().expect("store lock");
                    if st.failed.is_none() {
                        let late = st
                            .beats
                            .iter()
                            .filter(|(_, (t, done))| !done && t.elapsed() > shared.timeout)
                            .map(|(r, _)| *r)
                            .min();
                        if let Some(r) = late {
                            st.failed = Some(format!(
                                "rank {r} stopped responding (no heartbeat for {:.0} s: hung, \
                                 stopped or unreachable)",
                                shared.timeout.as_secs_f64()
                            ));
                            shared.changed.notify_all();
                        }
                    }
                })?
        };
        Ok(Self {
            shared,
            addr,
            _threads: vec![accept, monitor],
        })
    }

    /// Waits until all `world` ranks have said goodbye (or one failed, or `timeout` passed),
    /// so rank 0 does not take the store away from ranks still finishing.
    pub fn wait_for_goodbyes(&self, world: usize, timeout: Duration) {
        self.wait_while(timeout, |st| {
            st.failed.is_none() && st.beats.values().filter(|(_, done)| *done).count() < world
        });
    }

    /// Waits until every other rank of `world` has heard of the job's failure on its
    /// heartbeat (or its connection is gone), at most `timeout`: rank 0's exit takes the store
    /// away, and with it the failure's message.
    pub fn wait_until_told(&self, world: usize, timeout: Duration) {
        self.wait_while(timeout, |st| st.untold(world));
    }

    /// [`Self::wait_until_told`] as a function a heartbeat thread can call before it exits.
    pub fn told_waiter(&self, world: usize) -> Box<dyn Fn() + Send> {
        let shared = self.shared.clone();
        Box::new(move || wait_while(&shared, TELL_TIMEOUT, |st| st.untold(world)))
    }

    /// Waits while `pending` holds of the store's state, at most `timeout`.
    fn wait_while(&self, timeout: Duration, pending: impl Fn(&State) -> bool) {
        wait_while(&self.shared, timeout, pending)
    }

    /// The failure the store recorded, if any.
    pub fn failure(&self) -> Option<String> {
        self.shared.state.lock().expect("store lock").failed.clone()
    }
}

/// How long rank 0 waits for the other ranks to hear of a failure before it exits: a few
/// heartbeats.
pub const TELL_TIMEOUT: Duration = Duration::from_millis(4 * HEARTBEAT_EVERY.as_millis() as u64);

fn wait_while(shared: &Shared, timeout: Duration, pending: impl Fn(&State) -> bool) {
    let deadline = Instant::now() + timeout;
    let mut st = shared.state.lock().expect("store lock");
    while pending(&st) && Instant::now() < deadline {
        st = shared
            .changed
            .wait_timeout(st, Duration::from_millis(50))
            .expect("store lock")
            .0;
    }
}

/// Refusals logged line by line; after these, one line per [`REFUSALS_PER_LINE`].
const REFUSALS_LOGGED: u64 = 10;
const REFUSALS_PER_LINE: u64 = 100;

/// Logs the `n`th refused connection: in full for the first few, then as a running count, so
/// a port scan of the rendezvous port cannot flood the job's log.
fn log_refusal(n: u64, peer: &str, e: &anyhow::Error) {
    if n <= REFUSALS_LOGGED {
        eprintln!("helix store: refused a connection from {peer}: {e:#}");
        if n == REFUSALS_LOGGED {
            eprintln!(
                "helix store: {n} connections refused; from here on, one line per \
                 {REFUSALS_PER_LINE}"
            );
        }
    } else if n.is_multiple_of(REFUSALS_PER_LINE) {
        eprintln!("helix store: {n} connections refused so far (the latest from {peer}: {e:#})");
    }
}

fn serve(mut stream: TcpStream, shared: &Shared) {
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let (rank, role) = match accept_hello(&mut stream, &shared.token, shared.timeout) {
        Ok(x) => x,
        Err(e) => {
            log_refusal(
                shared.refused.fetch_add(1, Ordering::Relaxed) + 1,
                &peer,
                &e,
            );
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
    };
    let _ = stream.set_read_timeout(None);
    if role == Role::Heartbeat {
        shared
            .state
            .lock()
            .expect("store lock")
            .beats
            .insert(rank, (Instant::now(), false));
    }
    loop {
        let msg = match read_frame(&mut stream, MAX_CONTROL_FRAME) {
            Ok(m) if !m.is_empty() => m,
            _ => break,
        };
        let reply = handle(&msg, rank, shared);
        if write_frame(&mut stream, &reply).is_err() {
            break;
        }
        // A heartbeat answered with the failure has been told, now that the answer is sent:
        // rank 0 may exit.
        if msg[0] == BEAT && !reply.is_empty() {
            shared.state.lock().expect("store lock").told.insert(rank);
            shared.changed.notify_all();
        }
    }
    if role == Role::Heartbeat {
        let mut st = shared.state.lock().expect("store lock");
        let done = st.beats.get(&rank).is_some_and(|(_, d)| *d);
        if !done && st.failed.is_none() {
            st.failed = Some(format!(
                "rank {rank} ({peer}) exited or lost its connection"
            ));
        }
        st.told.insert(rank);
        shared.changed.notify_all();
    }
}

fn handle(msg: &[u8], rank: usize, shared: &Shared) -> Vec<u8> {
    let (op, body) = (msg[0], &msg[1..]);
    let mut st = shared.state.lock().expect("store lock");
    match op {
        SET => {
            let (k, v) = split_key(body);
            st.kv.insert(k, v.to_vec());
            shared.changed.notify_all();
            vec![]
        }
        GET => {
            let key = String::from_utf8_lossy(body).into_owned();
            // Waits for the key; the client's own timeout bounds the wait.
            loop {
                if let Some(v) = st.kv.get(&key) {
                    return v.clone();
                }
                if st.failed.is_some() {
                    return vec![];
                }
                st = shared.changed.wait(st).expect("store lock");
            }
        }
        ADD => {
            let (k, v) = split_key(body);
            let delta = i64::from_le_bytes(v.try_into().unwrap_or([0; 8]));
            let entry = st
                .kv
                .entry(k)
                .or_insert_with(|| 0i64.to_le_bytes().to_vec());
            let now = i64::from_le_bytes(entry.as_slice().try_into().unwrap_or([0; 8])) + delta;
            *entry = now.to_le_bytes().to_vec();
            shared.changed.notify_all();
            now.to_le_bytes().to_vec()
        }
        BEAT => {
            if let Some(b) = st.beats.get_mut(&rank) {
                b.0 = Instant::now();
            }
            st.failed.clone().unwrap_or_default().into_bytes()
        }
        FAIL => {
            if st.failed.is_none() {
                st.failed = Some(format!("rank {rank}: {}", String::from_utf8_lossy(body)));
            }
            st.told.insert(rank);
            shared.changed.notify_all();
            vec![]
        }
        WHY => st.failed.clone().unwrap_or_default().into_bytes(),
        BYE => {
            if let Some(b) = st.beats.get_mut(&rank) {
                b.1 = true;
            }
            shared.changed.notify_all();
            vec![]
        }
        _ => vec![],
    }
}

fn split_key(body: &[u8]) -> (String, &[u8]) {
    let at = body.iter().position(|&b| b == 0).unwrap_or(body.len());
    let key = String::from_utf8_lossy(&body[..at]).into_owned();
    (key, body.get(at + 1..).unwrap_or(&[]))
}

/// A rank's connection to the store.
pub struct StoreClient {
    ctl: Mutex<TcpStream>,
    addr: String,
    pub rank: usize,
    timeout: Duration,
}

impl StoreClient {
    /// Connects to the store at `addr` (retrying until `timeout`: rank 0 may not be up yet).
    pub fn connect(addr: &str, token: &str, rank: usize, timeout: Duration) -> Result<Self> {
        let ctl = connect_retrying(addr, token, rank, Role::Store, timeout)?;
        Ok(Self {
            ctl: Mutex::new(ctl),
            addr: addr.to_string(),
            rank,
            timeout,
        })
    }

    /// A second connection of this rank to the same store, for a thread that waits on it on its
    /// own (a checkpoint writer); `timeout` bounds each of its waits.
    pub fn another(&self, token: &str, timeout: Duration) -> Result<Self> {
        Self::connect(&self.addr, token, self.rank, timeout)
    }

    fn request(&self, op: u8, body: &[u8], what: &str) -> Result<Vec<u8>> {
        let mut s = self.ctl.lock().expect("store client lock");
        let mut msg = vec![op];
        msg.extend_from_slice(body);
        write_frame(&mut *s, &msg)
            .and_then(|_| read_frame(&mut *s, MAX_CONTROL_FRAME))
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => anyhow!(
                    "timed out after {:.0} s waiting for {what} at the rendezvous store {}",
                    self.timeout.as_secs_f64(),
                    self.addr
                ),
                _ => anyhow!("lost the rendezvous store on rank 0 ({}): {e}", self.addr),
            })
    }

    pub fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let mut body = key.as_bytes().to_vec();
        body.push(0);
        body.extend_from_slice(value);
        self.request(SET, &body, key).map(|_| ())
    }

    /// The value of `key`, waiting for another rank to set it.
    pub fn get(&self, key: &str) -> Result<Vec<u8>> {
        let v = self.request(GET, key.as_bytes(), &format!("'{key}'"))?;
        if v.is_empty() {
            bail!(
                "the job failed while this rank waited for '{key}': {}",
                self.failure()?.unwrap_or_default()
            );
        }
        Ok(v)
    }

    /// The job's failure, if the store has recorded one.
    pub fn failure(&self) -> Result<Option<String>> {
        let why = self.request(WHY, &[], "the job's failure")?;
        Ok((!why.is_empty()).then(|| String::from_utf8_lossy(&why).into_owned()))
    }

    /// Fails the job with this rank's `error`: every other rank exits naming this rank and it.
    pub fn fail(&self, error: &str) -> Result<()> {
        self.request(FAIL, error.as_bytes(), "the store to record a failure")
            .map(|_| ())
    }

    pub fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let mut body = key.as_bytes().to_vec();
        body.push(0);
        body.extend_from_slice(&delta.to_le_bytes());
        let v = self.request(ADD, &body, key)?;
        Ok(i64::from_le_bytes(
            v.as_slice().try_into().unwrap_or([0; 8]),
        ))
    }

    /// Waits until `world` ranks reached the barrier `name`.
    pub fn barrier(&self, name: &str, world: usize) -> Result<()> {
        let arrived = self.add(&format!("barrier/{name}"), 1)?;
        if arrived as usize == world {
            self.set(&format!("barrier/{name}/open"), b"1")?;
        }
        self.get(&format!("barrier/{name}/open")).map(|_| ())
    }

    /// Starts this rank's heartbeat: a thread that reports to the store every
    /// [`HEARTBEAT_EVERY`] and ends the process (status 1, naming the rank that failed) as
    /// soon as the store reports a failure or is lost.
    ///
    /// `before_exit` runs before the process exits on a failure: on rank 0, which serves the
    /// store, a wait for the other ranks to hear it ([`StoreServer::told_waiter`]).
    pub fn start_heartbeat(
        &self,
        token: &str,
        before_exit: Option<Box<dyn Fn() + Send>>,
    ) -> Result<Heartbeat> {
        let mut s = connect_retrying(&self.addr, token, self.rank, Role::Heartbeat, self.timeout)?;
        s.set_read_timeout(Some(self.timeout))?;
        let writer = s.try_clone()?;
        let (me, addr) = (self.rank, self.addr.clone());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("helix-heartbeat".into())
            .spawn(move || {
                while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
                    match write_frame(&mut s, &[BEAT])
                        .and_then(|_| read_frame(&mut s, MAX_CONTROL_FRAME))
                    {
                        Ok(failed) if failed.is_empty() => {}
                        // This rank is failing the job itself and reports it.
                        Ok(_) if stop2.load(std::sync::atomic::Ordering::SeqCst) => break,
                        Ok(failed) => {
                            eprintln!(
                                "error: rank {me}: the job failed: {}; exiting",
                                String::from_utf8_lossy(&failed)
                            );
                            if let Some(wait) = &before_exit {
                                wait();
                            }
                            std::process::exit(1);
                        }
                        Err(_) if stop2.load(std::sync::atomic::Ordering::SeqCst) => break,
                        Err(e) => {
                            eprintln!(
                                "error: rank {me}: lost the rendezvous store on rank 0 ({addr}): \
                                 {e}; rank 0 exited or hangs; exiting"
                            );
                            std::process::exit(1);
                        }
                    }
                    std::thread::sleep(HEARTBEAT_EVERY);
                }
            })?;
        Ok(Heartbeat {
            writer: Mutex::new(writer),
            stop,
            thread: Some(thread),
        })
    }
}

/// A rank's running heartbeat; [`Heartbeat::goodbye`] ends it cleanly.
pub struct Heartbeat {
    writer: Mutex<TcpStream>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Heartbeat {
    /// Stops this heartbeat, and keeps it from acting on a failure it hears: the rank is
    /// about to report its own. [`Self::goodbye`] follows.
    pub fn silence(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Tells the store this rank is done (so its silence is not a failure) and stops.
    pub fn goodbye(mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut w = self.writer.lock().expect("heartbeat lock");
        let _ = write_frame(&mut *w, &[BYE]);
        let _ = read_frame(&mut *w, MAX_CONTROL_FRAME);
        let _ = w.flush();
    }
}

/// Connects and introduces this rank, retrying refused connections until `timeout`.
pub fn connect_retrying(
    addr: &str,
    token: &str,
    rank: usize,
    role: Role,
    timeout: Duration,
) -> Result<TcpStream> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    while Instant::now() < deadline {
        let target = addr
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve {addr}"))?
            .next()
            .with_context(|| format!("{addr} has no address"))?;
        match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
            Ok(mut s) => {
                s.set_nodelay(true)?;
                hello(&mut s, token, rank, role)
                    .with_context(|| format!("handshake with {addr}"))?;
                s.set_read_timeout(Some(timeout))?;
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "rank {rank}: cannot reach {addr} within {:.0} s: {}",
        timeout.as_secs_f64(),
        last.map_or("no attempt".into(), |e| e.to_string())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_barriers_and_a_wrong_token() -> Result<()> {
        let server = StoreServer::start(0, "tok", Duration::from_secs(5))?;
        let addr = format!("127.0.0.1:{}", server.addr.port());
        let a = StoreClient::connect(&addr, "tok", 0, Duration::from_secs(5))?;
        let b = StoreClient::connect(&addr, "tok", 1, Duration::from_secs(5))?;
        let waiter = std::thread::spawn(move || b.get("x").map(|v| (v, b)));
        std::thread::sleep(Duration::from_millis(50));
        a.set("x", b"hello")?;
        let (v, b) = waiter.join().unwrap()?;
        assert_eq!(v, b"hello");
        assert_eq!(a.add("n", 2)?, 2);
        assert_eq!(b.add("n", 3)?, 5);
        let t = std::thread::spawn(move || b.barrier("start", 2));
        a.barrier("start", 2)?;
        t.join().unwrap()?;
        let err = StoreClient::connect(&addr, "wrong", 2, Duration::from_secs(5))
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("wrong job token"), "{err:#}");
        Ok(())
    }

    #[test]
    fn a_rank_s_own_error_fails_the_job_and_reaches_every_rank() -> Result<()> {
        let server = StoreServer::start(0, "tok", Duration::from_secs(5))?;
        let addr = format!("127.0.0.1:{}", server.addr.port());
        let t = Duration::from_secs(5);
        let waiting = StoreClient::connect(&addr, "tok", 1, t)?;
        let failing = StoreClient::connect(&addr, "tok", 2, t)?;
        let mut beat = connect_retrying(&addr, "tok", 1, Role::Heartbeat, t)?;
        let waiter = std::thread::spawn(move || waiting.get("never-set"));
        std::thread::sleep(Duration::from_millis(50));
        failing.fail("cannot create /nfs/run: Permission denied")?;
        failing.fail("a later error")?;
        let want = "rank 2: cannot create /nfs/run: Permission denied";
        assert_eq!(server.failure().as_deref(), Some(want));
        // A rank blocked on a key hears why the job failed.
        let err = format!("{:#}", waiter.join().unwrap().unwrap_err());
        assert!(err.contains(want), "{err}");
        // Rank 0 waits for rank 1's heartbeat to hear it (rank 2 told the store itself).
        // Timed from before the thread starts, which a loaded machine may delay: the beat
        // below comes at least 300 ms after this.
        let start = Instant::now();
        let told = std::thread::spawn(move || {
            server.wait_until_told(3, Duration::from_secs(10));
            start.elapsed()
        });
        std::thread::sleep(Duration::from_millis(300));
        write_frame(&mut beat, &[BEAT])?;
        let heard = read_frame(&mut beat, MAX_CONTROL_FRAME)?;
        assert_eq!(String::from_utf8_lossy(&heard), want);
        let waited = told.join().unwrap();
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        Ok(())
    }

    #[test]
    fn a_rank_that_drops_or_goes_silent_is_named() -> Result<()> {
        let server = StoreServer::start(0, "tok", Duration::from_millis(1500))?;
        let addr = format!("127.0.0.1:{}", server.addr.port());
        // A heartbeat connection that closes without goodbye: the process died.
        let s = connect_retrying(&addr, "tok", 3, Role::Heartbeat, Duration::from_secs(5))?;
        std::thread::sleep(Duration::from_millis(100));
        drop(s);
        std::thread::sleep(Duration::from_millis(200));
        let f = server.failure().expect("a failure");
        assert!(f.contains("rank 3") && f.contains("exited"), "{f}");

        // One that stays connected but silent: hung or stopped.
        let server = StoreServer::start(0, "tok", Duration::from_millis(800))?;
        let addr = format!("127.0.0.1:{}", server.addr.port());
        let _silent = connect_retrying(&addr, "tok", 5, Role::Heartbeat, Duration::from_secs(5))?;
        let t = Instant::now();
        while server.failure().is_none() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let f = server.failure().expect("a failure");
        assert!(f.contains("rank 5 stopped responding"), "{f}");
        Ok(())
    }
}
