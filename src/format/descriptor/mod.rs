//! Text descriptor files (formats.md §4): parse, query, edit, serialize.
//!
//! The parser is tolerant where VMware is (comments anywhere, CRLF, blank lines, spaces
//! around `=`, quoted or bare values, keywords in any case, trailing NULs) and strict where
//! a guess could read the wrong data: an unknown line, an unterminated quote, a header key
//! given twice with different values, a bad extent line are errors naming the line.
//! Every line is kept, so a rewritten descriptor keeps unknown keys and comments.

use std::fmt;
use std::path::Path;

use crate::error::{Error, Result};

/// Largest descriptor text we read (qemu reads at most 1 MiB of a separate descriptor).
pub const MAX_DESCRIPTOR_BYTES: usize = 1 << 20;
/// Most extent lines a descriptor may have (a 62 TB disk in 2 GB extents needs ~30000).
pub const MAX_EXTENTS: usize = 65_536;

/// The disk types of the `createType` key (formats.md §1), canonical spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CreateType {
    /// One hosted sparse file with an embedded descriptor.
    MonolithicSparse,
    /// Descriptor + `-sNNN` hosted sparse extents.
    TwoGbMaxExtentSparse,
    /// Descriptor + one `-flat` file.
    MonolithicFlat,
    /// Descriptor + `-fNNN` flat extents.
    TwoGbMaxExtentFlat,
    /// Compressed hosted sparse stream.
    StreamOptimized,
    /// ESX base disk (descriptor + `-flat`).
    Vmfs,
    /// ESX 3-6 snapshot (COWD delta).
    VmfsSparse,
    /// ESXi 6.5+ snapshot.
    SeSparse,
    /// Virtual-mode raw device mapping.
    VmfsRawDeviceMap,
    /// Physical-mode raw device mapping.
    VmfsPassthroughRawDeviceMap,
    /// Old ESX raw disk.
    VmfsRaw,
    /// A whole host device.
    FullDevice,
    /// Slices of a host device.
    PartitionedDevice,
    /// Any mix of extents.
    Custom,
}

impl CreateType {
    /// All types (the tests go through them).
    #[cfg(test)]
    pub const ALL: [CreateType; 14] = [
        CreateType::MonolithicSparse,
        CreateType::TwoGbMaxExtentSparse,
        CreateType::MonolithicFlat,
        CreateType::TwoGbMaxExtentFlat,
        CreateType::StreamOptimized,
        CreateType::Vmfs,
        CreateType::VmfsSparse,
        CreateType::SeSparse,
        CreateType::VmfsRawDeviceMap,
        CreateType::VmfsPassthroughRawDeviceMap,
        CreateType::VmfsRaw,
        CreateType::FullDevice,
        CreateType::PartitionedDevice,
        CreateType::Custom,
    ];

