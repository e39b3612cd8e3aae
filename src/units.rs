//! Sizes and offsets as people and vmkfstools write them: `4096`, `512s` (sectors), `64k`,
//! `1.5G`, `512MB`, `512MiB`, `2T`. Every letter unit is binary (k = 1024), as vmkfstools
//! reads them; `B` and `iB` after the letter change nothing. A fraction must come out as
//! whole bytes (`1.5k` = 1536; `0.3k` is refused).

use crate::error::{Error, Result};

/// Parse a size or offset; see the module docs.
pub fn parse_size(s: &str) -> Result<u64> {
    let bad = |why: &str| {
        Error::InvalidInput(format!(
            "bad size `{s}`: {why} (a number with an optional unit: s = 512-byte sectors, k, m, g, t, p = binary multiples, optionally followed by B or iB; e.g. 4096, 64k, 1.5G, 512MiB)"
        ))
    };
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(bad("no number"));
    }
    let unit = unit.trim().to_ascii_lowercase();
    let mult: u64 = match unit.as_str() {
        "" | "b" => 1,
        "s" => 512,
        u => {
            let (letter, rest) = u.split_at(1);
            if !matches!(rest, "" | "b" | "ib") {
                return Err(bad("unknown unit"));
            }
            match letter {
                "k" => 1 << 10,
                "m" => 1 << 20,
                "g" => 1 << 30,
                "t" => 1 << 40,
                "p" => 1 << 50,
                _ => return Err(bad("unknown unit")),
            }
        }
    };
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if frac.contains('.') || (int.is_empty() && frac.is_empty()) {
        return Err(bad("not a number"));
    }
    let overflow = || Error::InvalidInput(format!("size `{s}` is too large"));
    let whole: u64 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| overflow())?
    };
    let mut bytes = whole.checked_mul(mult).ok_or_else(overflow)?;
    if !frac.is_empty() {
        // frac / 10^len * mult must be a whole number of bytes.
        if frac.len() > 18 {
            return Err(bad("too many decimals"));
        }
        let f: u128 = frac.parse().map_err(|_| bad("not a number"))?;
        let den = 10u128.pow(frac.len() as u32);
        let num = f * u128::from(mult);
        if num % den != 0 {
            return Err(bad("the fraction is not a whole number of bytes"));
        }
        let extra = u64::try_from(num / den).map_err(|_| overflow())?;
        bytes = bytes.checked_add(extra).ok_or_else(overflow)?;
    }
    Ok(bytes)
}

/// A size that may be relative: `+N` (extend). Returns the bytes and whether they are
/// to be added to the current size.
pub fn parse_new_size(s: &str) -> Result<(u64, bool)> {
    match s.trim().strip_prefix('+') {
        Some(rest) => Ok((parse_size(rest)?, true)),
        None => Ok((parse_size(s)?, false)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_as_vmkfstools_and_people_write_them() {
        for (s, v) in [
            ("4096", 4096u64),
            ("8s", 4096),
            ("64k", 65536),
            ("64K", 65536),
            ("1.5G", 3 << 29),
            ("512MB", 512 << 20),
            ("512MiB", 512 << 20),
            ("512 mib", 512 << 20),
            ("2t", 2 << 40),
            ("0.5k", 512),
            (".5m", 1 << 19),
            ("10b", 10),
        ] {
            assert_eq!(parse_size(s).unwrap(), v, "{s}");
        }
        for s in [
            "",
            "k",
            "1.2.3",
            "0.3k",
            "12x",
            "1kk",
            "-5",
            "99999999999999999999",
            "1e3",
        ] {
            assert!(parse_size(s).is_err(), "{s} accepted");
        }
        assert_eq!(parse_new_size("+128m").unwrap(), (128 << 20, true));
        assert_eq!(parse_new_size("2g").unwrap(), (2 << 30, false));
    }
}

/// A byte range as every JSON report writes it: `{"start": first byte, "length": bytes}`
/// (the shape of `map`'s entries, and qemu-img's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ByteRange {
    /// The first byte.
    pub start: u64,
    /// How many bytes.
    pub length: u64,
}

impl ByteRange {
    /// The range `[start, end)`.
    pub fn from_ends(start: u64, end: u64) -> ByteRange {
        ByteRange {
            start,
            length: end.saturating_sub(start),
        }
    }
}

/// Bytes in binary units, for people.
pub fn human(n: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}
