//! Rendezvous: rank 0 makes the group's unique id (NCCL's 128 bytes) and hands it to every
//! other rank, through a file every process can see or a TCP port on rank 0's machine.
//!
//! - File (`--rendezvous FILE`): rank 0 writes the id to a temporary name and renames it to
//!   FILE, so a reader never sees half of it; the others poll for FILE, read it and answer with
//!   `FILE.ack.R`; once every rank has answered, rank 0 removes FILE and the answers, so the
//!   next run does not find a stale id.
//! - TCP (`--rendezvous tcp://HOST:PORT`): rank 0 listens on PORT (every interface) and sends
//!   the id to each rank that connects and names itself; the others retry connecting to
//!   HOST:PORT until rank 0 is up.
//!
//! Both wait at most the given timeout, then fail saying who is missing.

use crate::error::{Error, Result};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Bytes of a group's unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const UNIQUE_ID_BYTES: usize = 128;

/// A group's unique id, made by rank 0.
pub type UniqueId = [u8; UNIQUE_ID_BYTES];

/// Starts every message and file, so that a stray connection or file is recognised.
const MAGIC: &[u8; 8] = b"SUNRDV1\n";

/// How often waiting ranks look again.
const POLL: Duration = Duration::from_millis(20);

/// Where the ranks meet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rendezvous {
    /// A file on a file system every rank sees.
    File(PathBuf),
    /// `HOST:PORT` of rank 0.
    Tcp(String),
}

impl Rendezvous {
    /// `tcp://HOST:PORT`, or else a file path.
    pub fn parse(text: &str) -> Result<Rendezvous> {
        match text.strip_prefix("tcp://") {
            Some(address) => {
                let port = address.rsplit_once(':').map(|(_, p)| p.parse::<u16>());
                match port {
                    Some(Ok(_)) => Ok(Rendezvous::Tcp(address.to_string())),
                    _ => Err(Error::invalid(format!(
                        "--rendezvous {text:?}: expected tcp://HOST:PORT"
                    ))),
                }
            }
            None if text.is_empty() => Err(Error::invalid(
                "--rendezvous: expected a file path or tcp://HOST:PORT",
            )),
            None => Ok(Rendezvous::File(PathBuf::from(text))),
        }
    }

    /// The group's id on every rank: rank 0 calls `make_id` and hands the result out (waiting
    /// until every other rank has it), the others wait for it. At most `timeout`.
    pub fn share(
        &self,
        rank: usize,
        world_size: usize,
        make_id: impl FnOnce() -> Result<UniqueId>,
        timeout: Duration,
    ) -> Result<UniqueId> {
        let deadline = Instant::now() + timeout;
        match (self, rank) {
            (Rendezvous::File(path), 0) => {
                let id = make_id()?;
                publish_file(path, &id, world_size, deadline, timeout)?;
                Ok(id)
            }
            (Rendezvous::File(path), _) => fetch_file(path, rank, deadline, timeout),
            (Rendezvous::Tcp(address), 0) => {
                let id = make_id()?;
                serve_tcp(address, &id, world_size, deadline, timeout)?;
                Ok(id)
            }
            (Rendezvous::Tcp(address), _) => fetch_tcp(address, rank, deadline, timeout),
        }
    }
}

/// `FILE.ack.R`: rank R's answer that it read the id.
fn ack_path(path: &Path, rank: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".ack.{rank}"));
    PathBuf::from(name)
}

fn publish_file(
    path: &Path,
    id: &UniqueId,
    world_size: usize,
    deadline: Instant,
    timeout: Duration,
) -> Result<()> {
    // Left by a run that died during its rendezvous.
    for stale in
        std::iter::once(path.to_path_buf()).chain((1..world_size).map(|r| ack_path(path, r)))
    {
        if stale.exists() {
            std::fs::remove_file(&stale).map_err(|e| Error::io(&stale, e))?;
        }
    }
    let mut temp = path.as_os_str().to_owned();
    temp.push(format!(".tmp.{}", std::process::id()));
    let temp = PathBuf::from(temp);
    let mut contents = MAGIC.to_vec();
    contents.extend_from_slice(id);
    std::fs::write(&temp, &contents).map_err(|e| Error::io(&temp, e))?;
    std::fs::rename(&temp, path).map_err(|e| Error::io(path, e))?;
    let mut waiting: Vec<usize> = (1..world_size).collect();
    while !waiting.is_empty() {
        waiting.retain(|&r| !ack_path(path, r).exists());
        if waiting.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            // Leave nothing behind that a later run could take for its own id.
            let _ = std::fs::remove_file(path);
            return Err(Error::invalid(format!(
                "rendezvous {}: rank(s) {} did not read the id within {}s (are they started, \
                 with the same --rendezvous and --world-size {world_size}?)",
                path.display(),
                list(&waiting),
                timeout.as_secs()
            )));
        }
        std::thread::sleep(POLL);
    }
    std::fs::remove_file(path).map_err(|e| Error::io(path, e))?;
    for r in 1..world_size {
        let ack = ack_path(path, r);
        std::fs::remove_file(&ack).map_err(|e| Error::io(&ack, e))?;
    }
    Ok(())
}