    /// VMware's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            CreateType::MonolithicSparse => "monolithicSparse",
            CreateType::TwoGbMaxExtentSparse => "twoGbMaxExtentSparse",
            CreateType::MonolithicFlat => "monolithicFlat",
            CreateType::TwoGbMaxExtentFlat => "twoGbMaxExtentFlat",
            CreateType::StreamOptimized => "streamOptimized",
            CreateType::Vmfs => "vmfs",
            CreateType::VmfsSparse => "vmfsSparse",
            CreateType::SeSparse => "seSparse",
            CreateType::VmfsRawDeviceMap => "vmfsRawDeviceMap",
            CreateType::VmfsPassthroughRawDeviceMap => "vmfsPassthroughRawDeviceMap",
            CreateType::VmfsRaw => "vmfsRaw",
            CreateType::FullDevice => "fullDevice",
            CreateType::PartitionedDevice => "partitionedDevice",
            CreateType::Custom => "custom",
        }
    }

    /// Parse a createType, case-insensitively, mapping the aliases of VMware's technotes
    /// (`2GbMaxExtentSparse`, `vmfsThin`, `vmfsRDM`...) onto the canonical types.
    pub fn parse(s: &str) -> Option<CreateType> {
        let l = s.to_ascii_lowercase();
        let t = match l.as_str() {
            "monolithicsparse" => CreateType::MonolithicSparse,
            "twogbmaxextentsparse" | "2gbmaxextentsparse" => CreateType::TwoGbMaxExtentSparse,
            "monolithicflat" => CreateType::MonolithicFlat,
            "twogbmaxextentflat" | "2gbmaxextentflat" => CreateType::TwoGbMaxExtentFlat,
            "streamoptimized" => CreateType::StreamOptimized,
            "vmfs" | "vmfsthin" | "vmfspreallocated" | "vmfseagerzeroedthick" => CreateType::Vmfs,
            "vmfssparse" => CreateType::VmfsSparse,
            "sesparse" => CreateType::SeSparse,
            "vmfsrawdevicemap" | "vmfsrdm" => CreateType::VmfsRawDeviceMap,
            "vmfspassthroughrawdevicemap" | "vmfsrdmp" => CreateType::VmfsPassthroughRawDeviceMap,
            "vmfsraw" => CreateType::VmfsRaw,
            "fulldevice" => CreateType::FullDevice,
            "partitioneddevice" => CreateType::PartitionedDevice,
            "custom" => CreateType::Custom,
            _ => return None,
        };
        Some(t)
    }

    /// Whether extents of this type name host devices by absolute path.
    pub fn is_device(self) -> bool {
        matches!(
            self,
            CreateType::VmfsRaw | CreateType::FullDevice | CreateType::PartitionedDevice
        )
    }
}

impl fmt::Display for CreateType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Access mode of an extent, named after the descriptor's keywords (`RW`, `RDONLY`,
/// `NOACCESS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)]
pub enum Access {
    /// Read-write.
    Rw,
    /// Read-only.
    RdOnly,
    /// No access (reads as zeros).
    NoAccess,
}

impl Access {
    /// VMware's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Rw => "RW",
            Access::RdOnly => "RDONLY",
            Access::NoAccess => "NOACCESS",
        }
    }
    fn parse(s: &str) -> Option<Access> {
        match s.to_ascii_uppercase().as_str() {
            "RW" => Some(Access::Rw),
            "RDONLY" => Some(Access::RdOnly),
            "NOACCESS" => Some(Access::NoAccess),
            _ => None,
        }
    }
}

/// Extent types (formats.md §4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentType {
    /// Raw bytes at an offset in a file or device.
    Flat,
    /// Hosted sparse (KDMV) file.
    Sparse,
    /// Reads as zeros, stores nothing.
    Zero,
    /// ESX flat file.
    Vmfs,
    /// COWD delta.
    VmfsSparse,
    /// RDM mapping file.
    VmfsRdm,
    /// Raw device.
    VmfsRaw,
    /// SESparse delta.
    SeSparse,
}

impl ExtentType {
    /// VMware's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ExtentType::Flat => "FLAT",
            ExtentType::Sparse => "SPARSE",
            ExtentType::Zero => "ZERO",
            ExtentType::Vmfs => "VMFS",
            ExtentType::VmfsSparse => "VMFSSPARSE",
            ExtentType::VmfsRdm => "VMFSRDM",
            ExtentType::VmfsRaw => "VMFSRAW",
            ExtentType::SeSparse => "SESPARSE",
        }
    }
    fn parse(s: &str) -> Option<ExtentType> {
        Some(match s.to_ascii_uppercase().as_str() {
            "FLAT" => ExtentType::Flat,
            "SPARSE" => ExtentType::Sparse,
            "ZERO" => ExtentType::Zero,
            "VMFS" => ExtentType::Vmfs,
            "VMFSSPARSE" => ExtentType::VmfsSparse,
            "VMFSRDM" => ExtentType::VmfsRdm,
            "VMFSRAW" => ExtentType::VmfsRaw,
            "SESPARSE" => ExtentType::SeSparse,
            _ => return None,
        })
    }
}

/// One extent line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    /// Access mode.
    pub access: Access,
    /// Sectors covered.
    pub sectors: u64,
    /// Extent type.
    pub kind: ExtentType,
    /// File name as written (absent for ZERO).
    pub file: Option<String>,
    /// Sector offset into the file (FLAT).
    pub offset: Option<u64>,
    /// Further fields, kept verbatim.
    pub extra: Vec<String>,
}

