//! The NBD protocol's wire format (the NBD protocol document, `doc/proto.md`; facts in
//! `docs/nbd.md`): the fixed newstyle handshake, options and their replies, requests,
//! simple and structured replies. Only types and byte layouts live here; what the
//! server does with them is in [`super`]. Every parser takes the bytes it is given and
//! checks every length against them (the `serve` fuzz target runs them on garbage).

use byteorder::{BigEndian as BE, ByteOrder};

/// `NBDMAGIC`, the first 8 bytes a server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, and the start of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Option reply magic.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Request magic.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Simple reply magic.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Structured reply chunk magic.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// Handshake flag: no 124 zero bytes after `EXPORT_NAME`'s reply.
pub const FLAG_NO_ZEROES: u16 = 2;
/// Client flags.
pub const C_FIXED_NEWSTYLE: u32 = 1;
/// Client flag: no zeroes.
pub const C_NO_ZEROES: u32 = 2;

/// Transmission flags.
pub mod tflag {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// FLUSH is understood.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// The FUA flag is understood.
    pub const SEND_FUA: u16 = 1 << 3;
    /// TRIM is understood.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// WRITE_ZEROES is understood.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// Many connections see the same data, and a flush on one covers all.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
}

/// Option numbers.
pub mod opt {
    /// Old-style selection: reply is size and flags, then transmission.
    pub const EXPORT_NAME: u32 = 1;
    /// End the handshake.
    pub const ABORT: u32 = 2;
    /// List the exports.
    pub const LIST: u32 = 3;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe and select an export.
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types.
pub mod rep {
    /// Done.
    pub const ACK: u32 = 1;
    /// One export of `LIST`.
    pub const SERVER: u32 = 2;
    /// One information item of `INFO`/`GO`.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    /// Unknown option.
    pub const ERR_UNSUP: u32 = (1 << 31) + 1;
    /// Invalid option data.
    pub const ERR_INVALID: u32 = (1 << 31) + 3;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;
    /// Option data too large.
    pub const ERR_TOO_BIG: u32 = (1 << 31) + 9;
}

/// `INFO`/`GO` information types.
pub mod info {
    /// Size and transmission flags (always sent).
    pub const EXPORT: u16 = 0;
    /// The export's name.
    pub const NAME: u16 = 1;
    /// Block size constraints.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read `length` bytes.
    Read,
    /// Write (its payload follows the request).
    Write,
    /// Disconnect.
    Disc,
    /// Make writes durable.
    Flush,
    /// Discard.
    Trim,
    /// Prefetch.
    Cache,
    /// Write zeros.
    WriteZeroes,
    /// Allocation status.
    BlockStatus,
    /// Anything else.
    Other(u16),
}

impl Command {
    fn of(t: u16) -> Command {
        match t {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            n => Command::Other(n),
        }
    }
}

/// Command flag: force unit access (durable before the reply).
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: only one block status extent wanted.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// Errors a reply carries (the protocol's numbers).
pub mod errno {
    /// Not permitted (a write into a read-only export).
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Invalid request (out of range, bad flags).
    pub const EINVAL: u32 = 22;
    /// Request too large.
    pub const EOVERFLOW: u32 = 75;
}

/// Structured reply chunk types.
pub mod chunk {
    /// Nothing (used for a final `DONE`).
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// Zeros at an offset.
    pub const OFFSET_HOLE: u16 = 2;
    /// Block status descriptors.
    pub const BLOCK_STATUS: u16 = 5;
    /// An error.
    pub const ERROR: u16 = (1 << 15) + 1;
    /// Flag: the last chunk of the reply.
    pub const FLAG_DONE: u16 = 1;
}

/// `base:allocation` flags.
pub const STATE_HOLE: u32 = 1;
/// Reads as zeros.
pub const STATE_ZERO: u32 = 2;

/// A transmission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// The command.
    pub command: Command,
    /// The client's cookie, echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte count.
    pub length: u32,
}

/// Size of a request header.
pub const REQUEST_LEN: usize = 28;

/// Parse a request header.
pub fn parse_request(b: &[u8; REQUEST_LEN]) -> Result<Request, String> {
    let magic = BE::read_u32(&b[0..4]);
    if magic != REQUEST_MAGIC {
        return Err(format!("bad request magic {magic:#x}"));
    }
    Ok(Request {
        flags: BE::read_u16(&b[4..6]),
        command: Command::of(BE::read_u16(&b[6..8])),
        cookie: BE::read_u64(&b[8..16]),
        offset: BE::read_u64(&b[16..24]),
        length: BE::read_u32(&b[24..28]),
    })
}

/// An option's header (after `IHAVEOPT`): the option and its data's length.
pub const OPTION_HEADER_LEN: usize = 16;

/// Parse an option header: `IHAVEOPT`, option, data length.
pub fn parse_option_header(b: &[u8; OPTION_HEADER_LEN]) -> Result<(u32, u32), String> {
    let magic = BE::read_u64(&b[0..8]);
    if magic != IHAVEOPT {
        return Err(format!("bad option magic {magic:#x}"));
    }
    Ok((BE::read_u32(&b[8..12]), BE::read_u32(&b[12..16])))
}

