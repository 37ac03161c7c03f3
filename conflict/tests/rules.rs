//! The settling rules of design.md, one case at a time.

use rsyncfs_conflict::*;

fn node(i: u64) -> NodeId {
    NodeId::from_index(i)
}

fn ts(secs: u64, n: u64) -> Timestamp {
    Timestamp::new(NTP64(secs << 32), node(n).hlc_id())
}

fn file(byte: u8) -> Meta {
    Meta::file(1, [byte; 32], 0o644, 1_000)
}

/// A write by node `n` with counter `c` at time `secs`, on top of `base`.
fn write(base: Option<&Record>, n: u64, c: u64, secs: u64, meta: Meta) -> Record {
    Record::write(
        base,
        Dot {
            node: node(n),
            counter: c,
        },
        ts(secs, n),
        meta,
    )
}

#[test]
fn dominating_versions_win() {
    let a = write(None, 1, 1, 10, file(1));
    let b = write(Some(&a), 2, 1, 11, file(2));
    assert_eq!(settle("f", Some(&a), &b), Decision::TakeRemote);
    assert_eq!(settle("f", Some(&b), &a), Decision::KeepLocal);
    assert_eq!(settle("f", Some(&b), &b), Decision::AlreadyHave);
    assert_eq!(settle("f", None, &b), Decision::TakeRemote);
    // A causally later write wins even when its clock is behind.
    let late_clock = write(Some(&b), 1, 2, 1, file(3));
    assert_eq!(settle("f", Some(&b), &late_clock), Decision::TakeRemote);
}

#[test]
fn concurrent_identical_content_merges_without_copy() {
    let base = write(None, 1, 1, 10, file(1));
    let a = write(Some(&base), 1, 2, 20, file(7));
    let b = write(Some(&base), 2, 1, 21, file(7));
    let Decision::Merge(merged) = settle("f", Some(&a), &b) else {
        panic!("expected a merge");
    };
    assert_eq!(merged.vv, a.vv.merge(&b.vv));
    assert!(merged.copies("f", false).is_empty());
    assert_eq!(merged.author, None);
}

#[test]
fn concurrent_different_content_keeps_loser_as_copy() {
    let a = write(None, 1, 1, 20, file(1));
    let b = write(None, 2, 1, 21, file(2));
    let Decision::Conflict { merged, copies } = settle("docs/report.txt", Some(&a), &b) else {
        panic!("expected a conflict");
    };
    // Later HLC wins; the same on the other side.
    assert_eq!(merged.winner(), &b.siblings[0]);
    assert_eq!(copies.len(), 1);
    assert_eq!(copies[0].sibling, a.siblings[0]);
    let name = &copies[0].path;
    assert!(
        name.starts_with("docs/report.sync-conflict-19700101-000020-") && name.ends_with("-1.txt"),
        "{name}"
    );
    let Decision::Conflict {
        merged: other,
        copies: other_copies,
    } = settle("docs/report.txt", Some(&b), &a)
    else {
        panic!("expected a conflict");
    };
    assert_eq!(merged, other);
    assert_eq!(copies, other_copies);
    // The copy's record is a pure function of the losing write.
    assert_eq!(copies[0].record(), other_copies[0].record());
    assert!(copies[0].record().validate().is_ok());
}

#[test]
fn equal_times_break_ties_by_origin() {
    let a = write(None, 1, 1, 20, file(1));
    let b = write(None, 2, 1, 20, file(2));
    let merged = join(&a, &b);
    assert_eq!(merged.winner().dot.node, node(2));
}

#[test]
fn modify_beats_delete_whatever_the_clock() {
    let base = write(None, 1, 1, 10, file(1));
    let edit = write(Some(&base), 1, 2, 20, file(2));
    let delete = write(Some(&base), 2, 1, 30, Meta::tombstone());
    for (local, remote) in [(&edit, &delete), (&delete, &edit)] {
        let Decision::Merge(merged) = settle("f", Some(local), remote) else {
            panic!("expected a merge");
        };
        assert_eq!(merged.winner(), &edit.siblings[0]);
        assert!(merged.is_live());
    }
}

