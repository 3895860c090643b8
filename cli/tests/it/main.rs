//! The CLI as a user scripts it: envelopes, NDJSON, exit codes, crashes.

mod api;
mod crash;
mod envelopes;
mod formats;
mod maintenance;
mod pitr;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const BIN: &str = env!("CARGO_BIN_EXE_pg_hardstorage");

pub struct Env {
    pub tmp: tempfile::TempDir,
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}

impl Env {
    pub fn new() -> Self {
        Env {
            tmp: tempfile::tempdir().expect("tmp"),
        }
    }
    pub fn repo(&self) -> PathBuf {
        self.tmp.path().join("repo")
    }
    pub fn path(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .env("PG_HARDSTORAGE_REPO", self.repo())
            .env("PG_HARDSTORAGE_PASSPHRASE", "cli test passphrase")
            .env("PG_HARDSTORAGE_KDF_MEMORY_KIB", "8192")
            .env_remove("PG_HARDSTORAGE_FAULT_PUT_DELAY_MS");
        c
    }
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run pg_hardstorage")
    }
    /// Runs with `-o json`; returns (exit code, parsed stdout).
    pub fn json(&self, args: &[&str]) -> (i32, Value) {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let o = self.run(&a);
        let v = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
            panic!(
                "{args:?}: stdout is not JSON ({e}): {}\nstderr: {}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        });
        (o.status.code().unwrap_or(-1), v)
    }
    /// A path deployment over `files` random files of `size` bytes under
    /// `<tmp>/<name>`; returns the directory.
    pub fn path_deployment(&self, name: &str, files: usize, size: usize) -> PathBuf {
        let src = self.path(name);
        write_tree(&src, files, size);
        self.ok(&[
            "deployment",
            "create",
            name,
            "--path",
            src.to_str().expect("utf8"),
        ]);
        src
    }

    /// Takes a backup; returns its id.
    pub fn backup_id(&self, deployment: &str) -> String {
        self.ok(&["backup", "run", deployment])["backup_id"]
            .as_str()
            .expect("backup id")
            .to_string()
    }

    pub fn ok(&self, args: &[&str]) -> Value {
        let (code, v) = self.json(args);
        assert_eq!(code, 0, "{args:?} failed: {v}");
        v["result"]["body"].clone()
    }
}

pub fn write_tree(root: &Path, files: usize, size: usize) {
    std::fs::create_dir_all(root).expect("mkdir");
    let mut rng = pg_hardstorage_testkit::tree::Rng::new(files as u64 + size as u64);
    for i in 0..files {
        std::fs::write(root.join(format!("f{i:04}")), rng.bytes(size)).expect("write");
    }
}
