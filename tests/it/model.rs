//! A proptest model of random write / zero / add / commit sequences against a plain
//! buffer: after every step, reading the chain gives the model.

use proptest::prelude::*;
use std::path::{Path, PathBuf};
use vmdkit::ops::commit::{commit, CommitOptions};
use vmdkit::ops::redo::{add, write, RedoStyle, WriteData};
use vmdkit::VirtualDisk;

const CAP: usize = 4 << 20;

#[derive(Debug, Clone)]
enum Op {
    Write { off: usize, len: usize, seed: u8 },
    Zero { off: usize, len: usize },
    Add(u8),
    Commit,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..CAP / 512, 1usize..300_000, any::<u8>()).prop_map(|(s, len, seed)| {
            let off = s * 512;
            Op::Write { off, len: len.min(CAP - off).max(1), seed }
        }),
        1 => (0usize..CAP / 512, 1usize..200_000).prop_map(|(s, len)| {
            let off = s * 512;
            Op::Zero { off, len: len.min(CAP - off).max(1) }
        }),
        2 => (0u8..3).prop_map(Op::Add),
        1 => Just(Op::Commit),
    ]
}

fn read_all(top: &Path) -> Vec<u8> {
    let c = vmdkit::Chain::open(top, &Default::default()).unwrap();
    let mut b = vec![0u8; c.capacity() as usize];
    c.read_at(&mut b, 0).unwrap();
    b
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn chains_behave_like_a_plain_buffer(ops in prop::collection::vec(op(), 1..14)) {
        let t = super::util::tmp();
        let d = t.path();
        std::fs::write(d.join("base-flat.vmdk"), vec![0u8; CAP]).unwrap();
        std::fs::write(
            d.join("base.vmdk"),
            format!("# Disk DescriptorFile\nversion=1\nCID=11111111\nparentCID=ffffffff\ncreateType=\"vmfs\"\n\n# Extent description\nRW {} VMFS \"base-flat.vmdk\"\n", CAP / 512),
        ).unwrap();
        let mut model = vec![0u8; CAP];
        let mut tops: Vec<PathBuf> = vec![d.join("base.vmdk")];
        for op in &ops {
            let top = tops.last().unwrap().clone();
            match op {
                Op::Write { off, len, seed } => {
                    let data: Vec<u8> = (0..*len).map(|i| (i as u8).wrapping_add(*seed) | 1).collect();
                    write(&top, *off as u64, WriteData::Reader(&mut &data[..]), false).unwrap();
                    model[*off..off + len].copy_from_slice(&data);
                }
                Op::Zero { off, len } => {
                    write(&top, *off as u64, WriteData::Zeros(*len as u64), false).unwrap();
                    model[*off..off + len].fill(0);
                }
                Op::Add(k) => {
                    // ESX 2 REDO logs only stack on REDO logs or the base.
                    let style = match k {
                        0 if tops.len() == 1 || top.to_string_lossy().ends_with(".REDO") => RedoStyle::Redo,
                        1 => RedoStyle::VmfsSparse,
                        _ => RedoStyle::Hosted,
                    };
                    let new = add(&top, style).unwrap();
                    tops.push(new);
                }
                Op::Commit => {
                    if tops.len() > 1 {
                        commit(&top, &CommitOptions::default(), &vmdkit::NoProgress).unwrap();
                        tops.pop();
                    }
                }
            }
            let now = tops.last().unwrap();
            prop_assert!(read_all(now) == model, "after {:?}", op);
        }
        // Finally everything commits into the base.
        let top = tops.last().unwrap().clone();
        if tops.len() > 1 {
            commit(&top, &{
                let mut o = CommitOptions::default();
                o.all = true;
                o
            }, &vmdkit::NoProgress).unwrap();
        }
        prop_assert!(std::fs::read(d.join("base-flat.vmdk")).unwrap() == model);
    }
}