#[test]
fn directory_beats_file_and_file_becomes_copy() {
    let dir = write(None, 1, 1, 10, Meta::dir(0o755));
    let f = write(None, 2, 1, 30, file(9));
    let Decision::Conflict { merged, copies } = settle("x", Some(&f), &dir) else {
        panic!("expected a conflict");
    };
    assert!(merged.winner().meta.is_dir());
    assert_eq!(copies.len(), 1);
    assert_eq!(copies[0].sibling, f.siblings[0]);
}

#[test]
fn shadowed_winner_needs_a_copy() {
    // The path's record says "file", yet something inside the path lives (a create inside a
    // directory that was removed and replaced): the directory shows, the file is copied.
    let f = write(None, 2, 1, 30, file(9));
    assert!(f.copies("x", false).is_empty());
    let shadow = f.copies("x", true);
    assert_eq!(shadow.len(), 1);
    assert_eq!(shadow[0].sibling, f.siblings[0]);
}

#[test]
fn three_way_conflict_keeps_two_copies() {
    let a = write(None, 1, 1, 10, file(1));
    let b = write(None, 2, 1, 11, file(2));
    let c = write(None, 3, 1, 12, file(3));
    let merged = join(&join(&a, &b), &c);
    assert_eq!(merged.winner(), &c.siblings[0]);
    let copies = merged.copies("f", false);
    let kept: Vec<_> = copies.iter().map(|c| c.sibling.dot.node).collect();
    assert_eq!(kept.len(), 2);
    assert!(kept.contains(&node(1)) && kept.contains(&node(2)));
}

#[test]
fn a_write_that_saw_a_loser_supersedes_it_only() {
    // x and y race; y' is written by someone who had y (not x). The result is {x, y'}.
    let x = write(None, 1, 1, 10, file(1));
    let y = write(None, 2, 1, 11, file(2));
    let y2 = write(Some(&y), 3, 1, 5, file(3));
    let one = join(&join(&x, &y), &y2);
    let two = join(&join(&y2, &x), &y);
    assert_eq!(one, two);
    let nodes: Vec<_> = one.siblings.iter().map(|s| s.dot.node).collect();
    assert_eq!(nodes, vec![node(1), node(3)]);
    // x has the later clock; y' did not see x, so x wins and y' is the copy.
    assert_eq!(one.winner().dot.node, node(1));
}

#[test]
fn copy_names() {
    let s = write(None, 1, 42, 1_795_688_100, file(1)).siblings[0].clone();
    let short = node(1).short();
    assert_eq!(
        conflict_copy_name("a/b/report.txt", &s),
        format!("a/b/report.sync-conflict-20261126-101500-{short}-42.txt")
    );
    assert_eq!(
        conflict_copy_name(".bashrc", &s),
        format!(".bashrc.sync-conflict-20261126-101500-{short}-42")
    );
    assert_eq!(
        conflict_copy_name("Makefile", &s),
        format!("Makefile.sync-conflict-20261126-101500-{short}-42")
    );
    let long = "x".repeat(250) + ".data";
    let name = conflict_copy_name(&long, &s);
    assert!(name.len() <= 255, "{}", name.len());
    assert!(name.ends_with("-42.data"));
    let multibyte = "é".repeat(127);
    let name = conflict_copy_name(&multibyte, &s);
    assert!(name.len() <= 255);
}

