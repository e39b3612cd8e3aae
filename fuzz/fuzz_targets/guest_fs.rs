#![no_main]
//! Fuzz target: `vmdkit::fuzzing::guest_fs`, the guest-aware scan's file-system readers
//! (ext2/3/4 superblock, descriptors and bitmaps; FAT boot sector and FATs; NTFS boot
//! sector, $Volume, $LogFile, hiberfil.sys and $Bitmap through the `ntfs` crate).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmdkit::fuzzing::guest_fs(data);
});
