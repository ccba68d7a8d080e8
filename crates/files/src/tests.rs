#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::*;

fn payload(pairs: &[(&str, &str)]) -> BTreeMap<String, SecretString> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), SecretString::from(*v)))
        .collect()
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap()
}

fn internal_entries(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".."))
        .collect();
    v.sort();
    v
}

fn sorted(names: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    v.sort();
    v
}

#[test]
fn validates_names() {
    for bad in [
        "",
        "/etc/passwd",
        "a/../b",
        "..",
        "../x",
        "a//b",
        "a/",
        "./a",
        "a/./b",
        "..data",
        "..x",
        "a\0b",
    ] {
        assert!(validate_name(bad).is_err(), "{bad:?} accepted");
    }
    for good in ["password", "tls.crt", "a/b/c", ".hidden", "a..b"] {
        validate_name(good).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let w = AtomicDir::new(dir.path());
    let err = w
        .write(
            &payload(&[("a", "1"), ("a/b", "2")]),
            WriteOptions::default(),
        )
        .unwrap_err();
    assert!(matches!(err, FilesError::InvalidName { .. }), "{err}");
    let err = w
        .write(&payload(&[("../escape", "1")]), WriteOptions::default())
        .unwrap_err();
    assert!(matches!(err, FilesError::InvalidName { .. }));
    assert!(
        fs::read_dir(dir.path()).unwrap().next().is_none(),
        "nothing written on invalid input"
    );
}

#[test]
fn writes_layout_modes_and_group() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let w = AtomicDir::new(root);
    let gid = rustix::process::getgid().as_raw();
    let opts = WriteOptions {
        gid: Some(gid),
        ..WriteOptions::default()
    };
    let out = w
        .write(
            &payload(&[
                ("username", "alice"),
                ("password", "s3cret"),
                ("tls/ca.crt", "CA"),
            ]),
            opts,
        )
        .unwrap();
    assert!(out.changed);
    assert_eq!(read(&root.join("username")), "alice");
    assert_eq!(read(&root.join("password")), "s3cret");
    assert_eq!(read(&root.join("tls/ca.crt")), "CA");
    assert_eq!(
        fs::read_link(root.join("password")).unwrap(),
        Path::new("..data/password")
    );
    assert_eq!(
        fs::read_link(root.join("tls")).unwrap(),
        Path::new("..data/tls")
    );
    assert_eq!(
        fs::read_link(root.join(DATA_LINK)).unwrap(),
        Path::new(&out.data_dir)
    );
    let data = root.join(&out.data_dir);
    for f in ["username", "password", "tls/ca.crt"] {
        let m = fs::metadata(data.join(f)).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o440, "{f}");
        assert_eq!(m.gid(), gid);
    }
    for d in [data.clone(), data.join("tls")] {
        let m = fs::metadata(&d).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o550);
        assert_eq!(m.gid(), gid);
    }
    assert_eq!(internal_entries(root), sorted(&[DATA_LINK, &out.data_dir]));
}

#[test]
fn unchanged_content_is_idempotent_and_changes_rotate() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let w = AtomicDir::new(root);
    let first = w
        .write(&payload(&[("a", "1"), ("b", "2")]), WriteOptions::default())
        .unwrap();
    let again = w
        .write(&payload(&[("a", "1"), ("b", "2")]), WriteOptions::default())
        .unwrap();
    assert!(!again.changed);
    assert_eq!(again.data_dir, first.data_dir);

    // A mode change is a change.
    let relaxed = WriteOptions {
        file_mode: 0o444,
        ..WriteOptions::default()
    };
    let moded = w
        .write(&payload(&[("a", "1"), ("b", "2")]), relaxed)
        .unwrap();
    assert!(moded.changed);

    // New content, one name dropped, one added.
    let second = w
        .write(
            &payload(&[("a", "10"), ("c", "3")]),
            WriteOptions::default(),
        )
        .unwrap();
    assert!(second.changed);
    assert_eq!(second.removed, vec!["b".to_owned()]);
    assert_eq!(read(&root.join("a")), "10");
    assert_eq!(read(&root.join("c")), "3");
    assert!(fs::symlink_metadata(root.join("b")).is_err());
    assert_eq!(
        internal_entries(root),
        sorted(&[DATA_LINK, &second.data_dir])
    );

    let current = w.read_current().unwrap().unwrap();
    assert_eq!(current.data_dir, second.data_dir);
    let names: Vec<&str> = current.files.keys().map(String::as_str).collect();
    assert_eq!(names, ["a", "c"]);
    assert_eq!(current.files["a"].expose_secret(), b"10");
    // Debug never shows contents.
    assert!(!format!("{current:?}").contains("10\""));
}