fn fetch_file(path: &Path, rank: usize, deadline: Instant, timeout: Duration) -> Result<UniqueId> {
    loop {
        // Rank 0 renames the complete file into place: it is absent or whole. Anything else
        // there (left by something else, or a stale file rank 0 is about to replace) is waited
        // past.
        let contents = std::fs::read(path).ok();
        if let Some(id) = contents.as_deref().and_then(parse_message) {
            let ack = ack_path(path, rank);
            std::fs::write(&ack, b"").map_err(|e| Error::io(&ack, e))?;
            return Ok(id);
        }
        if Instant::now() >= deadline {
            let found = if contents.is_some() {
                " (the file there is not one sun wrote: wrong --rendezvous path?)"
            } else {
                ""
            };
            return Err(Error::invalid(format!(
                "rendezvous {}: rank 0 did not publish the id within {}s{found} (is it started, \
                 with the same --rendezvous?)",
                path.display(),
                timeout.as_secs()
            )));
        }
        std::thread::sleep(POLL);
    }
}

/// The id of a `MAGIC + id` message.
fn parse_message(bytes: &[u8]) -> Option<UniqueId> {
    let rest = bytes.strip_prefix(MAGIC)?;
    rest.try_into().ok()
}

/// "1, 2, 5".
fn list(ranks: &[usize]) -> String {
    ranks
        .iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The port of `HOST:PORT`.
fn port_of(address: &str) -> Result<u16> {
    address
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .ok_or_else(|| Error::invalid(format!("--rendezvous tcp://{address}: expected HOST:PORT")))
}

fn serve_tcp(
    address: &str,
    id: &UniqueId,
    world_size: usize,
    deadline: Instant,
    timeout: Duration,
) -> Result<()> {
    let port = port_of(address)?;
    let what = format!("rendezvous tcp://{address}");
    // Every interface of HOST's address family, so that ranks on other machines reach it by
    // whatever name HOST is.
    let ipv6 = address
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| a.is_ipv6());
    let listener = if ipv6 {
        TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))
    } else {
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
    }
    .map_err(|e| Error::invalid(format!("{what}: cannot listen on port {port}: {e}")))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::invalid(format!("{what}: {e}")))?;
    let mut served = vec![false; world_size];
    served[0] = true;
    while served.iter().any(|s| !s) {
        match listener.accept() {
            // A connection that does not speak the protocol is dropped; its rank retries.
            Ok((stream, _)) => {
                if let Some(rank) = answer(stream, id, world_size) {
                    served[rank] = true;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<usize> = (0..world_size).filter(|&r| !served[r]).collect();
                    return Err(Error::invalid(format!(
                        "{what}: rank(s) {} did not connect within {}s (are they started, with \
                         the same --rendezvous and --world-size {world_size}, and can they reach \
                         this machine's port {port}?)",
                        list(&missing),
                        timeout.as_secs()
                    )));
                }
                std::thread::sleep(POLL);
            }
            Err(e) => return Err(Error::invalid(format!("{what}: accepting a rank: {e}"))),
        }
    }
    Ok(())
}

/// Reads a rank's `MAGIC + rank (u32 LE)` and sends it `MAGIC + id`; its rank on success.
fn answer(mut stream: TcpStream, id: &UniqueId, world_size: usize) -> Option<usize> {
    stream.set_nonblocking(false).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let mut hello = [0u8; 12];
    stream.read_exact(&mut hello).ok()?;
    let rank_bytes: [u8; 4] = hello.strip_prefix(MAGIC)?.try_into().ok()?;
    let rank = u32::from_le_bytes(rank_bytes) as usize;
    if rank == 0 || rank >= world_size {
        return None;
    }
    let mut reply = MAGIC.to_vec();
    reply.extend_from_slice(id);
    stream.write_all(&reply).ok()?;
    Some(rank)
}

fn fetch_tcp(address: &str, rank: usize, deadline: Instant, timeout: Duration) -> Result<UniqueId> {
    let what = format!("rendezvous tcp://{address}");
    let rank32 =
        u32::try_from(rank).map_err(|_| Error::invalid(format!("rank {rank} is too large")))?;
    loop {
        let last_error = match try_fetch(address, rank32) {
            Ok(id) => return Ok(id),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(Error::invalid(format!(
                "{what}: no id from rank 0 within {}s (is it started, with the same --rendezvous? \
                 last attempt: {last_error})",
                timeout.as_secs()
            )));
        }
        std::thread::sleep(POLL);
    }
}