#[test]
fn copy_names_fit_the_path_limit_near_it() {
    let s = write(None, 1, u64::MAX, 4_000_000_000, file(1)).siblings[0].clone();
    // The longest directory part allowed, then names of every length up to the name limit.
    let dir = "d/".repeat(limits::DIR_BYTES_MAX / 2 + 1);
    let dir = &dir[..limits::DIR_BYTES_MAX];
    let dir = dir.trim_end_matches('/');
    for name_len in [1, 2, 40, 200, 255] {
        let name = "n".repeat(name_len - 1) + "x";
        for path in [format!("{dir}/{name}"), format!("{dir}/{name}.txt")] {
            let copy = conflict_copy_name(&path, &s);
            assert!(copy.len() <= limits::PATH_BYTES_MAX, "{}", copy.len());
            let (copy_dir, copy_name) = copy.rsplit_once('/').unwrap();
            assert_eq!(copy_dir, dir);
            assert!(copy_name.len() <= limits::NAME_BYTES_MAX);
            assert!(copy_name.contains(".sync-conflict-"), "{copy_name}");
            // The copy of the copy fits too.
            let again = conflict_copy_name(&copy, &s);
            assert!(again.len() <= limits::PATH_BYTES_MAX);
            assert!(again.rsplit_once('/').unwrap().1.len() <= limits::NAME_BYTES_MAX);
        }
    }
}

#[test]
fn validation_catches_broken_records() {
    let good = write(None, 1, 1, 10, file(1));
    assert!(good.validate().is_ok());
    let mut no_sibling = good.clone();
    no_sibling.siblings.clear();
    assert_eq!(no_sibling.validate(), Err(RecordError::NoSibling));
    let mut uncovered = good.clone();
    uncovered.siblings[0].dot.counter = 5;
    assert_eq!(uncovered.validate(), Err(RecordError::DotNotCovered));
    let mut foreign = good.clone();
    foreign.siblings[0].hlc = ts(10, 2);
    assert_eq!(foreign.validate(), Err(RecordError::ForeignTimestamp));
    let mut two_from_one = good.clone();
    two_from_one.siblings.push(good.siblings[0].clone());
    assert_eq!(two_from_one.validate(), Err(RecordError::SiblingsUnordered));
    let bad_link = write(None, 1, 1, 10, Meta::symlink("a\0b".into()));
    assert_eq!(bad_link.validate(), Err(RecordError::BadSymlink));
}

#[test]
fn extended_attributes_are_checked() {
    let x = |n: &str, v: usize| (n.as_bytes().to_vec(), vec![7u8; v]);
    let ok = file(1)
        .with_owner(1000, 1000)
        .with_xattrs(vec![x("user.b", 3), x("user.a", 1)]);
    assert_eq!(ok.xattrs[0].0, b"user.a", "kept sorted");
    assert_eq!(write(None, 1, 1, 1, ok.clone()).validate(), Ok(()));
    let mut unsorted = ok.clone();
    unsorted.xattrs.reverse();
    assert_eq!(
        write(None, 1, 1, 1, unsorted).validate(),
        Err(RecordError::BadXattrs)
    );
    let huge = file(1).with_xattrs(vec![x("user.big", limits::XATTRS_BYTES_MAX)]);
    assert_eq!(
        write(None, 1, 1, 1, huge).validate(),
        Err(RecordError::BadXattrs)
    );
    let nul = file(1).with_xattrs(vec![(b"user.\0".to_vec(), vec![])]);
    assert_eq!(
        write(None, 1, 1, 1, nul).validate(),
        Err(RecordError::BadXattrs)
    );
    // Attributes are not content: the same bytes with other attributes merge without a copy.
    let a = write(None, 1, 1, 5, file(3));
    let b = write(None, 2, 1, 6, file(3).with_xattrs(vec![x("user.a", 1)]));
    assert!(!matches!(
        settle("p", Some(&a), &b),
        Decision::Conflict { .. }
    ));
}

