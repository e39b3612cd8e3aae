//! Unit tests of the parent module.

use super::*;

fn p(s: &str) -> Result<Descriptor> {
    Descriptor::parse(s.as_bytes(), Path::new("t.vmdk"))
}

#[test]
fn parses_a_vmware_descriptor() {
    let d = p("# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"vmfs\"\n\n# Extent description\nRW 16777216 VMFS \"disk-flat.vmdk\"\n\n#DDB\nddb.adapterType = \"lsilogic\"\nddb.thinProvisioned = \"1\"\n").unwrap();
    assert_eq!(d.create_type(), Some(CreateType::Vmfs));
    assert_eq!(d.cid(), Some(0xfffffffe));
    assert_eq!(d.parent_cid(), Some(NO_PARENT_CID));
    let e = d.extents();
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].sectors, 16777216);
    assert_eq!(e[0].kind, ExtentType::Vmfs);
    assert_eq!(e[0].file.as_deref(), Some("disk-flat.vmdk"));
    assert_eq!(d.ddb("adapterType"), Some("lsilogic"));
    assert_eq!(d.ddb("ddb.thinProvisioned"), Some("1"));
}

#[test]
fn tolerates_crlf_spacing_case_and_bare_values() {
    let d = p("version = 1\r\ncreatetype = monolithicFlat\r\ncid=ce75167\r\nrw 100 flat \"a b.vmdk\" 5\r\nddb.adapterType=\"ide\"\r\n").unwrap();
    assert_eq!(d.create_type(), Some(CreateType::MonolithicFlat));
    assert_eq!(d.cid(), Some(0x0ce75167));
    let e = d.extents();
    assert_eq!(e[0].access, Access::Rw);
    assert_eq!(e[0].file.as_deref(), Some("a b.vmdk"));
    assert_eq!(e[0].offset, Some(5));
    assert_eq!(d.ddb("adaptertype"), Some("ide"));
}

#[test]
fn maps_aliases_to_canonical_types() {
    assert_eq!(
        CreateType::parse("2GbMaxExtentSparse"),
        Some(CreateType::TwoGbMaxExtentSparse)
    );
    assert_eq!(CreateType::parse("vmfsThin"), Some(CreateType::Vmfs));
    assert_eq!(
        CreateType::parse("vmfsRDMP"),
        Some(CreateType::VmfsPassthroughRawDeviceMap)
    );
    for t in CreateType::ALL {
        assert_eq!(CreateType::parse(t.as_str()), Some(t));
    }
}

#[test]
fn rejects_conflicting_duplicate_keys() {
    let e = p("CID=1\ncreateType=\"vmfs\"\ncreateType=\"monolithicFlat\"\n").unwrap_err();
    assert!(e.to_string().contains("line 3"), "{e}");
    assert!(e.to_string().contains("given twice"), "{e}");
    // The same value twice is harmless.
    p("CID=1\nCID=1\n").unwrap();
}

#[test]
fn rejects_unknown_lines_and_bad_extents() {
    for (text, needle) in [
        ("hello world\n", "line 1: not a comment"),
        ("RW abc FLAT \"x\" 0\n", "bad extent size"),
        ("RW 10 FLAT \"x\n", "unterminated"),
        ("RW 10 WEIRD \"x\"\n", "unknown extent type"),
        ("RW 10 ZERO \"x\"\n", "takes no file name"),
        ("RW 10 FLAT\n", "needs a file name"),
        ("createType=\"vmfs\n", "unterminated"),
        ("createType=vmfs thin\n", "contains spaces"),
        ("RW -5 FLAT \"x\" 0\n", "bad extent size"),
    ] {
        let e = p(text).unwrap_err().to_string();
        assert!(e.contains(needle), "{text:?}: {e}");
    }
}

#[test]
fn rewrite_keeps_unknown_keys_and_comments() {
    let src = "# Disk DescriptorFile\n# a comment\nversion=1\nCID=12345678\nparentCID=ffffffff\nfoo=\"bar\"\ncreateType=\"vmfs\"\nRW 8 VMFS \"x-flat.vmdk\"\n# The Disk Data Base\nddb.custom.thing = \"keep me\"\n";
    let mut d = p(src).unwrap();
    assert_eq!(d.to_text(), src);
    d.set("CID", "deadbeef", false);
    d.set_ddb("geometry.heads", "16");
    let t = d.to_text();
    assert!(t.contains("CID=deadbeef\n"));
    assert!(t.contains("foo=\"bar\"\n# a comment") || t.contains("foo=\"bar\""));
    assert!(t.contains("# a comment"));
    assert!(t.contains("ddb.custom.thing = \"keep me\""));
    assert!(t.contains("ddb.geometry.heads = \"16\""));
    let again = p(&t).unwrap();
    assert_eq!(again, d);
}

#[test]
fn stops_at_nul_padding() {
    let mut b = b"CID=1\ncreateType=\"vmfs\"\n".to_vec();
    b.resize(512, 0);
    let d = p(std::str::from_utf8(&b).unwrap()).unwrap();
    assert_eq!(d.cid(), Some(1));
}

/// Found by the mutation suite: a key whose 4th byte is inside a multi-byte
/// character made `key[..4]` panic.
#[test]
fn regression_non_ascii_key_prefix_does_not_panic() {
    let d = p("dd\u{e9}x=1\nddb\u{e9}=\"2\"\n").unwrap();
    assert_eq!(d.get("dd\u{e9}x"), Some("1"));
    assert_eq!(d.ddb("x"), None);
}

/// Found by `cargo fuzz run descriptor`: a line of several CRs lost one CR per
/// rewrite, so parse(serialize(d)) != d.
#[test]
fn regression_fuzz_descriptor_trailing_crs_round_trip() {
    let d = p("\r\r\r\r\r\r").unwrap();
    let again = p(&d.to_text()).unwrap();
    assert_eq!(again, d);
    crate::fuzzing::descriptor(b"\r\r\r\r\r\r\x00\x00\x00\r\r# Disk D");
}

#[test]
fn random_cids_avoid_reserved_values() {
    for _ in 0..1000 {
        assert!(random_cid() < 0xffff_fffe);
    }
}
