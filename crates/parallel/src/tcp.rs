//! The CPU backend: the ranks of a group talk over TCP in a ring (on loopback or a LAN). Each
//! rank connects to the next one and accepts the previous one; both connections present the
//! job's token. Collectives are the bandwidth-optimal ring algorithms (all-reduce as a
//! reduce-scatter then an all-gather), so every rank ends with bit-identical results.
//!
//! Every read has the job's timeout, and a peer that closes its connection is named, so a
//! collective never waits forever.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::ops::Range;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::store::{connect_retrying, StoreClient};
use crate::wire::{accept_hello, Role};

/// A group of ranks joined in a ring.
pub struct TcpRing {
    /// Position in the group, and the group's size.
    pub index: usize,
    pub size: usize,
    /// Global ranks of the group, by position.
    pub ranks: Vec<usize>,
    next: Option<Mutex<TcpStream>>,
    prev: Option<Mutex<TcpStream>>,
    name: String,
}

/// The address other hosts reach this one at: the interface that routes to `toward` (no packet
/// is sent; connecting a UDP socket only picks the route).
fn local_ip_toward(toward: &str) -> Result<std::net::IpAddr> {
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    let target = if toward.contains(':') {
        toward.to_string()
    } else {
        format!("{toward}:9")
    };
    sock.connect(&target)
        .with_context(|| format!("no route to {toward}"))?;
    Ok(sock.local_addr()?.ip())
}

impl TcpRing {
    /// The group of this process alone: every collective returns its input.
    pub fn solo() -> Self {
        Self {
            index: 0,
            size: 1,
            ranks: vec![0],
            next: None,
            prev: None,
            name: "solo".into(),
        }
    }

