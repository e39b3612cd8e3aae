//! Content pushed from a pipe ([`Feed`]): a stream, a tables-first sparse file, export's
//! tar stream, or raw bytes, read strictly sequentially from stdin. `import -` and
//! `verify -` run on it.

use std::io::Read;
use std::path::Path;

use super::{Feed, Unit};
use crate::copy::{self as pipeline, is_zero};
use crate::error::{Error, Result};
use crate::format::descriptor::Descriptor;
use crate::format::sparse::SECTOR;
use crate::format::stream::pipe::{self as stream_in, Counted};

/// Groups ascending `(offset, bytes)` pieces into 1 MiB units.
struct Units<'a> {
    /// The unit being filled: its start, its buffer, and how far it is filled (pieces
    /// come in ascending order; what they skip is zeroed as they go, not beforehand).
    unit: Option<(u64, Vec<u8>, usize)>,
    cap: u64,
    put: &'a mut dyn FnMut(Unit, Vec<u8>) -> Result<()>,
}

impl Units<'_> {
    fn piece(&mut self, mut off: u64, mut data: &[u8]) -> Result<()> {
        const U: u64 = pipeline::DEFAULT_UNIT;
        while !data.is_empty() {
            if off >= self.cap {
                return Err(Error::InvalidInput(format!(
                    "stream data at {off:#x} lies past the capacity {:#x}",
                    self.cap
                )));
            }
            let ustart = off / U * U;
            match &self.unit {
                Some((s, _, _)) if *s == ustart => {}
                Some((s, _, _)) if *s > ustart => {
                    return Err(Error::InvalidInput("stream data out of order".into()));
                }
                _ => {
                    self.flush()?;
                    let len = (self.cap - ustart).min(U);
                    // A recycled buffer (fresh 1 MiB buffers cost page faults and
                    // clearing).
                    self.unit = Some((ustart, pipeline::buffers::take(len as usize), 0));
                }
            }
            let (s, buf, filled) = self.unit.as_mut().expect("set");
            let o = (off - *s) as usize;
            if o < *filled {
                return Err(Error::InvalidInput("stream data out of order".into()));
            }
            // What no piece covers reads as zeros.
            buf[*filled..o].fill(0);
            let n = data.len().min(buf.len() - o);
            buf[o..o + n].copy_from_slice(&data[..n]);
            *filled = o + n;
            data = &data[n..];
            off += n as u64;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if let Some((s, mut buf, filled)) = self.unit.take() {
            buf[filled..].fill(0);
            if is_zero(&buf) {
                pipeline::buffers::give(buf);
            } else {
                (self.put)(
                    Unit {
                        start: s,
                        len: buf.len() as u64,
                        read: true,
                    },
                    buf,
                )?;
            }
        }
        Ok(())
    }
}

/// What arrives on stdin.
enum Kind {
    Stream(crate::format::sparse::SparseHeader),
    Sparse(crate::format::sparse::SparseHeader),
    Tar,
    Raw,
}

/// A disk arriving on a pipe: its capacity and descriptor (read from the head of the
/// input), and a [`Feed`] of its content.
pub struct PipeInput<'a> {
    input: &'a mut (dyn Read + Send),
    head: Vec<u8>,
    kind: Kind,
    /// Capacity in bytes.
    pub capacity: u64,
    /// The descriptor the input carried (streams, sparse files, tar streams).
    pub descriptor: Option<Descriptor>,
}