/// One attempt: connect, name our rank, read the id.
fn try_fetch(address: &str, rank: u32) -> std::result::Result<UniqueId, String> {
    let addresses: Vec<SocketAddr> = address
        .to_socket_addrs()
        .map_err(|e| format!("resolving {address}: {e}"))?
        .collect();
    let mut last = format!("{address} resolves to no address");
    for socket in addresses {
        let mut stream = match TcpStream::connect_timeout(&socket, Duration::from_secs(2)) {
            Ok(stream) => stream,
            Err(e) => {
                last = format!("connecting to {socket}: {e}");
                continue;
            }
        };
        let io = |e: std::io::Error| format!("talking to {socket}: {e}");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(io)?;
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&rank.to_le_bytes());
        stream.write_all(&hello).map_err(io)?;
        let mut reply = Vec::with_capacity(MAGIC.len() + UNIQUE_ID_BYTES);
        stream.read_to_end(&mut reply).map_err(io)?;
        return parse_message(&reply)
            .ok_or_else(|| format!("{socket} answered {} bytes that are not an id", reply.len()));
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(seed: u8) -> UniqueId {
        std::array::from_fn(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
    }

    /// Runs `world` ranks as threads (rank 0 started last, so the others must wait for it)
    /// and returns what each received.
    fn run_group(rendezvous: &Rendezvous, world: usize) -> Vec<Result<UniqueId>> {
        std::thread::scope(|s| {
            let others: Vec<_> = (1..world)
                .map(|r| {
                    s.spawn(move || {
                        rendezvous.share(r, world, || unreachable!(), Duration::from_secs(20))
                    })
                })
                .collect();
            std::thread::sleep(Duration::from_millis(100));
            let lead = rendezvous.share(0, world, || Ok(id(9)), Duration::from_secs(20));
            std::iter::once(lead)
                .chain(others.into_iter().map(|h| h.join().unwrap()))
                .collect()
        })
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sun-rdv-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn parses_files_and_tcp_addresses() {
        assert_eq!(
            Rendezvous::parse("tcp://10.0.0.1:29500").unwrap(),
            Rendezvous::Tcp("10.0.0.1:29500".into())
        );
        assert_eq!(
            Rendezvous::parse("out/rdv").unwrap(),
            Rendezvous::File("out/rdv".into())
        );
        assert!(Rendezvous::parse("tcp://host").is_err());
        assert!(Rendezvous::parse("tcp://host:http").is_err());
        assert!(Rendezvous::parse("").is_err());
    }

    #[test]
    fn every_rank_gets_rank_zeros_id_through_a_file_which_is_then_removed() {
        let dir = temp_dir("file");
        let path = dir.join("rendezvous");
        // A stale file of an earlier run is replaced, not read by rank 0.
        std::fs::write(&path, b"stale").unwrap();
        let rendezvous = Rendezvous::File(path.clone());
        for got in run_group(&rendezvous, 4) {
            assert_eq!(got.unwrap(), id(9));
        }
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert!(left.is_empty(), "left behind: {left:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_rank_gets_rank_zeros_id_over_tcp() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let rendezvous = Rendezvous::Tcp(format!("127.0.0.1:{port}"));
        for got in run_group(&rendezvous, 3) {
            assert_eq!(got.unwrap(), id(9));
        }
    }

    #[test]
    fn a_missing_rank_is_a_timeout_naming_it() {
        let dir = temp_dir("timeout");
        let path = dir.join("rendezvous");
        let rendezvous = Rendezvous::File(path.clone());
        let short = Duration::from_millis(200);
        let msg = rendezvous
            .share(0, 3, || Ok(id(1)), short)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("rank(s) 1, 2 did not read the id"), "{msg}");
        assert!(
            !path.exists(),
            "the id must not outlive a failed rendezvous"
        );
        let msg = rendezvous
            .share(2, 3, || unreachable!(), short)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("rank 0 did not publish the id"), "{msg}");
        std::fs::write(&path, b"something else").unwrap();
        let msg = rendezvous
            .share(1, 3, || unreachable!(), short)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("not one sun wrote"), "{msg}");
        std::fs::remove_dir_all(&dir).unwrap();

        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let tcp = Rendezvous::Tcp(format!("127.0.0.1:{port}"));
        let msg = tcp
            .share(1, 2, || unreachable!(), short)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("no id from rank 0"), "{msg}");
        let msg = tcp
            .share(0, 2, || Ok(id(1)), short)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("rank(s) 1 did not connect"), "{msg}");
    }
}
