//! `serve`: any disk, chain or backup vmdkit reads, served read-only over NBD (fixed
//! newstyle handshake; the wire format is in `proto`).
//!
//! # What a client gets
//! `INFO`, `GO`, `EXPORT_NAME`, `LIST`, `ABORT`, structured replies, and the
//! `base:allocation` metadata context, so `nbdcopy` and `qemu-img` skip what the disk
//! does not store: unallocated ranges, zeroed grains and ZERO extents are `hole,zero`
//! (as qemu-nbd reports them). A read with
//! structured replies sends those ranges as `OFFSET_HOLE` chunks and the rest as
//! `OFFSET_DATA` chunks of at most 1 MiB. The export is read-only: writes, trims and
//! zero writes answer `EPERM`; it advertises `CAN_MULTI_CONN`, and every connection has
//! a thread of its own reading the same open chain (compressed grains inflate on the
//! connection that reads them).
//!
//! # Hostile clients
//! A client is untrusted input. Option data is capped at 64 KiB (more closes the
//! connection: it cannot be skipped without reading it), a read at 32 MiB and past the
//! end of the disk is `EINVAL`, a write's payload is read and dropped in 1 MiB pieces
//! (more than 32 MiB closes the connection), a handshake that has not finished and a
//! reply nobody reads within the client timeout (60 seconds) close the connection. Replies are
//! sent in pieces of at most 1 MiB, so a connection holds one such buffer whatever it
//! asks, and connections are capped ([`ServeOptions::max_connections`], refused past
//! it): memory stays bounded in total. A bad connection is closed; the others go on.
//! Nothing is ever written to the served files, which stay share-locked while the server
//! runs, so a commit, write or repair of them is refused meanwhile.

pub(crate) mod proto;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use byteorder::{BigEndian as BE, ByteOrder};

use crate::chain::Chain;
use crate::disk::{Alloc, VirtualDisk};
use crate::error::{Error, Result};
use crate::layer::OpenOptions;
use proto::{chunk, errno, info, opt, rep, tflag, Command, Request};

/// Most bytes one read may ask for.
pub const MAX_REQUEST: u32 = 32 << 20;
/// Most bytes of option data accepted.
pub const MAX_OPTION: u32 = 64 << 10;
/// Size of the pieces a reply is sent in.
const PIECE: u64 = 1 << 20;
/// Context ID of `base:allocation`.
const BASE_ALLOCATION: u32 = 1;

/// How to serve.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServeOptions {
    /// The export's name (the empty name is accepted too).
    pub name: String,
    /// Connections served at once; more are closed on arrival.
    pub max_connections: usize,
    /// A client that has not finished its handshake, or not taken a reply, in this time
    /// is dropped.
    pub client_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            name: String::new(),
            max_connections: 64,
            client_timeout: Duration::from_secs(60),
        }
    }
}

/// What is served: a disk read-only, or a chain whose top, a new overlay, takes the
/// writes. The files it reads stay share-locked (the overlay exclusively) while it lives,
/// so a commit, write or repair of them is refused meanwhile.
#[derive(Clone)]
pub struct Export {
    disk: Served,
    _locks: Arc<crate::guard::LockSet>,
}

#[derive(Clone)]
enum Served {
    ReadOnly(Arc<dyn VirtualDisk>),
    Overlay(Arc<crate::rw::WritableDisk>),
}

impl Export {
    /// Serve `chain` read-only: writes answer `EPERM`.
    pub fn read_only(chain: Chain) -> Result<Export> {
        let mut locks = crate::guard::LockSet::new();
        locks.shared_all(&chain.source_files())?;
        Ok(Export {
            disk: Served::ReadOnly(Arc::new(chain)),
            _locks: Arc::new(locks),
        })
    }