    /// Joins the ring `name` of the global `ranks` (this process is `me`), exchanging addresses
    /// through the store. `master` is the store's address (to pick the interface to listen on).
    pub fn join(
        store: &StoreClient,
        name: &str,
        ranks: &[usize],
        me: usize,
        token: &str,
        master: &str,
        timeout: Duration,
    ) -> Result<Self> {
        let index = ranks
            .iter()
            .position(|&r| r == me)
            .with_context(|| format!("rank {me} is not in group {name} {ranks:?}"))?;
        let size = ranks.len();
        if size == 1 {
            return Ok(Self {
                index,
                size,
                ranks: ranks.to_vec(),
                next: None,
                prev: None,
                name: name.into(),
            });
        }
        let ip = local_ip_toward(master)?;
        let listener = TcpListener::bind((ip, 0))
            .with_context(|| format!("cannot listen on {ip} for ring {name}"))?;
        let here = listener.local_addr()?;
        store.set(&format!("ring/{name}/{index}"), here.to_string().as_bytes())?;
        let next_index = (index + 1) % size;
        let prev_rank = ranks[(index + size - 1) % size];
        let next_addr = String::from_utf8(store.get(&format!("ring/{name}/{next_index}"))?)
            .context("a ring address is not text")?;
        // Connect out and accept in at the same time: with two ranks each waits on the other.
        let (next, prev) = std::thread::scope(|s| {
            let out = s.spawn(|| connect_retrying(&next_addr, token, me, Role::Ring, timeout));
            let inc = accept_from(&listener, token, prev_rank, timeout, name);
            (out.join().expect("connect thread"), inc)
        });
        let (next, prev) = (next?, prev?);
        for s in [&next, &prev] {
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))?;
        }
        Ok(Self {
            index,
            size,
            ranks: ranks.to_vec(),
            next: Some(Mutex::new(next)),
            prev: Some(Mutex::new(prev)),
            name: name.into(),
        })
    }

    /// Sends `out` to the next rank while receiving `len` bytes from the previous one.
    fn exchange(&self, out: &[u8], len: usize) -> Result<Vec<u8>> {
        let (Some(next), Some(prev)) = (&self.next, &self.prev) else {
            return Ok(out.to_vec());
        };
        let next_rank = self.ranks[(self.index + 1) % self.size];
        let prev_rank = self.ranks[(self.index + self.size - 1) % self.size];
        let mut buf = vec![0u8; len];
        std::thread::scope(|s| -> Result<()> {
            let sender = s.spawn(|| {
                next.lock()
                    .expect("ring lock")
                    .write_all(out)
                    .map_err(|e| self.peer_error(next_rank, "sending to", e))
            });
            let got = prev
                .lock()
                .expect("ring lock")
                .read_exact(&mut buf)
                .map_err(|e| self.peer_error(prev_rank, "receiving from", e));
            sender.join().expect("send thread")?;
            got
        })?;
        Ok(buf)
    }

    fn peer_error(&self, rank: usize, what: &str, e: std::io::Error) -> anyhow::Error {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => anyhow!(
                "ring {}: timed out {what} rank {rank} (hung or stopped?)",
                self.name
            ),
            _ => anyhow!(
                "ring {}: lost rank {rank} while {what} it ({e}): it exited or crashed",
                self.name
            ),
        }
    }

    /// Sums `data` over the group in place (every rank ends with the same bits).
    pub fn all_reduce_sum<T: Elem>(&self, data: &mut [T]) -> Result<()> {
        self.all_reduce(data, T::add)
    }

    /// Elementwise maximum over the group, in place.
    pub fn all_reduce_max<T: Elem>(&self, data: &mut [T]) -> Result<()> {
        self.all_reduce(data, T::max)
    }

    fn all_reduce<T: Elem>(&self, data: &mut [T], op: fn(T, T) -> T) -> Result<()> {
        if self.size == 1 {
            return Ok(());
        }
        let parts = chunk_bounds(data.len(), self.size);
        self.reduce_scatter(data, &parts, op)?;
        self.all_gather_parts(data, &parts)
    }

    /// Sums `data` over the group so that rank r ends with the full sum of its part
    /// `parts[r]` (the rest of `data` holds partial sums). `parts` are one range per rank, in
    /// any sizes, empty ones included: ZeRO-1 gives each rank the gradients of the parameters
    /// it owns.
    pub fn reduce_scatter_sum<T: Elem>(
        &self,
        data: &mut [T],
        parts: &[Range<usize>],
    ) -> Result<()> {
        self.reduce_scatter(data, parts, T::add)
    }

    fn reduce_scatter<T: Elem>(
        &self,
        data: &mut [T],
        parts: &[Range<usize>],
        op: fn(T, T) -> T,
    ) -> Result<()> {
        let (n, r) = (self.size, self.index);
        check_parts(parts, n, data.len())?;
        // Step s: pass on the partial sum of part r − s − 1, add the one of part r − s − 2
        // from the previous rank; after n − 1 steps part r has every rank's term.
        for s in 0..n.saturating_sub(1) {
            let send = &parts[(r + 2 * n - s - 1) % n];
            let recv = &parts[(r + 2 * n - s - 2) % n];
            let got = self.exchange(&T::to_bytes(&data[send.clone()]), recv.len() * T::SIZE)?;
            for (d, x) in data[recv.clone()].iter_mut().zip(T::from_bytes(&got)) {
                *d = op(*d, x);
            }
        }
        Ok(())
    }

    /// Every rank's part of `data` from that rank (`parts` as for
    /// [`Self::reduce_scatter_sum`]): afterwards all ranks hold the same `data`.
    pub fn all_gather_parts<T: Elem>(&self, data: &mut [T], parts: &[Range<usize>]) -> Result<()> {
        let (n, r) = (self.size, self.index);
        check_parts(parts, n, data.len())?;
        for s in 0..n.saturating_sub(1) {
            let send = &parts[(r + n - s) % n];
            let recv = &parts[(r + 2 * n - s - 1) % n];
            let got = self.exchange(&T::to_bytes(&data[send.clone()]), recv.len() * T::SIZE)?;
            data[recv.clone()].copy_from_slice(&T::from_bytes(&got));
        }
        Ok(())
    }

    /// Every rank's `part` (equal lengths), concatenated in group order.
    pub fn all_gather<T: Elem>(&self, part: &[T]) -> Result<Vec<T>> {
        let (n, len, r) = (self.size, part.len(), self.index);
        let mut out = vec![T::default(); n * len];
        out[r * len..(r + 1) * len].copy_from_slice(part);
        let parts: Vec<Range<usize>> = (0..n).map(|k| k * len..(k + 1) * len).collect();
        self.all_gather_parts(&mut out, &parts)?;
        Ok(out)
    }

    /// `root`'s `data` on every rank.
    pub fn broadcast<T: Elem>(&self, data: &mut [T], root: usize) -> Result<()> {
        let n = self.size;
        if n == 1 {
            return Ok(());
        }
        // Passed along the ring from the root; the rank before the root does not forward.
        let dist = (self.index + n - root) % n;
        if dist > 0 {
            let prev = self.prev.as_ref().expect("n > 1");
            let mut buf = vec![0u8; data.len() * T::SIZE];
            let prev_rank = self.ranks[(self.index + n - 1) % n];
            prev.lock()
                .expect("ring lock")
                .read_exact(&mut buf)
                .map_err(|e| self.peer_error(prev_rank, "receiving from", e))?;
            data.copy_from_slice(&T::from_bytes(&buf));
        }
        if dist < n - 1 {
            let next_rank = self.ranks[(self.index + 1) % n];
            self.next
                .as_ref()
                .expect("n > 1")
                .lock()
                .expect("ring lock")
                .write_all(&T::to_bytes(data))
                .map_err(|e| self.peer_error(next_rank, "sending to", e))?;
        }
        Ok(())
    }

    /// Returns when every rank of the group has called it.
    pub fn barrier(&self) -> Result<()> {
        self.all_reduce_sum(&mut [1f64])
    }
}