impl ExtentLine {
    /// A read-write extent line: `sectors` of `kind` in `file` (no offset, no extras).
    pub fn rw(kind: ExtentType, sectors: u64, file: impl Into<String>) -> ExtentLine {
        ExtentLine {
            access: Access::Rw,
            sectors,
            kind,
            file: Some(file.into()),
            offset: None,
            extra: vec![],
        }
    }
}

impl fmt::Display for ExtentLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {}",
            self.access.as_str(),
            self.sectors,
            self.kind.as_str()
        )?;
        if let Some(file) = &self.file {
            write!(f, " \"{file}\"")?;
            if let Some(o) = self.offset {
                write!(f, " {o}")?;
                for e in &self.extra {
                    if e.is_empty() || e.contains(char::is_whitespace) {
                        write!(f, " \"{e}\"")?;
                    } else {
                        write!(f, " {e}")?;
                    }
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Line {
    /// Comment or blank line, verbatim.
    Verbatim(String),
    /// `key=value` of the header.
    Header {
        key: String,
        value: String,
        quoted: bool,
    },
    Extent(ExtentLine),
    /// `ddb.key = "value"`.
    Ddb {
        key: String,
        value: String,
    },
}

/// A parsed descriptor, every line kept.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Descriptor {
    lines: Vec<Line>,
}

fn derr(path: &Path, line: usize, what: impl Into<String>) -> Error {
    Error::Descriptor {
        path: path.to_path_buf(),
        line,
        what: what.into(),
    }
}

/// Split a `value` part into (text, was_quoted).
fn parse_value(raw: &str) -> std::result::Result<(String, bool), String> {
    let v = raw.trim();
    if let Some(rest) = v.strip_prefix('"') {
        let Some(end) = rest.find('"') else {
            return Err("unterminated quoted value".into());
        };
        let after = rest[end + 1..].trim();
        if !after.is_empty() {
            return Err(format!("unexpected text `{after}` after a quoted value"));
        }
        Ok((rest[..end].to_string(), true))
    } else {
        if v.contains('"') {
            return Err("stray quote in a value".into());
        }
        if v.split_whitespace().count() > 1 {
            return Err(format!(
                "unquoted value `{v}` contains spaces (ambiguous; quote it)"
            ));
        }
        Ok((v.to_string(), false))
    }
}

/// Split an extent line into tokens; quoted tokens may contain spaces.
fn tokenize(s: &str) -> std::result::Result<Vec<(String, bool)>, String> {
    let mut out = Vec::new();
    let mut chars = s.trim().chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        if c == '"' {
            chars.next();
            let mut t = String::new();
            let mut closed = false;
            for c in chars.by_ref() {
                if c == '"' {
                    closed = true;
                    break;
                }
                t.push(c);
            }
            if !closed {
                return Err("unterminated quoted file name".into());
            }
            out.push((t, true));
        } else {
            let mut t = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                if c == '"' {
                    return Err("stray quote inside a field".into());
                }
                t.push(c);
                chars.next();
            }
            out.push((t, false));
        }
    }
    Ok(out)
}

fn parse_extent(s: &str) -> std::result::Result<ExtentLine, String> {
    let toks = tokenize(s)?;
    let access = Access::parse(&toks[0].0).ok_or("bad access mode")?;
    if toks.len() < 3 {
        return Err("extent line needs at least access, size and type".into());
    }
    let sectors: u64 = toks[1]
        .0
        .parse()
        .map_err(|_| format!("bad extent size `{}` (sectors, decimal)", toks[1].0))?;
    let kind = ExtentType::parse(&toks[2].0)
        .ok_or_else(|| format!("unknown extent type `{}`", toks[2].0))?;
    let file = toks.get(3).map(|t| t.0.clone());
    let offset = match toks.get(4) {
        Some(t) => Some(
            t.0.parse::<u64>()
                .map_err(|_| format!("bad extent offset `{}` (sectors, decimal)", t.0))?,
        ),
        None => None,
    };
    let extra = toks.iter().skip(5).map(|t| t.0.clone()).collect();
    if kind == ExtentType::Zero {
        if file.is_some() {
            return Err("a ZERO extent takes no file name".into());
        }
    } else if file.is_none() {
        return Err(format!("a {} extent needs a file name", kind.as_str()));
    }
    Ok(ExtentLine {
        access,
        sectors,
        kind,
        file,
        offset,
        extra,
    })
}

