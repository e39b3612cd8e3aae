//! Naming what a file is when it is not a VMDK, so the error can say what to do: disk
//! images of other hypervisors, compressed files, archives, and raw disks.

/// What `head` (the first bytes, ideally 64 KiB) and `tail` (the last 512 bytes, or empty)
/// look like, with a hint for the user; None when nothing is recognized.
pub fn foreign_format(head: &[u8], tail: &[u8]) -> Option<(&'static str, &'static str)> {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    Some(if at(0, b"QFI\xfb") {
        (
            "a qcow2 image",
            "convert it first: `qemu-img convert -O raw IMG disk.img`, then import that as a raw disk image",
        )
    } else if at(0, b"vhdxfile") {
        (
            "a VHDX image",
            "convert it first: `qemu-img convert -f vhdx -O raw IMG disk.img`, then import that as a raw disk image",
        )
    } else if at(0, b"conectix") {
        (
            "a dynamic VHD image",
            "convert it first: `qemu-img convert -f vpc -O raw IMG disk.img`, then import that as a raw disk image",
        )
    } else if head.get(0x40..0x44) == Some(&0xbeda_107f_u32.to_le_bytes()[..]) {
        (
            "a VirtualBox VDI image",
            "convert it first: `qemu-img convert -f vdi -O raw IMG disk.img`, then import that as a raw disk image",
        )
    } else if at(0, &[0x1f, 0x8b]) {
        (
            "gzip-compressed",
            "pipe it through gunzip: `gunzip -c FILE | vmdkit import - out.vmdk`",
        )
    } else if at(0, &[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        (
            "xz-compressed",
            "pipe it through xz: `xz -dc FILE | vmdkit import - out.vmdk`",
        )
    } else if at(0, &[0x28, 0xb5, 0x2f, 0xfd]) {
        (
            "zstd-compressed",
            "pipe it through zstd: `zstd -dc FILE | vmdkit import - out.vmdk`",
        )
    } else if at(0, b"BZh") && head.get(3).is_some_and(|c| (b'1'..=b'9').contains(c)) {
        (
            "bzip2-compressed",
            "pipe it through bunzip2: `bunzip2 -c FILE | vmdkit import - out.vmdk`",
        )
    } else if at(257, b"ustar") {
        (
            "a tar archive",
            "extract it with `tar -x` (a tar stream from `vmdkit export` is read by `vmdkit import -`)",
        )
    } else if tail.len() >= 8 && &tail[..8] == b"conectix" {
        (
            "a fixed VHD image (raw data and a 512-byte footer)",
            "its data is all but the last 512 bytes: import those as a raw disk image of that size from standard input (`head -c SIZE FILE`)",
        )
    } else if head.len() >= 512 && head[510] == 0x55 && head[511] == 0xaa {
        (
            "a raw disk image (it starts with a partition table)",
            "import it as a raw disk image",
        )
    } else {
        return None;
    })
}

/// The error text for a file that is not a VMDK: what it looks like and what to do, or a
/// hint that a raw image is imported as one.
pub fn not_a_vmdk_hint(head: &[u8], tail: &[u8]) -> String {
    match foreign_format(head, tail) {
        Some((what, hint)) => format!("this is {what}: {hint}"),
        None => "if it is a raw disk image, import it as one".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreign_formats_are_named() {
        let mut mbr = vec![0u8; 512];
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        let mut vdi = vec![0u8; 512];
        vdi[0x40..0x44].copy_from_slice(&0xbeda_107f_u32.to_le_bytes());
        let mut tar = vec![0u8; 512];
        tar[257..262].copy_from_slice(b"ustar");
        for (head, tail, want) in [
            (b"QFI\xfb\0\0\0\x03".to_vec(), vec![], "qcow2"),
            (b"vhdxfile".to_vec(), vec![], "VHDX"),
            (b"conectix".to_vec(), vec![], "dynamic VHD"),
            (vdi, vec![], "VDI"),
            (vec![0x1f, 0x8b, 8, 0], vec![], "gzip"),
            (vec![0xfd, b'7', b'z', b'X', b'Z', 0], vec![], "xz"),
            (vec![0x28, 0xb5, 0x2f, 0xfd], vec![], "zstd"),
            (b"BZh9".to_vec(), vec![], "bzip2"),
            (tar, vec![], "tar"),
            (vec![0u8; 512], b"conectix".to_vec(), "fixed VHD"),
            (mbr, vec![], "partition table"),
        ] {
            let (what, _) = foreign_format(&head, &tail).expect(want);
            assert!(what.contains(want), "{what} for {want}");
        }
        assert!(foreign_format(b"hello", &[]).is_none());
    }
}