/// What `INFO` and `GO` ask: an export name and information types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// The export's name.
    pub name: String,
    /// Information types asked for.
    pub wanted: Vec<u16>,
}

/// Parse `INFO`/`GO` data: u32 name length, name, u16 count, u16 types.
pub fn parse_info_request(d: &[u8]) -> Result<InfoRequest, String> {
    let mut c = Cursor(d);
    let n = c.u32()? as usize;
    let name = String::from_utf8_lossy(c.take(n)?).into_owned();
    let count = c.u16()? as usize;
    let mut wanted = Vec::with_capacity(count.min(d.len() / 2));
    for _ in 0..count {
        wanted.push(c.u16()?);
    }
    c.end()?;
    Ok(InfoRequest { name, wanted })
}

/// What `LIST_META_CONTEXT`/`SET_META_CONTEXT` ask: an export name and queries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    /// The export's name.
    pub name: String,
    /// The queries (`base:allocation`, `base:`).
    pub queries: Vec<String>,
}

/// Parse meta context option data: u32 name length, name, u32 count, each u32 length +
/// query.
pub fn parse_meta_request(d: &[u8]) -> Result<MetaRequest, String> {
    let mut c = Cursor(d);
    let n = c.u32()? as usize;
    let name = String::from_utf8_lossy(c.take(n)?).into_owned();
    let count = c.u32()? as usize;
    let mut queries = Vec::with_capacity(count.min(d.len() / 4));
    for _ in 0..count {
        let n = c.u32()? as usize;
        queries.push(String::from_utf8_lossy(c.take(n)?).into_owned());
    }
    c.end()?;
    Ok(MetaRequest { name, queries })
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.0.len() {
            return Err(format!(
                "a field of {n} bytes where {} are left",
                self.0.len()
            ));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, String> {
        self.take(2).map(BE::read_u16)
    }
    fn u32(&mut self) -> Result<u32, String> {
        self.take(4).map(BE::read_u32)
    }
    fn end(&self) -> Result<(), String> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(format!("{} bytes past the end of the data", self.0.len()))
        }
    }
}

/// An option reply: magic, option, type, length, data.
pub fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 16];
    BE::write_u64(&mut b[0..8], REPLY_MAGIC);
    BE::write_u32(&mut b[8..12], option);
    BE::write_u32(&mut b[12..16], kind);
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// A simple reply header: magic, error, cookie.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    BE::write_u32(&mut b[0..4], SIMPLE_REPLY_MAGIC);
    BE::write_u32(&mut b[4..8], error);
    BE::write_u64(&mut b[8..16], cookie);
    b
}

/// A structured reply chunk header: magic, flags, type, cookie, payload length.
pub fn chunk_header(flags: u16, kind: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    BE::write_u32(&mut b[0..4], STRUCTURED_REPLY_MAGIC);
    BE::write_u16(&mut b[4..6], flags);
    BE::write_u16(&mut b[6..8], kind);
    BE::write_u64(&mut b[8..16], cookie);
    BE::write_u32(&mut b[16..20], len);
    b
}

/// A structured error chunk (the last of its reply): error, message.
pub fn error_chunk(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(4096)];
    let mut b = chunk_header(chunk::FLAG_DONE, chunk::ERROR, cookie, 6 + msg.len() as u32).to_vec();
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    b.extend_from_slice(msg);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_option_data_parse_and_refuse_short_fields() {
        let mut r = [0u8; REQUEST_LEN];
        BE::write_u32(&mut r[0..4], REQUEST_MAGIC);
        BE::write_u16(&mut r[6..8], 7);
        BE::write_u64(&mut r[8..16], 42);
        BE::write_u64(&mut r[16..24], 4096);
        BE::write_u32(&mut r[24..28], 512);
        let q = parse_request(&r).unwrap();
        assert_eq!(
            (q.command, q.cookie, q.offset, q.length),
            (Command::BlockStatus, 42, 4096, 512)
        );
        r[0] = 0;
        assert!(parse_request(&r).is_err());
        // INFO data: name "x", two info types.
        let d = [0, 0, 0, 1, b'x', 0, 2, 0, 0, 0, 3];
        assert_eq!(
            parse_info_request(&d).unwrap(),
            InfoRequest {
                name: "x".into(),
                wanted: vec![0, 3]
            }
        );
        // A name length past the data, a count past it, trailing bytes: refused.
        assert!(parse_info_request(&[0, 0, 0, 9, b'x']).is_err());
        assert!(parse_info_request(&[0, 0, 0, 0, 0, 5]).is_err());
        assert!(parse_info_request(&[0, 0, 0, 0, 0, 0, 1]).is_err());
        let m = [
            0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 5, b'b', b'a', b's', b'e', b':',
        ];
        assert_eq!(parse_meta_request(&m).unwrap().queries, vec!["base:"]);
        assert!(parse_meta_request(&[0, 0, 0, 0, 255, 255, 255, 255]).is_err());
    }
}