impl Descriptor {
    /// Parse descriptor text. `path` names the file in errors.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Descriptor> {
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        let bytes = &bytes[..end];
        if bytes.len() > MAX_DESCRIPTOR_BYTES {
            return Err(derr(
                path,
                0,
                format!(
                    "descriptor of {} bytes exceeds the {} byte limit",
                    bytes.len(),
                    MAX_DESCRIPTOR_BYTES
                ),
            ));
        }
        // A UTF-8 byte-order mark before the first line (some editors add one; qemu
        // reads such descriptors) is not part of the text.
        let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
        let text = String::from_utf8_lossy(bytes);
        let mut lines = Vec::new();
        let mut n_extents = 0usize;
        // Lower-cased key -> value, for the duplicate check (linear in the line count).
        let mut seen: std::collections::HashMap<String, String> = Default::default();
        for (i, raw) in text.split('\n').enumerate() {
            let lineno = i + 1;
            // CRLF (or stray CRs) end a line; they are not kept, so a rewrite (LF) reads
            // back the same.
            let raw = raw.trim_end_matches('\r');
            let t = raw.trim();
            if t.is_empty() || t.starts_with('#') {
                lines.push(Line::Verbatim(raw.to_string()));
                continue;
            }
            let first = t.split_whitespace().next().unwrap_or("");
            if Access::parse(first).is_some() {
                let e = parse_extent(t).map_err(|w| derr(path, lineno, w))?;
                n_extents += 1;
                if n_extents > MAX_EXTENTS {
                    return Err(derr(
                        path,
                        lineno,
                        format!("more than {MAX_EXTENTS} extents"),
                    ));
                }
                lines.push(Line::Extent(e));
                continue;
            }
            let Some(eq) = t.find('=') else {
                return Err(derr(
                    path,
                    lineno,
                    format!("not a comment, `key=value` or extent line: `{}`", clip(t)),
                ));
            };
            let key = t[..eq].trim();
            if key.is_empty() || key.contains(char::is_whitespace) || key.contains('"') {
                return Err(derr(path, lineno, format!("bad key `{}`", clip(key))));
            }
            let (value, quoted) = parse_value(&t[eq + 1..]).map_err(|w| derr(path, lineno, w))?;
            let is_ddb =
                key.len() > 4 && key.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("ddb."));
            // A key given twice with different values is ambiguous.
            let dup = seen.get(&key.to_ascii_lowercase()).cloned();
            if dup.is_none() {
                seen.insert(key.to_ascii_lowercase(), value.clone());
            }
            if let Some(prev) = dup {
                if prev != value {
                    return Err(derr(
                        path,
                        lineno,
                        format!(
                            "`{key}` given twice with different values (`{prev}` and `{value}`)"
                        ),
                    ));
                }
                lines.push(Line::Verbatim(raw.to_string()));
                continue;
            }
            if is_ddb {
                lines.push(Line::Ddb {
                    key: key.to_string(),
                    value,
                });
            } else {
                lines.push(Line::Header {
                    key: key.to_string(),
                    value,
                    quoted,
                });
            }
        }
        // Drop the empty piece after a final newline so rewriting is stable.
        if matches!(lines.last(), Some(Line::Verbatim(s)) if s.is_empty()) {
            lines.pop();
        }
        Ok(Descriptor { lines })
    }

    /// A header value (case-insensitive key).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.lines.iter().find_map(|l| match l {
            Line::Header { key: k, value, .. } if k.eq_ignore_ascii_case(key) => {
                Some(value.as_str())
            }
            _ => None,
        })
    }

    /// A `ddb.*` value; `key` with or without the `ddb.` prefix.
    pub fn ddb(&self, key: &str) -> Option<&str> {
        let key = strip_ddb(key);
        self.lines.iter().find_map(|l| match l {
            Line::Ddb { key: k, value } if strip_ddb(k).eq_ignore_ascii_case(key) => {
                Some(value.as_str())
            }
            _ => None,
        })
    }

    /// All `ddb.*` entries in order, keys with the prefix.
    pub fn ddb_entries(&self) -> Vec<(String, String)> {
        self.lines
            .iter()
            .filter_map(|l| match l {
                Line::Ddb { key, value } => Some((key.clone(), value.clone())),
                _ => None,
            })
            .collect()
    }

    /// Header entries in order (key, value).
    pub fn header_entries(&self) -> Vec<(String, String)> {
        self.lines
            .iter()
            .filter_map(|l| match l {
                Line::Header { key, value, .. } => Some((key.clone(), value.clone())),
                _ => None,
            })
            .collect()
    }

    /// The extent lines in order.
    pub fn extents(&self) -> Vec<&ExtentLine> {
        self.lines
            .iter()
            .filter_map(|l| match l {
                Line::Extent(e) => Some(e),
                _ => None,
            })
            .collect()
    }

    /// Mutable access to the extent lines.
    pub fn extents_mut(&mut self) -> Vec<&mut ExtentLine> {
        self.lines
            .iter_mut()
            .filter_map(|l| match l {
                Line::Extent(e) => Some(e),
                _ => None,
            })
            .collect()
    }

    /// Replace all extent lines (placed where the first one was, or after the header).
    pub fn set_extents(&mut self, extents: Vec<ExtentLine>) {
        let pos = self
            .lines
            .iter()
            .position(|l| matches!(l, Line::Extent(_)))
            .unwrap_or_else(|| self.header_end());
        self.lines.retain(|l| !matches!(l, Line::Extent(_)));
        let pos = pos.min(self.lines.len());
        for (i, e) in extents.into_iter().enumerate() {
            self.lines.insert(pos + i, Line::Extent(e));
        }
    }

    fn header_end(&self) -> usize {
        self.lines
            .iter()
            .rposition(|l| matches!(l, Line::Header { .. }))
            .map(|p| p + 1)
            .unwrap_or(self.lines.len())
    }

    /// The createType, parsed (None when missing or unknown).
    pub fn create_type(&self) -> Option<CreateType> {
        self.get("createType").and_then(CreateType::parse)
    }

    /// Set a header key, keeping its position (and quoting style) if present, else adding
    /// it after the last header entry. `quoted` is used for new keys.
    pub fn set(&mut self, key: &str, value: &str, quoted: bool) {
        for l in &mut self.lines {
            if let Line::Header {
                key: k, value: v, ..
            } = l
            {
                if k.eq_ignore_ascii_case(key) {
                    *v = value.to_string();
                    return;
                }
            }
        }
        let pos = self.header_end();
        self.lines.insert(
            pos,
            Line::Header {
                key: key.to_string(),
                value: value.to_string(),
                quoted,
            },
        );
    }

    /// Remove a `ddb.*` key (prefix optional).
    pub fn remove_ddb(&mut self, key: &str) {
        let bare = strip_ddb(key);
        self.lines.retain(
            |l| !matches!(l, Line::Ddb { key: k, .. } if strip_ddb(k).eq_ignore_ascii_case(bare)),
        );
    }

    /// Append `n` blank lines at the end.
    pub fn push_blank_lines(&mut self, n: usize) {
        self.lines
            .extend(std::iter::repeat_n(Line::Verbatim(String::new()), n));
    }

    /// Set a `ddb.*` key (prefix optional), appending it when new.
    pub fn set_ddb(&mut self, key: &str, value: &str) {
        let bare = strip_ddb(key);
        for l in &mut self.lines {
            if let Line::Ddb { key: k, value: v } = l {
                if strip_ddb(k).eq_ignore_ascii_case(bare) {
                    *v = value.to_string();
                    return;
                }
            }
        }
        self.lines.push(Line::Ddb {
            key: format!("ddb.{bare}"),
            value: value.to_string(),
        });
    }

    /// CID as a number.
    pub fn cid(&self) -> Option<u32> {
        self.get("CID").and_then(parse_cid)
    }

    /// parentCID as a number.
    pub fn parent_cid(&self) -> Option<u32> {
        self.get("parentCID").and_then(parse_cid)
    }

    /// Serialize: VMware spelling, LF line ends, unknown lines verbatim.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        for l in &self.lines {
            match l {
                Line::Verbatim(t) => s.push_str(t),
                Line::Header { key, value, quoted } => {
                    if *quoted {
                        s.push_str(&format!("{key}=\"{value}\""));
                    } else {
                        s.push_str(&format!("{key}={value}"));
                    }
                }
                Line::Extent(e) => s.push_str(&e.to_string()),
                Line::Ddb { key, value } => s.push_str(&format!("{key} = \"{value}\"")),
            }
            s.push('\n');
        }
        s
    }

    /// A new descriptor in VMware's layout.
    pub fn new(
        create_type: CreateType,
        cid: u32,
        parent: Option<(u32, &str)>,
        extents: Vec<ExtentLine>,
        ddb: &[(String, String)],
    ) -> Descriptor {
        let mut lines = vec![
            Line::Verbatim("# Disk DescriptorFile".into()),
            Line::Header {
                key: "version".into(),
                value: "1".into(),
                quoted: false,
            },
            Line::Header {
                key: "encoding".into(),
                value: "UTF-8".into(),
                quoted: true,
            },
            Line::Header {
                key: "CID".into(),
                value: format!("{cid:08x}"),
                quoted: false,
            },
            Line::Header {
                key: "parentCID".into(),
                value: format!("{:08x}", parent.map_or(NO_PARENT_CID, |p| p.0)),
                quoted: false,
            },
            Line::Header {
                key: "createType".into(),
                value: create_type.as_str().into(),
                quoted: true,
            },
        ];
        if let Some((_, hint)) = parent {
            lines.push(Line::Header {
                key: "parentFileNameHint".into(),
                value: hint.into(),
                quoted: true,
            });
        }
        lines.push(Line::Verbatim(String::new()));
        lines.push(Line::Verbatim("# Extent description".into()));
        lines.extend(extents.into_iter().map(Line::Extent));
        lines.push(Line::Verbatim(String::new()));
        lines.push(Line::Verbatim("# The Disk Data Base".into()));
        lines.push(Line::Verbatim("#DDB".into()));
        lines.push(Line::Verbatim(String::new()));
        for (k, v) in ddb {
            lines.push(Line::Ddb {
                key: format!("ddb.{}", strip_ddb(k)),
                value: v.clone(),
            });
        }
        Descriptor { lines }
    }
}