    /// Serve `disk` (opened with `opts`) with a new delta `overlay` on top, made now in
    /// the disk's folder (an existing file is refused), taking every write; the layers
    /// below are only read. The overlay is flushed when a client disconnects and when the
    /// process is interrupted ([`crate::cleanup::interrupted`]), and is left as a valid
    /// delta of `disk`.
    pub fn with_overlay(disk: &Path, overlay: &Path, opts: &OpenOptions) -> Result<Export> {
        let mut locks = crate::guard::LockSet::new();
        let chain = Chain::open(disk, opts)?;
        locks.shared_all(&chain.source_files())?;
        drop(chain);
        crate::ops::redo::new_overlay(disk, overlay)?;
        let w = Arc::new(crate::rw::WritableDisk::open(overlay, opts)?);
        w.chain().lock(&mut locks, 0)?;
        let flush = w.clone();
        let name = overlay.display().to_string();
        crate::guard::set_shutdown_hook(Some(Box::new(move || {
            if let Err(e) = flush.flush() {
                crate::guard::set_interrupt_note(Some(format!(
                    "the overlay's last writes could not be flushed: {e}"
                )));
            }
        })));
        crate::guard::set_interrupt_note(Some(format!(
            "stopped serving `{name}`; its writes are in the delta `{name}` (commit it, or remove it), the disk below is as it was"
        )));
        Ok(Export {
            disk: Served::Overlay(w),
            _locks: Arc::new(locks),
        })
    }

    /// The served disk's capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.disk().capacity()
    }

    /// Whether clients may write (an overlay takes the writes).
    pub fn is_writable(&self) -> bool {
        self.writable().is_some()
    }

    fn disk(&self) -> &dyn VirtualDisk {
        match &self.disk {
            Served::ReadOnly(d) => &**d,
            Served::Overlay(w) => &**w,
        }
    }

    fn writable(&self) -> Option<&crate::rw::WritableDisk> {
        match &self.disk {
            Served::ReadOnly(_) => None,
            Served::Overlay(w) => Some(w),
        }
    }
}

/// Where to listen.
#[derive(Debug)]
pub enum Listener {
    /// A Unix socket, and its path (removed when the server stops).
    Unix(std::os::unix::net::UnixListener, PathBuf),
    /// A TCP socket.
    Tcp(std::net::TcpListener),
}

impl Listener {
    /// Listen on a new Unix socket at `path` (an existing file there is refused).
    pub fn unix(path: &Path) -> Result<Listener> {
        if std::fs::symlink_metadata(path).is_ok() {
            return Err(Error::AlreadyExists(path.to_path_buf()));
        }
        let l = std::os::unix::net::UnixListener::bind(path)
            .map_err(|e| Error::io("listen on", path, 0, e))?;
        // Removed when the process is interrupted (`cleanup::interrupted`).
        crate::guard::register_temporary(path);
        Ok(Listener::Unix(l, path.to_path_buf()))
    }

    /// Listen on TCP at `addr` (`127.0.0.1:10809`, say).
    pub fn tcp(addr: &str) -> Result<Listener> {
        let l = std::net::TcpListener::bind(addr)
            .map_err(|e| Error::io("listen on", Path::new(addr), 0, e))?;
        Ok(Listener::Tcp(l))
    }

    /// The NBD URI a client connects to for the export `name`.
    pub fn uri(&self, name: &str) -> String {
        match self {
            Listener::Unix(_, p) => {
                let abs = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
                format!("nbd+unix:///{name}?socket={}", abs.display())
            }
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("nbd://{a}/{name}"),
                Err(_) => format!("nbd://localhost/{name}"),
            },
        }
    }
}

/// A connection's stream (Unix or TCP).
trait Conn: Read + Write + Send {
    fn timeouts(&self, read: Option<Duration>, write: Option<Duration>);
}

impl Conn for std::os::unix::net::UnixStream {
    fn timeouts(&self, read: Option<Duration>, write: Option<Duration>) {
        let _ = self.set_read_timeout(read);
        let _ = self.set_write_timeout(write);
    }
}

impl Conn for std::net::TcpStream {
    fn timeouts(&self, read: Option<Duration>, write: Option<Duration>) {
        let _ = self.set_read_timeout(read);
        let _ = self.set_write_timeout(write);
        let _ = self.set_nodelay(true);
    }
}