/// Accepts the previous rank of the ring, refusing anything else until `timeout`.
fn accept_from(
    listener: &TcpListener,
    token: &str,
    expected: usize,
    timeout: Duration,
    name: &str,
) -> Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match listener.accept() {
            Ok((mut s, peer)) => {
                s.set_nonblocking(false)?;
                match accept_hello(&mut s, token, timeout) {
                    Ok((rank, Role::Ring)) if rank == expected => return Ok(s),
                    Ok((rank, role)) => eprintln!(
                        "ring {name}: refused rank {rank} ({role:?}) from {peer}: expected rank \
                         {expected}"
                    ),
                    Err(e) => eprintln!("ring {name}: refused a connection from {peer}: {e:#}"),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => return Err(e).context("accepting a ring connection"),
        }
    }
    bail!(
        "ring {name}: rank {expected} did not connect within {:.0} s",
        timeout.as_secs_f64()
    )
}

/// Chunk `i` of `len` elements split `n` ways (the first `len % n` chunks one longer).
/// `parts` must be one range per rank, in order, covering `0..len`.
fn check_parts(parts: &[Range<usize>], n: usize, len: usize) -> Result<()> {
    let contiguous = parts.windows(2).all(|w| w[0].end == w[1].start);
    if parts.len() != n || !contiguous || parts.first().map_or(0, |p| p.start) != 0 {
        bail!(
            "{} parts for {n} ranks do not tile the buffer in order",
            parts.len()
        );
    }
    if parts.last().map_or(0, |p| p.end) != len {
        bail!(
            "the parts end at {:?}, the buffer at {len}",
            parts.last().map(|p| p.end)
        );
    }
    Ok(())
}

fn chunk_bounds(len: usize, n: usize) -> Vec<Range<usize>> {
    let (base, extra) = (len / n, len % n);
    let mut start = 0;
    (0..n)
        .map(|i| {
            let l = base + usize::from(i < extra);
            let r = start..start + l;
            start += l;
            r
        })
        .collect()
}

/// Element types the ring moves: little-endian bytes and a sum.
pub trait Elem: Copy + Default + Send + Sync + PartialOrd {
    const SIZE: usize;
    fn add(self, other: Self) -> Self;
    fn max(self, other: Self) -> Self {
        if other > self {
            other
        } else {
            self
        }
    }
    fn to_bytes(xs: &[Self]) -> Vec<u8>;
    fn from_bytes(b: &[u8]) -> Vec<Self>;
}