#[test]
fn repairs_missing_visible_link_and_leftovers() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let w = AtomicDir::new(root);
    let first = w
        .write(&payload(&[("a", "1")]), WriteOptions::default())
        .unwrap();
    fs::remove_file(root.join("a")).unwrap();
    fs::create_dir(root.join("..2000_01_01_00_00_00.deadbeef")).unwrap();
    let out = w
        .write(&payload(&[("a", "1")]), WriteOptions::default())
        .unwrap();
    assert!(!out.changed);
    assert_eq!(read(&root.join("a")), "1");
    // A later real write clears the leftover of an interrupted one.
    let out = w
        .write(&payload(&[("a", "2")]), WriteOptions::default())
        .unwrap();
    assert_ne!(out.data_dir, first.data_dir);
    assert_eq!(internal_entries(root), sorted(&[DATA_LINK, &out.data_dir]));
}

#[test]
fn remove_all_and_read_empty() {
    let dir = tempfile::tempdir().unwrap();
    let w = AtomicDir::new(dir.path());
    assert!(w.read_current().unwrap().is_none());
    w.write(
        &payload(&[("a", "1"), ("d/e", "2")]),
        WriteOptions::default(),
    )
    .unwrap();
    w.remove_all().unwrap();
    assert!(fs::read_dir(dir.path()).unwrap().next().is_none());
    assert!(w.read_current().unwrap().is_none());
    w.remove_all().unwrap();
    AtomicDir::new(dir.path().join("missing"))
        .remove_all()
        .unwrap();
}

#[test]
fn secret_bytes_payload() {
    let dir = tempfile::tempdir().unwrap();
    let w = AtomicDir::new(dir.path());
    let mut files: BTreeMap<String, SecretBytes> = BTreeMap::new();
    files.insert("bin".into(), SecretSlice::from(vec![0u8, 1, 2, 255]));
    w.write(&files, WriteOptions::default()).unwrap();
    assert_eq!(
        fs::read(dir.path().join("bin")).unwrap(),
        vec![0u8, 1, 2, 255]
    );
}

/// Content of version `v` for file `name`: large enough that a torn write
/// would be visible, uniform so any mix is detectable.
fn version_content(name: &str, v: usize) -> String {
    let line = format!("{name}:{v:06};");
    line.repeat(64 * 1024 / line.len())
}

fn parse_version(name: &str, content: &str) -> usize {
    let expected_len = version_content(name, 0).len();
    assert_eq!(content.len(), expected_len, "torn file {name}");
    let first = &content[..name.len() + 8];
    let v: usize = first[name.len() + 1..name.len() + 7].parse().unwrap();
    assert_eq!(content, version_content(name, v), "mixed content in {name}");
    v
}

#[test]
fn concurrent_readers_never_see_a_mix() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let w = AtomicDir::new(&root);
    let write_version = |v: usize| {
        let files: BTreeMap<String, SecretString> = ["username", "password"]
            .iter()
            .map(|n| ((*n).to_owned(), SecretString::from(version_content(n, v))))
            .collect();
        w.write(&files, WriteOptions::default()).unwrap();
    };
    write_version(0);

    let stop = Arc::new(AtomicBool::new(false));
    let consistent_reads = Arc::new(AtomicUsize::new(0));
    let visible_reads = Arc::new(AtomicUsize::new(0));

    // Reader 1: both files through one resolution of `..data` must be the same version.
    let r1 = {
        let (stop, count, w) = (stop.clone(), consistent_reads.clone(), w.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let cur = w.read_current().unwrap().unwrap();
                let u = parse_version(
                    "username",
                    std::str::from_utf8(cur.files["username"].expose_secret()).unwrap(),
                );
                let p = parse_version(
                    "password",
                    std::str::from_utf8(cur.files["password"].expose_secret()).unwrap(),
                );
                assert_eq!(u, p, "files from different versions");
                count.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // Reader 2: opens the user-visible paths, as a pod does; each file must be
    // one complete version, and versions never go backwards.
    let r2 = {
        let (stop, count, root) = (stop.clone(), visible_reads.clone(), root.clone());
        std::thread::spawn(move || {
            let mut last = 0;
            while !stop.load(Ordering::Relaxed) {
                for name in ["username", "password"] {
                    match fs::read_to_string(root.join(name)) {
                        Ok(c) => {
                            let v = parse_version(name, &c);
                            assert!(v + 1 >= last, "went back from {last} to {v}");
                            last = last.max(v);
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                        // The path resolved `..data` to the version that was
                        // being deleted at that very moment: retry.
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        })
    };
    for v in 1..=200 {
        write_version(v);
    }
    stop.store(true, Ordering::Relaxed);
    r1.join().unwrap();
    r2.join().unwrap();
    assert!(consistent_reads.load(Ordering::Relaxed) > 0);
    assert!(visible_reads.load(Ordering::Relaxed) > 0);
    let cur = w.read_current().unwrap().unwrap();
    assert_eq!(
        parse_version(
            "username",
            std::str::from_utf8(cur.files["username"].expose_secret()).unwrap()
        ),
        200
    );
}

#[test]
fn write_file_atomic_replaces_with_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    write_file_atomic(&path, b"{\"v\":1}", 0o600).unwrap();
    write_file_atomic(&path, b"{\"v\":2}", 0o600).unwrap();
    assert_eq!(read(&path), "{\"v\":2}");
    assert_eq!(fs::metadata(&path).unwrap().mode() & 0o7777, 0o600);
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
}