/// Serve `disk` on `listener` until the process is stopped. `on_error` hears of each
/// connection that ended in an error (a garbage handshake, a client gone mid-reply).
pub fn serve(
    export: Export,
    listener: &Listener,
    opts: &ServeOptions,
    on_error: &(dyn Fn(String) + Sync),
) -> Result<()> {
    let live = Arc::new(AtomicUsize::new(0));
    std::thread::scope(|s| {
        let accept = || -> std::io::Result<Box<dyn Conn>> {
            Ok(match listener {
                Listener::Unix(l, _) => Box::new(l.accept()?.0),
                Listener::Tcp(l) => Box::new(l.accept()?.0),
            })
        };
        loop {
            let conn = match accept() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    on_error(format!("accepting a connection: {e}"));
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            if live.fetch_add(1, Ordering::SeqCst) >= opts.max_connections {
                live.fetch_sub(1, Ordering::SeqCst);
                on_error(format!(
                    "a connection past the limit of {} was closed",
                    opts.max_connections
                ));
                continue;
            }
            let (export, live) = (export.clone(), live.clone());
            s.spawn(move || {
                let r = Session::new(conn, &export, &opts.name).run(opts.client_timeout);
                live.fetch_sub(1, Ordering::SeqCst);
                if let Err(e) = r {
                    on_error(e);
                }
            });
        }
    })
}

/// One client.
struct Session<'a> {
    conn: Box<dyn Conn>,
    disk: &'a dyn VirtualDisk,
    writable: Option<&'a crate::rw::WritableDisk>,
    name: &'a str,
    structured: bool,
    base_allocation: bool,
}

type Outcome = std::result::Result<(), String>;

fn io(what: &str) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