macro_rules! elem {
    ($t:ty, $add:expr) => {
        impl Elem for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn add(self, other: Self) -> Self {
                $add(self, other)
            }
            fn to_bytes(xs: &[Self]) -> Vec<u8> {
                xs.iter().flat_map(|x| x.to_le_bytes()).collect()
            }
            fn from_bytes(b: &[u8]) -> Vec<Self> {
                b.chunks_exact(Self::SIZE)
                    .map(|c| <$t>::from_le_bytes(c.try_into().expect("chunk size")))
                    .collect()
            }
        }
    };
}
elem!(f32, |a: f32, b| a + b);
elem!(f64, |a: f64, b| a + b);
elem!(u64, u64::wrapping_add);
elem!(u8, u8::wrapping_add);

/// Tensor collectives for tensor parallelism, over the ring (tensors travel as f32 and come
/// back in their own dtype).
impl helix_ops::Collective for TcpRing {
    fn rank(&self) -> usize {
        self.index
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, t: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
        self.reduce_tensor(t, false)
    }

    fn all_reduce_max(&self, t: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
        self.reduce_tensor(t, true)
    }

    fn all_gather(
        &self,
        t: &candle_core::Tensor,
        dim: usize,
    ) -> candle_core::Result<candle_core::Tensor> {
        if self.size == 1 {
            return Ok(t.clone());
        }
        let (dtype, dev) = (t.dtype(), t.device().clone());
        let flat = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let all = TcpRing::all_gather(self, &flat).map_err(to_candle)?;
        let n = flat.len();
        let parts = (0..self.size)
            .map(|r| candle_core::Tensor::from_slice(&all[r * n..(r + 1) * n], t.shape(), &dev))
            .collect::<candle_core::Result<Vec<_>>>()?;
        candle_core::Tensor::cat(&parts, dim)?.to_dtype(dtype)
    }

    fn reduce_scatter_sum(
        &self,
        t: &candle_core::Tensor,
    ) -> candle_core::Result<candle_core::Tensor> {
        if self.size == 1 {
            return Ok(t.clone());
        }
        let (dtype, dev) = (t.dtype(), t.device().clone());
        let mut dims = t.dims().to_vec();
        if dims.is_empty() || !dims[0].is_multiple_of(self.size) {
            candle_core::bail!("reduce-scatter of {dims:?} over {} ranks", self.size);
        }
        let mut flat = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let n = flat.len() / self.size;
        let parts: Vec<Range<usize>> = (0..self.size).map(|r| r * n..(r + 1) * n).collect();
        TcpRing::reduce_scatter_sum(self, &mut flat, &parts).map_err(to_candle)?;
        dims[0] /= self.size;
        let mine = flat[parts[self.index].clone()].to_vec();
        candle_core::Tensor::from_vec(mine, dims, &dev)?.to_dtype(dtype)
    }
}

impl TcpRing {
    fn reduce_tensor(
        &self,
        t: &candle_core::Tensor,
        max: bool,
    ) -> candle_core::Result<candle_core::Tensor> {
        if self.size == 1 {
            return Ok(t.clone());
        }
        let (dtype, dev) = (t.dtype(), t.device().clone());
        let mut flat = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        match max {
            true => self.all_reduce_max(&mut flat),
            false => self.all_reduce_sum(&mut flat),
        }
        .map_err(to_candle)?;
        candle_core::Tensor::from_vec(flat, t.shape(), &dev)?.to_dtype(dtype)
    }
}

