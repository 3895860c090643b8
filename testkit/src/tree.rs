//! Generated source trees and a digest that compares two trees exactly
//! (content, kind, mode, mtime, link target).

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

/// Writes `size` pseudo-random bytes (half text-like) in 1 MiB pieces.
pub fn write_big_file(path: &Path, size: u64, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut left = size;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n / 2]);
        for (i, b) in buf[n / 2..n].iter_mut().enumerate() {
            *b = b"the quick brown fox jumps over the lazy dog\n"[i % 44];
        }
        f.write_all(&buf[..n]).expect("write");
        left -= n as u64;
    }
    f.flush().expect("flush");
}

/// What the round-trip acceptance asks for: many small files, a big file,
/// empty files and dirs, symlinks, unicode names, modes, mtimes, a sparse file.
pub fn rich_tree(root: &Path, small_files: usize, big_file: u64) {
    let mut rng = Rng::new(1234);
    std::fs::create_dir_all(root.join("small/deeper/still")).expect("mkdir");
    for i in 0..small_files {
        let sub = match i % 3 {
            0 => "small",
            1 => "small/deeper",
            _ => "small/deeper/still",
        };
        let n = (rng.next_u64() % 9000) as usize;
        std::fs::write(
            root.join(sub).join(format!("file-{i:05}.dat")),
            rng.bytes(n),
        )
        .expect("write");
    }
    if big_file > 0 {
        write_big_file(&root.join("big.bin"), big_file, 99);
    }
    std::fs::write(root.join("empty"), b"").expect("empty");
    std::fs::create_dir_all(root.join("empty-dir")).expect("empty dir");
    std::fs::write(root.join("ünïcødé-名前.txt"), "unicode name\n").expect("unicode");
    std::fs::write(root.join("mode-0600"), b"private").expect("w");
    std::fs::set_permissions(
        root.join("mode-0600"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");
    std::fs::write(root.join("mode-0755"), b"#!/bin/sh\n").expect("w");
    std::fs::set_permissions(
        root.join("mode-0755"),
        std::fs::Permissions::from_mode(0o755),
    )
    .expect("chmod");
    std::os::unix::fs::symlink("small/file-00000.dat", root.join("link-rel")).expect("symlink");
    std::os::unix::fs::symlink("/nonexistent/target", root.join("link-dangling")).expect("symlink");
    std::os::unix::fs::symlink("empty-dir", root.join("link-dir")).expect("symlink");
    // Sparse: 64 MiB with two islands of data.
    let f = std::fs::File::create(root.join("sparse.img")).expect("sparse");
    f.set_len(64 << 20).expect("set_len");
    use std::os::unix::fs::FileExt;
    f.write_at(b"island one", 1 << 20).expect("write_at");
    f.write_at(b"island two", 40 << 20).expect("write_at");
    drop(f);
    let old = filetime::FileTime::from_unix_time(1_000_000_000, 123_456_789);
    filetime::set_file_mtime(root.join("mode-0600"), old).expect("mtime");
    filetime::set_file_mtime(root.join("small/deeper"), old).expect("mtime dir");
    filetime::set_symlink_file_times(root.join("link-rel"), old, old).expect("symlink mtime");
}

#[derive(Debug, PartialEq, Eq)]
pub struct Node {
    pub kind: &'static str,
    pub mode: u32,
    pub mtime: (i64, i64),
    pub size: u64,
    pub content: String,
}

/// Everything that must survive a round trip, per relative path.
pub fn digest(root: &Path) -> BTreeMap<Vec<u8>, Node> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<Vec<u8>, Node>) {
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        let rel = p
            .strip_prefix(root)
            .expect("prefix")
            .as_os_str()
            .as_bytes()
            .to_vec();
        let m = std::fs::symlink_metadata(&p).expect("lstat");
        let ft = m.file_type();
        let (kind, content) = if ft.is_symlink() {
            (
                "symlink",
                std::fs::read_link(&p)
                    .expect("readlink")
                    .display()
                    .to_string(),
            )
        } else if ft.is_dir() {
            walk(root, &p, out);
            ("dir", String::new())
        } else {
            let mut h = blake3::Hasher::new();
            h.update_reader(std::fs::File::open(&p).expect("open"))
                .expect("hash");
            ("file", h.finalize().to_hex().to_string())
        };
        out.insert(
            rel,
            Node {
                kind,
                mode: m.mode() & 0o7777,
                mtime: (m.mtime(), m.mtime_nsec()),
                size: if ft.is_file() { m.len() } else { 0 },
                content,
            },
        );
    }
}