impl<'a> Session<'a> {
    fn new(conn: Box<dyn Conn>, export: &'a Export, name: &'a str) -> Session<'a> {
        Session {
            conn,
            disk: export.disk(),
            writable: export.writable(),
            name,
            structured: false,
            base_allocation: false,
        }
    }

    fn run(mut self, timeout: Duration) -> Outcome {
        self.conn.timeouts(Some(timeout), Some(timeout));
        if self.handshake()? {
            // An idle client (a mounted file system) may wait for long between requests.
            self.conn.timeouts(None, Some(timeout));
            self.transmission()?;
        }
        Ok(())
    }

    fn send(&mut self, b: &[u8]) -> Outcome {
        self.conn.write_all(b).map_err(io("sending"))
    }

    fn recv(&mut self, b: &mut [u8]) -> Outcome {
        self.conn.read_exact(b).map_err(io("receiving"))
    }

    fn known(&self, name: &str) -> bool {
        name.is_empty() || name == self.name
    }

    fn flags(&self) -> u16 {
        // Every connection reads and writes through the same writer, and a flush makes
        // every connection's writes durable: multi-connection holds for the overlay too.
        match self.writable {
            None => tflag::HAS_FLAGS | tflag::READ_ONLY | tflag::CAN_MULTI_CONN,
            Some(_) => {
                tflag::HAS_FLAGS
                    | tflag::SEND_FLUSH
                    | tflag::SEND_FUA
                    | tflag::SEND_TRIM
                    | tflag::SEND_WRITE_ZEROES
                    | tflag::CAN_MULTI_CONN
            }
        }
    }

    /// The handshake; `Ok(true)` when the client entered transmission.
    fn handshake(&mut self) -> std::result::Result<bool, String> {
        let mut hello = [0u8; 18];
        BE::write_u64(&mut hello[0..8], proto::NBDMAGIC);
        BE::write_u64(&mut hello[8..16], proto::IHAVEOPT);
        BE::write_u16(
            &mut hello[16..18],
            proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES,
        );
        self.send(&hello)?;
        let mut cf = [0u8; 4];
        self.recv(&mut cf)?;
        let cflags = BE::read_u32(&cf);
        if cflags & !(proto::C_FIXED_NEWSTYLE | proto::C_NO_ZEROES) != 0 {
            return Err(format!("unknown client flags {cflags:#x}"));
        }
        let no_zeroes = cflags & proto::C_NO_ZEROES != 0;
        loop {
            let mut h = [0u8; proto::OPTION_HEADER_LEN];
            self.recv(&mut h)?;
            let (option, len) = proto::parse_option_header(&h)?;
            if len > MAX_OPTION {
                // Its data cannot be skipped without reading it all: give up on it.
                let r = proto::option_reply(option, rep::ERR_TOO_BIG, b"");
                let _ = self.send(&r);
                return Err(format!("option {option} with {len} bytes of data"));
            }
            let mut data = vec![0u8; len as usize];
            self.recv(&mut data)?;
            match option {
                opt::EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data).into_owned();
                    if !self.known(&name) {
                        return Err(format!("no export named `{name}`"));
                    }
                    let mut b = self.disk.capacity().to_be_bytes().to_vec();
                    b.extend_from_slice(&self.flags().to_be_bytes());
                    if !no_zeroes {
                        b.extend_from_slice(&[0u8; 124]);
                    }
                    self.send(&b)?;
                    return Ok(true);
                }
                opt::ABORT => {
                    let _ = self.send(&proto::option_reply(option, rep::ACK, b""));
                    return Ok(false);
                }
                opt::LIST => {
                    if !data.is_empty() {
                        self.reply(option, rep::ERR_INVALID, b"LIST takes no data")?;
                        continue;
                    }
                    let mut b = (self.name.len() as u32).to_be_bytes().to_vec();
                    b.extend_from_slice(self.name.as_bytes());
                    self.reply(option, rep::SERVER, &b)?;
                    self.reply(option, rep::ACK, b"")?;
                }
                opt::INFO | opt::GO => {
                    let parsed = proto::parse_info_request(&data);
                    let Some(q) = self.for_export(option, parsed, |q| &q.name)? else {
                        continue;
                    };
                    let mut b = info::EXPORT.to_be_bytes().to_vec();
                    b.extend_from_slice(&self.disk.capacity().to_be_bytes());
                    b.extend_from_slice(&self.flags().to_be_bytes());
                    self.reply(option, rep::INFO, &b)?;
                    if q.wanted.contains(&info::NAME) {
                        let mut b = info::NAME.to_be_bytes().to_vec();
                        b.extend_from_slice(self.name.as_bytes());
                        self.reply(option, rep::INFO, &b)?;
                    }
                    if q.wanted.contains(&info::BLOCK_SIZE) {
                        let mut b = info::BLOCK_SIZE.to_be_bytes().to_vec();
                        for v in [1u32, 4096, MAX_REQUEST] {
                            b.extend_from_slice(&v.to_be_bytes());
                        }
                        self.reply(option, rep::INFO, &b)?;
                    }
                    self.reply(option, rep::ACK, b"")?;
                    if option == opt::GO {
                        return Ok(true);
                    }
                }
                opt::STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        self.reply(option, rep::ERR_INVALID, b"takes no data")?;
                        continue;
                    }
                    self.structured = true;
                    self.reply(option, rep::ACK, b"")?;
                }
                opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                    if !self.structured {
                        self.reply(option, rep::ERR_INVALID, b"structured replies first")?;
                        continue;
                    }
                    let parsed = proto::parse_meta_request(&data);
                    let Some(q) = self.for_export(option, parsed, |q| &q.name)? else {
                        continue;
                    };
                    let listing = option == opt::LIST_META_CONTEXT;
                    let base = q
                        .queries
                        .iter()
                        .any(|x| x == "base:allocation" || x == "base:")
                        || (listing && q.queries.is_empty());
                    if option == opt::SET_META_CONTEXT {
                        self.base_allocation = base;
                    }
                    if base {
                        let mut b = BASE_ALLOCATION.to_be_bytes().to_vec();
                        b.extend_from_slice(b"base:allocation");
                        self.reply(option, rep::META_CONTEXT, &b)?;
                    }
                    self.reply(option, rep::ACK, b"")?;
                }
                _ => self.reply(option, rep::ERR_UNSUP, b"")?,
            }
        }
    }

    /// Option data parsed and naming this export; otherwise the error reply is sent
    /// (`ERR_INVALID`, `ERR_UNKNOWN`) and `None` returned: the handshake goes on.
    fn for_export<T>(
        &mut self,
        option: u32,
        parsed: std::result::Result<T, String>,
        name: impl Fn(&T) -> &str,
    ) -> std::result::Result<Option<T>, String> {
        match parsed {
            Err(e) => self
                .reply(option, rep::ERR_INVALID, e.as_bytes())
                .map(|()| None),
            Ok(q) if !self.known(name(&q)) => self
                .reply(option, rep::ERR_UNKNOWN, b"no such export")
                .map(|()| None),
            Ok(q) => Ok(Some(q)),
        }
    }

    fn reply(&mut self, option: u32, kind: u32, data: &[u8]) -> Outcome {
        let b = proto::option_reply(option, kind, data);
        self.send(&b)
    }

    fn transmission(&mut self) -> Outcome {
        let mut buf = Vec::new();
        loop {
            let mut h = [0u8; proto::REQUEST_LEN];
            match self.conn.read_exact(&mut h) {
                Ok(()) => {}
                // A client that goes away without DISC.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(format!("receiving a request: {e}")),
            }
            let r = proto::parse_request(&h)?;
            match (r.command, self.writable) {
                (Command::Disc, w) => {
                    // A client that leaves cleanly has its writes kept.
                    if let Some(w) = w {
                        w.flush()
                            .map_err(|e| format!("flushing at disconnect: {e}"))?;
                    }
                    return Ok(());
                }
                (Command::Read, _) => self.read(&r, &mut buf)?,
                (Command::BlockStatus, _) => self.block_status(&r)?,
                (Command::Cache, _) | (Command::Flush, None) => self.done(&r, 0)?,
                (Command::Write, None) => {
                    self.drop_payload(&r, &mut buf)?;
                    self.fail(&r, errno::EPERM, "the export is read-only")?;
                }
                (Command::Trim | Command::WriteZeroes, None) => {
                    self.fail(&r, errno::EPERM, "the export is read-only")?
                }
                (Command::Write, Some(w)) => self.write(&r, w, &mut buf)?,
                (Command::WriteZeroes, Some(w)) => {
                    if self.in_range(&r)? {
                        let done = w
                            .write_zeroes(r.offset, u64::from(r.length))
                            .and_then(|()| self.fua(&r, w));
                        self.answer(&r, done)?;
                    }
                }
                // Trimmed space may read as anything; keeping the old bytes is allowed.
                (Command::Trim, Some(_)) => {
                    if self.in_range(&r)? {
                        self.done(&r, 0)?;
                    }
                }
                (Command::Flush, Some(w)) => {
                    let done = w.flush();
                    self.answer(&r, done)?;
                }
                (Command::Other(n), _) => self.fail(&r, errno::EINVAL, &format!("command {n}"))?,
            }
        }
    }

    /// A reply without data.
    fn done(&mut self, r: &Request, error: u32) -> Outcome {
        if self.structured && error == 0 {
            let h = proto::chunk_header(chunk::FLAG_DONE, chunk::NONE, r.cookie, 0);
            self.send(&h)
        } else {
            let h = proto::simple_reply(error, r.cookie);
            self.send(&h)
        }
    }

    fn fail(&mut self, r: &Request, error: u32, why: &str) -> Outcome {
        if self.structured {
            let b = proto::error_chunk(r.cookie, error, why);
            self.send(&b)
        } else {
            self.done(r, error)
        }
    }

    /// With the FUA flag, the request's writes are made durable before the reply.
    fn fua(&self, r: &Request, w: &crate::rw::WritableDisk) -> Result<()> {
        if r.flags & proto::CMD_FLAG_FUA != 0 {
            w.flush()?;
        }
        Ok(())
    }

    fn answer(&mut self, r: &Request, done: Result<()>) -> Outcome {
        match done {
            Ok(()) => self.done(r, 0),
            Err(e) => self.fail(r, errno::EIO, &e.to_string()),
        }
    }

    /// A write into the overlay: the payload in pieces of 1 MiB, each written as it
    /// arrives (a failure half way leaves the first pieces written, as a disk would).
    fn write(&mut self, r: &Request, w: &crate::rw::WritableDisk, buf: &mut Vec<u8>) -> Outcome {
        let cap = self.disk.capacity();
        if r.length > MAX_REQUEST
            || r.offset
                .checked_add(u64::from(r.length))
                .is_none_or(|e| e > cap)
        {
            // The payload is still on the wire: read it away (a bounded amount) first.
            self.drop_payload(r, buf)?;
            return self.fail(r, errno::EINVAL, "the range is past the end of the disk");
        }
        let mut at = r.offset;
        let end = r.offset + u64::from(r.length);
        let mut failed = None;
        while at < end {
            let n = (end - at).min(PIECE) as usize;
            buf.resize(n, 0);
            self.recv(&mut buf[..n])?;
            if failed.is_none() {
                if let Err(e) = w.write_at(&buf[..n], at) {
                    failed = Some(e);
                }
            }
            at += n as u64;
        }
        let done = match failed {
            Some(e) => Err(e),
            None => self.fua(r, w),
        };
        self.answer(r, done)
    }

    fn drop_payload(&mut self, r: &Request, buf: &mut Vec<u8>) -> Outcome {
        if r.length > MAX_REQUEST {
            return Err(format!("a write of {} bytes", r.length));
        }
        let mut left = u64::from(r.length);
        buf.resize(PIECE as usize, 0);
        while left > 0 {
            let n = left.min(PIECE) as usize;
            self.recv(&mut buf[..n])?;
            left -= n as u64;
        }
        Ok(())
    }

    /// Whether `r` asks for a range inside the disk (and not too much); answers when not.
    fn in_range(&mut self, r: &Request) -> std::result::Result<bool, String> {
        let cap = self.disk.capacity();
        if r.length == 0
            || r.offset
                .checked_add(u64::from(r.length))
                .is_none_or(|e| e > cap)
        {
            self.fail(
                r,
                errno::EINVAL,
                "the range is empty or past the end of the disk",
            )?;
            return Ok(false);
        }
        if r.length > MAX_REQUEST {
            self.fail(r, errno::EOVERFLOW, "more than 32 MiB in one request")?;
            return Ok(false);
        }
        Ok(true)
    }

    fn read(&mut self, r: &Request, buf: &mut Vec<u8>) -> Outcome {
        if !self.in_range(r)? {
            return Ok(());
        }
        let end = r.offset + u64::from(r.length);
        if !self.structured {
            // The header first, then the data in pieces; an error half way can only
            // close the connection (the client already has the header).
            let h = proto::simple_reply(0, r.cookie);
            let mut first = true;
            let mut at = r.offset;
            while at < end {
                let n = (end - at).min(PIECE) as usize;
                buf.resize(n, 0);
                if let Err(e) = read_parallel(self.disk, &mut buf[..n], at) {
                    if first {
                        return self.fail(r, errno::EIO, &e.to_string());
                    }
                    return Err(format!("reading at {at:#x}: {e}"));
                }
                if first {
                    self.send(&h)?;
                    first = false;
                }
                self.conn.write_all(&buf[..n]).map_err(io("sending"))?;
                at += n as u64;
            }
            return Ok(());
        }
        let runs = match self.disk.map(r.offset..end) {
            Ok(runs) => runs,
            Err(e) => return self.fail(r, errno::EIO, &e.to_string()),
        };
        for run in runs {
            let (a, b) = (run.start.max(r.offset), (run.start + run.len).min(end));
            if a >= b {
                continue;
            }
            if reads_zero(&run.alloc) {
                let mut c = proto::chunk_header(0, chunk::OFFSET_HOLE, r.cookie, 12).to_vec();
                c.extend_from_slice(&a.to_be_bytes());
                c.extend_from_slice(&((b - a) as u32).to_be_bytes());
                self.send(&c)?;
                continue;
            }
            let mut at = a;
            while at < b {
                let n = (b - at).min(PIECE) as usize;
                buf.resize(n, 0);
                if let Err(e) = read_parallel(self.disk, &mut buf[..n], at) {
                    return self.fail(r, errno::EIO, &e.to_string());
                }
                let h = proto::chunk_header(0, chunk::OFFSET_DATA, r.cookie, 8 + n as u32);
                self.send(&h)?;
                self.send(&at.to_be_bytes())?;
                self.conn.write_all(&buf[..n]).map_err(io("sending"))?;
                at += n as u64;
            }
        }
        self.done(r, 0)
    }

    fn block_status(&mut self, r: &Request) -> Outcome {
        if !self.base_allocation {
            return self.fail(r, errno::EINVAL, "no metadata context was selected");
        }
        // The range is clipped to the disk rather than refused when it only runs past
        // the end (the protocol lets a server answer less than asked).
        let cap = self.disk.capacity();
        if r.length == 0 || r.offset >= cap {
            return self.fail(r, errno::EINVAL, "the range is empty or past the end");
        }
        let end = r.offset.saturating_add(u64::from(r.length)).min(cap);
        let runs = match self.disk.map(r.offset..end) {
            Ok(runs) => runs,
            Err(e) => return self.fail(r, errno::EIO, &e.to_string()),
        };
        let mut desc: Vec<(u64, u32)> = Vec::new();
        for run in runs {
            let (a, b) = (run.start.max(r.offset), (run.start + run.len).min(end));
            if a >= b {
                continue;
            }
            // What is not stored reads as zeros: a hole (as qemu-nbd reports zeroed
            // grains and ZERO extents too).
            let flags = if reads_zero(&run.alloc) {
                proto::STATE_HOLE | proto::STATE_ZERO
            } else {
                0
            };
            match desc.last_mut() {
                Some((len, f)) if *f == flags => *len += b - a,
                _ => desc.push((b - a, flags)),
            }
        }
        if r.flags & proto::CMD_FLAG_REQ_ONE != 0 {
            desc.truncate(1);
        }
        let mut body = BASE_ALLOCATION.to_be_bytes().to_vec();
        for (len, flags) in desc {
            // A length is 32 bits: long runs go in several descriptors.
            let mut left = len;
            while left > 0 {
                let n = left.min(u64::from(u32::MAX) / 512 * 512);
                body.extend_from_slice(&(n as u32).to_be_bytes());
                body.extend_from_slice(&flags.to_be_bytes());
                left -= n;
            }
        }
        let h = proto::chunk_header(
            chunk::FLAG_DONE,
            chunk::BLOCK_STATUS,
            r.cookie,
            body.len() as u32,
        );
        self.send(&h)?;
        self.send(&body)
    }
}