fn to_candle(e: anyhow::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("{e:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreServer;

    /// `world` ranks on threads, each with its own sockets through a real store.
    fn ranks<T: Send + 'static>(
        world: usize,
        f: impl Fn(TcpRing) -> Result<T> + Send + Sync + Copy + 'static,
    ) -> Vec<T> {
        let t = Duration::from_secs(20);
        let server = StoreServer::start(0, "tok", t).unwrap();
        let addr = format!("127.0.0.1:{}", server.addr.port());
        let all: Vec<usize> = (0..world).collect();
        let handles: Vec<_> = (0..world)
            .map(|r| {
                let (addr, all) = (addr.clone(), all.clone());
                std::thread::spawn(move || {
                    let store = StoreClient::connect(&addr, "tok", r, t)?;
                    f(TcpRing::join(&store, "g", &all, r, "tok", "127.0.0.1", t)?)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect()
    }

    #[test]
    fn ring_collectives_give_every_rank_the_same_result() {
        for world in [2, 3] {
            let out = ranks(world, |ring| {
                let r = ring.index;
                // 10 elements do not split evenly over 3 ranks.
                let mut data: Vec<f32> = (0..10).map(|i| (i * (r + 1)) as f32 + 0.1).collect();
                ring.all_reduce_sum(&mut data)?;
                let gathered = ring.all_gather(&[r as f64, 10.0 * r as f64])?;
                let mut b = [if r == 1 { 42u64 } else { 0 }];
                ring.broadcast(&mut b, 1)?;
                ring.barrier()?;
                Ok((data, gathered, b[0]))
            });
            let ranks_sum: f32 = (1..=world).map(|k| k as f32).sum();
            for (data, gathered, b) in &out {
                let want: Vec<f32> = (0..10)
                    .map(|i| i as f32 * ranks_sum + 0.1 * world as f32)
                    .collect();
                for (x, w) in data.iter().zip(&want) {
                    assert!((x - w).abs() < 1e-4, "{x} vs {w}");
                }
                assert_eq!(data, &out[0].0, "bit-identical on every rank");
                let want: Vec<f64> = (0..world)
                    .flat_map(|r| [r as f64, 10.0 * r as f64])
                    .collect();
                assert_eq!(gathered, &want);
                assert_eq!(*b, 42);
            }
        }
    }

    #[test]
    fn reduce_scatter_leaves_each_rank_the_sum_of_its_part_and_all_gather_shares_them() {
        // Uneven parts, an empty one among them: ZeRO-1's owners hold different amounts.
        for (world, cuts) in [
            (2, &[0, 3, 11][..]),
            (3, &[0, 5, 5, 11][..]),
            (3, &[0, 0, 1, 11][..]),
        ] {
            let out = ranks(world, move |ring| {
                let r = ring.index;
                let parts: Vec<Range<usize>> = cuts.windows(2).map(|w| w[0]..w[1]).collect();
                let mut data: Vec<f64> = (0..11).map(|i| (i * 10 + r) as f64).collect();
                ring.reduce_scatter_sum(&mut data, &parts)?;
                let mine = data[parts[r].clone()].to_vec();
                // Each rank then puts its own marker in its part; all-gather spreads them.
                for x in &mut data[parts[r].clone()] {
                    *x += 1000.0 * (r + 1) as f64;
                }
                ring.all_gather_parts(&mut data, &parts)?;
                Ok((mine, parts, data))
            });
            let total = |i: usize| (0..world).map(|r| (i * 10 + r) as f64).sum::<f64>();
            for (r, (mine, parts, _)) in out.iter().enumerate() {
                let want: Vec<f64> = parts[r].clone().map(total).collect();
                assert_eq!(mine, &want, "rank {r} of {world}");
            }
            let gathered: Vec<f64> = (0..11)
                .map(|i| {
                    let owner = out[0].1.iter().position(|p| p.contains(&i)).unwrap();
                    total(i) + 1000.0 * (owner + 1) as f64
                })
                .collect();
            for (_, _, data) in &out {
                assert_eq!(data, &gathered);
            }
        }
        let err = ranks(2, |ring| {
            Ok(ring
                .reduce_scatter_sum(&mut [0f32; 4], &[0..1, 2..4])
                .is_err())
        });
        assert_eq!(err, vec![true, true], "parts with a gap are refused");
    }
}