impl<'a> PipeInput<'a> {
    /// Read the head of `input`: with `raw_size`, nothing (raw bytes of that size);
    /// otherwise a stream's or sparse file's header and descriptor, or a tar stream's
    /// descriptor member.
    pub fn open(input: &'a mut (dyn Read + Send), raw_size: Option<u64>) -> Result<PipeInput<'a>> {
        let name = Path::new("<stdin>");
        if let Some(size) = raw_size {
            if size == 0 || size % SECTOR != 0 {
                return Err(Error::InvalidInput(format!(
                    "a raw size of {size} bytes is not a positive multiple of 512"
                )));
            }
            return Ok(PipeInput {
                input,
                head: Vec::new(),
                kind: Kind::Raw,
                capacity: size,
                descriptor: None,
            });
        }
        let mut first = [0u8; 512];
        let mut c = Counted::new(input, name);
        c.exact(&mut first)?;
        let member = tar::Header::from_byte_slice(&first);
        if member.as_ustar().is_some() || member.as_gnu().is_some() {
            // Tar: the descriptor is the first member; read it for capacity and DDB.
            let size = member.entry_size().unwrap_or(u64::MAX);
            if size > crate::format::descriptor::MAX_DESCRIPTOR_BYTES as u64 {
                return Err(Error::corrupt(
                    name,
                    124,
                    "the tar stream does not start with a descriptor",
                ));
            }
            let mut text = vec![0u8; (size.div_ceil(512) * 512) as usize];
            c.exact(&mut text)?;
            text.truncate(size as usize);
            let d = Descriptor::parse(&text, name)?;
            let capacity: u64 = d
                .extents()
                .iter()
                .map(|e| e.sectors.saturating_mul(SECTOR))
                .sum();
            // Re-feed the bytes consumed so the tar reader sees a whole archive.
            let mut head = first.to_vec();
            head.extend_from_slice(&text);
            head.resize(512 + (size.div_ceil(512) * 512) as usize, 0);
            return Ok(PipeInput {
                input,
                head,
                kind: Kind::Tar,
                capacity,
                descriptor: Some(d),
            });
        }
        let h = stream_in::parse_first(&first, name)?;
        let mut head = first.to_vec();
        let mut descriptor = None;
        // The embedded descriptor follows the header.
        if h.descriptor_offset == 1 && h.descriptor_size > 0 {
            let n = h
                .descriptor_size
                .saturating_mul(SECTOR)
                .min(crate::format::descriptor::MAX_DESCRIPTOR_BYTES as u64)
                as usize;
            let mut d = vec![0u8; n];
            c.exact(&mut d)?;
            descriptor = Descriptor::parse(&d, name).ok();
            head.extend_from_slice(&d);
        }
        // validate() has checked that capacity * 512 does not overflow.
        let capacity = h.capacity_sectors * SECTOR;
        let kind = if h.compressed() {
            Kind::Stream(h)
        } else {
            Kind::Sparse(h)
        };
        Ok(PipeInput {
            input,
            head,
            kind,
            capacity,
            descriptor,
        })
    }
}

/// Read exactly `cap` raw bytes from `r` into `emit` (zero chunks skipped); fewer or
/// more is an error (a cut pipe must not restore as a shorter disk).
fn read_raw(r: &mut dyn Read, cap: u64, emit: stream_in::Emit<'_>) -> Result<()> {
    let name = Path::new("<stdin>");
    let mut buf = vec![0u8; pipeline::DEFAULT_UNIT as usize];
    let mut c = Counted::new(r, name);
    let mut pos = 0u64;
    while pos < cap {
        let n = (cap - pos).min(buf.len() as u64) as usize;
        if !c.fill(&mut buf[..n])? {
            return Err(Error::corrupt(
                name,
                pos,
                format!("raw input ended after {pos} bytes of the {cap} it was to hold"),
            ));
        }
        if !is_zero(&buf[..n]) {
            emit(pos, &buf[..n])?;
        }
        pos += n as u64;
    }
    let mut one = [0u8; 1];
    if c.fill(&mut one)? {
        return Err(Error::InvalidInput(format!(
            "raw input continues past the {cap} bytes it was to hold: give the whole size"
        )));
    }
    Ok(())
}

impl Feed for PipeInput<'_> {
    fn run(
        &mut self,
        pool: &rayon::ThreadPool,
        put: &mut dyn FnMut(Unit, Vec<u8>) -> Result<()>,
    ) -> Result<()> {
        let name = Path::new("<stdin>");
        let mut units = Units {
            unit: None,
            cap: self.capacity,
            put,
        };
        let head = std::mem::take(&mut self.head);
        let mut chained = std::io::Read::chain(&head[..], &mut self.input);
        let mut emit = |off: u64, data: &[u8]| units.piece(off, data);
        match &self.kind {
            Kind::Raw => read_raw(&mut chained, self.capacity, &mut emit)?,
            Kind::Tar => {
                stream_in::read_tar(&mut chained, name, &mut emit)?;
                let _ = std::io::copy(&mut chained, &mut std::io::sink());
            }
            Kind::Stream(h) | Kind::Sparse(h) => {
                let mut c = Counted::new(&mut chained, name);
                let mut s = [0u8; 512];
                c.exact(&mut s)?;
                if matches!(self.kind, Kind::Stream(_))
                    && stream_in::units_fit(h, pipeline::DEFAULT_UNIT)
                {
                    // The grains inflate straight into the engine's units.
                    stream_in::read_stream_units(
                        Some(pool),
                        &mut c,
                        h,
                        pipeline::DEFAULT_UNIT as usize,
                        &mut |start, buf| {
                            let len = buf.len() as u64;
                            (units.put)(
                                Unit {
                                    start,
                                    len,
                                    read: true,
                                },
                                buf,
                            )
                        },
                    )?;
                } else if matches!(self.kind, Kind::Stream(_)) {
                    stream_in::read_stream_on(Some(pool), &mut c, h, 0, &mut emit, None)?;
                } else {
                    stream_in::read_sparse(&mut c, h, 0, &mut emit)?;
                }
                c.drain();
            }
        }
        units.flush()
    }
}