/// The largest record `validate` accepts encodes within `limits::RECORD_ENCODED_BYTES_MAX`: what
/// the wire's frame limit is built on.
#[test]
fn the_largest_valid_record_fits_its_stated_size() {
    let mut vv = VersionVector::new();
    for i in 0..(limits::VV_ENTRIES_MAX - limits::SIBLINGS_MAX) as u64 {
        let mut id = [0xfeu8; 16];
        id[..8].copy_from_slice(&i.to_be_bytes());
        vv.add(Dot {
            node: NodeId(id),
            counter: u64::MAX,
        });
    }
    // Siblings from the nodes with the largest ids, the largest counters and times.
    let mut siblings = Vec::new();
    for i in 0..limits::SIBLINGS_MAX as u64 {
        let mut id = [0xffu8; 16];
        id[15] = 0xff - i as u8;
        let n = NodeId(id);
        let dot = Dot {
            node: n,
            counter: u64::MAX - i,
        };
        vv.add(dot);
        let xattrs: Vec<(Vec<u8>, Vec<u8>)> = (0..limits::XATTRS_MAX)
            .map(|k| {
                let name = format!("user.{k:03}").into_bytes();
                let value = vec![0xee; limits::XATTRS_BYTES_MAX / limits::XATTRS_MAX - name.len()];
                (name, value)
            })
            .collect();
        let meta = Meta::symlink("t".repeat(limits::SYMLINK_TARGET_BYTES_MAX))
            .with_owner(u32::MAX, u32::MAX)
            .with_xattrs(xattrs);
        let meta = Meta {
            mode: 0o7777,
            mtime_ns: i64::MIN,
            ..meta
        };
        siblings.push(Sibling {
            dot,
            hlc: Timestamp::new(NTP64(u64::MAX), n.hlc_id()),
            meta,
        });
    }
    siblings.sort();
    let record = Record {
        vv,
        siblings,
        author: Some(NodeId([0xff; 16])),
    };
    assert_eq!(record.validate(), Ok(()));
    assert_eq!(record.vv.len(), limits::VV_ENTRIES_MAX);
    let size = postcard::to_stdvec(&record).unwrap().len();
    assert!(
        size <= limits::RECORD_ENCODED_BYTES_MAX,
        "{size} > {}",
        limits::RECORD_ENCODED_BYTES_MAX
    );
    // The bound is not loose by much: it is what the frame limit is sized from.
    assert!(size * 10 >= limits::RECORD_ENCODED_BYTES_MAX * 9, "{size}");
}

/// More concurrent writers than a record may carry: the fold keeps the winner's content, has
/// seen every write, and is the same wherever it is made, so folds of one record merge.
#[test]
fn folds_of_too_many_siblings_agree_and_merge() {
    let writes: Vec<Record> = (1..=70)
        .map(|n| write(None, n, 1, 100 + n, file(n as u8)))
        .collect();
    let all = writes
        .iter()
        .skip(1)
        .fold(writes[0].clone(), |r, w| join(&r, w));
    assert_eq!(all.siblings.len(), 70);
    assert!(all.validate().is_err(), "70 siblings are over the limit");
    let folded = fold(&all);
    assert_eq!(folded.validate(), Ok(()));
    assert_eq!(folded.siblings.len(), 1);
    assert_eq!(folded.winner().meta, all.winner().meta);
    for w in &writes {
        assert!(folded.vv.covers(&w.siblings[0].dot));
    }
    // The same fold made on two nodes is one write.
    assert_eq!(join(&folded, &fold(&all)), folded);
    // Folds of different records with the same winner are concurrent writes of one content:
    // a merge, no copy.
    let some = writes[5..]
        .iter()
        .skip(1)
        .fold(writes[4].clone(), |r, w| join(&r, w));
    let other = fold(&some);
    let merged = join(&folded, &other);
    assert!(merged.siblings.len() <= 2);
    assert!(merged.copies("f", false).is_empty());
    // Every losing write is superseded by the fold: a node that still holds one takes the fold.
    assert_eq!(settle("f", Some(&writes[3]), &folded), Decision::TakeRemote);
}