/// Read `buf` at `at`, grain by grain in parallel (compressed grains inflate on every
/// core, not one after another on the connection's thread).
fn read_parallel(disk: &dyn VirtualDisk, buf: &mut [u8], at: u64) -> Result<()> {
    use rayon::prelude::*;
    let piece = disk.granularity().clamp(64 << 10, PIECE) as usize;
    if buf.len() <= piece {
        return disk.read_at(buf, at);
    }
    // Pieces aligned to the grains, so none inflates a grain twice.
    let head = ((piece as u64 - at % piece as u64) % piece as u64) as usize;
    let (first, rest) = buf.split_at_mut(head.min(buf.len()));
    if !first.is_empty() {
        disk.read_at(first, at)?;
    }
    let start = at + first.len() as u64;
    rest.par_chunks_mut(piece)
        .enumerate()
        .try_for_each(|(i, c)| disk.read_at(c, start + (i * piece) as u64))
}

/// Whether a run reads as zeros without being read.
fn reads_zero(a: &Alloc) -> bool {
    matches!(a, Alloc::Unallocated | Alloc::Zero | Alloc::Hole { .. })
}

#[cfg(any(test, feature = "fuzzing"))]
/// The request parsers on arbitrary bytes (the fuzz target's body).
pub(crate) fn parse_any(data: &[u8]) {
    if let Ok(h) =
        <&[u8; proto::REQUEST_LEN]>::try_from(data.get(..proto::REQUEST_LEN).unwrap_or(&[]))
    {
        let _ = proto::parse_request(h);
    }
    if let Ok(h) = <&[u8; proto::OPTION_HEADER_LEN]>::try_from(
        data.get(..proto::OPTION_HEADER_LEN).unwrap_or(&[]),
    ) {
        let _ = proto::parse_option_header(h);
    }
    let _ = proto::parse_info_request(data);
    let _ = proto::parse_meta_request(data);
}