/// Refuse a file name that cannot stand in a descriptor line: a `"` would end the
/// quoted name early and a line break would inject a line of its own.
pub fn check_file_name(name: &str) -> Result<()> {
    if let Some(c) = name.chars().find(|c| *c == '"' || c.is_control()) {
        return Err(Error::InvalidInput(format!(
            "file name `{}` holds {}, which a VMDK descriptor cannot carry; choose another name",
            name.escape_debug(),
            if c == '"' {
                "a double quote".to_string()
            } else {
                format!("the control character {:?}", c)
            }
        )));
    }
    Ok(())
}

/// The parentCID value meaning "no parent".
pub const NO_PARENT_CID: u32 = 0xffff_ffff;

/// Parse a CID written in hex (qemu may write fewer than 8 digits).
pub fn parse_cid(s: &str) -> Option<u32> {
    let s = s.trim();
    if s.is_empty() || s.len() > 8 {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

/// A random CID that is neither `ffffffff` nor `fffffffe` (formats.md §4.6).
pub fn random_cid() -> u32 {
    loop {
        let c: u32 = rand::random();
        if c < 0xffff_fffe {
            return c;
        }
    }
}

fn strip_ddb(k: &str) -> &str {
    match k.get(..4) {
        Some(p) if k.len() > 4 && p.eq_ignore_ascii_case("ddb.") => &k[4..],
        _ => k,
    }
}

fn clip(s: &str) -> String {
    let mut t: String = s.chars().take(60).collect();
    if t.len() < s.len() {
        t.push_str("...");
    }
    t
}

#[cfg(test)]
mod tests;
