//! What goes over helix's TCP connections: length-prefixed frames, and a handshake in which
//! every connection presents the job's token and its rank before anything else is read.
//! Frames are capped, so garbage on the port (a scanner, another program) costs a closed
//! connection, never an allocation it asks for.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{bail, Context, Result};

const MAGIC: &[u8; 8] = b"HELIXRV1";
const ACCEPTED: u8 = 1;
const REFUSED: u8 = 0;
/// The largest frame of the store and the handshake (keys, values, tokens are small).
pub const MAX_CONTROL_FRAME: usize = 1 << 20;

/// What a connection is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// Requests to the rendezvous store.
    Store = 1,
    /// Heartbeats to the store (its own connection, so a slow request never delays one).
    Heartbeat = 2,
    /// One direction of a ring of a communicator.
    Ring = 3,
}

impl Role {
    fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(Role::Store),
            2 => Some(Role::Heartbeat),
            3 => Some(Role::Ring),
            _ => None,
        }
    }
}

pub fn write_frame(w: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    let len = u32::try_from(bytes.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame over 4 GiB"))?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(bytes)?;
    w.flush()
}

/// Reads one frame of at most `max` bytes.
pub fn read_frame(r: &mut impl Read, max: usize) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes (at most {max} expected)"),
        ));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

/// The client side: introduces this rank with the token; errors if the peer refuses.
pub fn hello(stream: &mut TcpStream, token: &str, rank: usize, role: Role) -> Result<()> {
    let mut msg = MAGIC.to_vec();
    msg.push(role as u8);
    msg.extend_from_slice(&(rank as u32).to_le_bytes());
    msg.extend_from_slice(token.as_bytes());
    write_frame(stream, &msg)?;
    let mut answer = [0u8; 1];
    stream
        .read_exact(&mut answer)
        .context("the peer closed the connection during the handshake")?;
    if answer[0] != ACCEPTED {
        bail!("the peer refused the connection: wrong job token");
    }
    Ok(())
}

/// The server side: reads the introduction (within `timeout`) and accepts it only with the
/// right token; a refused peer is told so and the connection is closed by the caller.
pub fn accept_hello(
    stream: &mut TcpStream,
    token: &str,
    timeout: Duration,
) -> Result<(usize, Role)> {
    stream.set_read_timeout(Some(timeout))?;
    let msg = read_frame(stream, MAX_CONTROL_FRAME).context("no valid handshake")?;
    let parsed = (|| {
        if msg.len() < 13 || &msg[..8] != MAGIC {
            return None;
        }
        let role = Role::from_u8(msg[8])?;
        let rank = u32::from_le_bytes(msg[9..13].try_into().ok()?) as usize;
        Some((rank, role, &msg[13..]))
    })();
    let Some((rank, role, presented)) = parsed else {
        let _ = stream.write_all(&[REFUSED]);
        bail!("not a helix handshake");
    };
    if !constant_time_eq(presented, token.as_bytes()) {
        let _ = stream.write_all(&[REFUSED]);
        bail!("wrong job token (claimed rank {rank})");
    }
    stream.write_all(&[ACCEPTED])?;
    Ok((rank, role))
}

/// Equality whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn the_right_token_is_accepted_and_a_wrong_one_refused() -> Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let server = std::thread::spawn(move || {
            let mut out = Vec::new();
            for _ in 0..3 {
                let (mut s, _) = listener.accept().unwrap();
                out.push(
                    accept_hello(&mut s, "secret", Duration::from_secs(5))
                        .map_err(|e| e.to_string()),
                );
            }
            out
        });
        let mut ok = TcpStream::connect(addr)?;
        hello(&mut ok, "secret", 3, Role::Ring)?;
        let mut bad = TcpStream::connect(addr)?;
        let err = hello(&mut bad, "guess", 1, Role::Store).unwrap_err();
        assert!(err.to_string().contains("wrong job token"), "{err}");
        let mut junk = TcpStream::connect(addr)?;
        junk.write_all(&[0xff; 4])?; // claims a 4 GiB frame
        let results = server.join().unwrap();
        assert_eq!(results[0], Ok((3, Role::Ring)));
        assert!(results[1].as_ref().unwrap_err().contains("wrong job token"));
        assert!(results[2].is_err());
        Ok(())
    }
}
