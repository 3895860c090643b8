//! PostgreSQL's own check of a restored data directory: `pg_verifybackup`
//! of the backup's major version. An older one rejects a newer manifest
//! (15 refuses 17+'s version-2 manifest), so the tool is chosen by its
//! `--version`, never taken from PATH blindly.

use super::{recovery, VerifyMode, IN_PROGRESS_MARKER};
use pg_hardstorage_engine::event::{Event, EventBus, Severity};
use pg_hardstorage_engine::{Code, Problem};
use serde_json::json;
use std::path::{Path, PathBuf};

/// The environment variable naming extra directories (colon-separated) to
/// look for `pg_verifybackup` in, before the usual places.
pub const BINDIRS_ENV: &str = "PG_HARDSTORAGE_PG_BINDIRS";

/// Directories from [`BINDIRS_ENV`].
pub fn bindirs_from_env() -> Vec<PathBuf> {
    std::env::var_os(BINDIRS_ENV)
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default()
}

/// Where `pg_verifybackup` may be: `extra` first, then Debian's
/// `/usr/lib/postgresql/<major>/bin`, `pg_config --bindir` and `PATH`.
fn candidates(extra: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = extra.to_vec();
    if let Ok(rd) = std::fs::read_dir("/usr/lib/postgresql") {
        dirs.extend(rd.flatten().map(|e| e.path().join("bin")));
    }
    let pg_config = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success());
    if let Some(o) = pg_config {
        dirs.push(PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    }
    if let Some(p) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&p));
    }
    let mut out: Vec<PathBuf> = Vec::new();
    for d in dirs {
        let t = d.join("pg_verifybackup");
        if t.is_file() && !out.contains(&t) {
            out.push(t);
        }
    }
    out
}

/// The major of `pg_verifybackup (PostgreSQL) 18.6`.
fn major_of_version(text: &str) -> Option<u32> {
    let v = text.split(')').nth(1)?.trim();
    v.split(['.', ' ']).next()?.parse().ok()
}

fn tool_major(tool: &Path) -> Option<u32> {
    let o = std::process::Command::new(tool)
        .arg("--version")
        .output()
        .ok()?;
    major_of_version(&String::from_utf8_lossy(&o.stdout))
}

/// The best tool for a backup of `major` whose manifest has `version`:
/// that major's; else, for a version-1 manifest, the newest newer one
/// (older tools refuse newer manifests, newer ones read older). A
/// version-1 manifest's files are all another major's tool checks (WAL
/// parsing turned off); a version-2 one names the system identifier, which
/// a tool checks in `pg_control`, whose layout is its own major's (18's
/// tool calls 17's pg_control CRC incorrect).
pub fn choose(tools: &[(PathBuf, u32)], major: u32, version: u32) -> Option<&(PathBuf, u32)> {
    tools.iter().find(|(_, m)| *m == major).or_else(|| {
        tools
            .iter()
            .filter(|(_, m)| version == 1 && *m > major)
            .max_by_key(|(_, m)| *m)
    })
}

/// `PostgreSQL-Backup-Manifest-Version` of the restored `backup_manifest`
/// (its first line), as the server wrote it.
fn manifest_version(target: &Path) -> Result<u32, Problem> {
    use std::io::Read;
    let mut head = [0u8; 256];
    let n = std::fs::File::open(target.join("backup_manifest"))
        .and_then(|mut f| f.read(&mut head))
        .map_err(|e| Problem::io(Code::VerifyMalformed, "backup_manifest of the restore", &e))?;
    let text = String::from_utf8_lossy(&head[..n]);
    text.split_once("\"PostgreSQL-Backup-Manifest-Version\":")
        .and_then(|(_, v)| {
            v.trim_start()
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .ok_or_else(|| Problem::new(Code::VerifyMalformed, "backup_manifest names no version"))
}

/// The restored cluster's major, from its `PG_VERSION`.
fn data_major(target: &Path) -> Result<u32, Problem> {
    let text = std::fs::read_to_string(target.join("PG_VERSION"))
        .map_err(|e| Problem::io(Code::VerifyMalformed, "PG_VERSION of the restore", &e))?;
    text.trim().parse().map_err(|_| {
        Problem::new(
            Code::VerifyMalformed,
            format!("PG_VERSION of the restore says {:?}", text.trim()),
        )
    })
}

/// Runs a `pg_verifybackup` of the backup's major on the restored data
/// directory: `passed`, `skipped`, or `unavailable` (with a warning event;
/// an error under `--verify require`).
pub fn run(
    target: &Path,
    mode: VerifyMode,
    extra: &[PathBuf],
    bus: &EventBus,
) -> Result<&'static str, Problem> {
    if mode == VerifyMode::Skip {
        return Ok("skipped");
    }
    let major = data_major(target)?;
    let version = manifest_version(target)?;
    let tools: Vec<(PathBuf, u32)> = candidates(extra)
        .into_iter()
        .filter_map(|t| tool_major(&t).map(|m| (t, m)))
        .collect();
    let Some((tool, tool_major)) = choose(&tools, major, version) else {
        return unavailable(mode, major, &tools, bus);
    };
    let mut cmd = std::process::Command::new(tool);
    if *tool_major != major {
        // Its pg_waldump reads only its own major's WAL: check the files
        // against the manifest and leave the WAL to recovery.
        cmd.arg("--no-parse-wal");
    }
    let out = cmd
        .arg("--ignore")
        .arg(IN_PROGRESS_MARKER)
        .arg("--ignore")
        .arg(recovery::SPOOL)
        .arg(target)
        .output()
        .map_err(|e| Problem::io(Code::RestoreVerifyUnavailable, tool.display(), &e))?;
    if out.status.success() {
        return Ok("passed");
    }
    Err(Problem::new(
        Code::VerifyPgVerifybackupFailed,
        format!(
            "pg_verifybackup {} rejected the restored directory: {}",
            tool.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    )
    .with("target", target.display().to_string()))
}

fn unavailable(
    mode: VerifyMode,
    major: u32,
    tools: &[(PathBuf, u32)],
    bus: &EventBus,
) -> Result<&'static str, Problem> {
    let found: Vec<String> = tools
        .iter()
        .map(|(t, m)| format!("{} ({m})", t.display()))
        .collect();
    let why = format!(
        "no pg_verifybackup of PostgreSQL {major} or newer is installed (found: {})",
        if found.is_empty() {
            "none".to_string()
        } else {
            found.join(", ")
        }
    );
    let hint = format!(
        "Install PostgreSQL {major}'s client programs, or name their directory in {BINDIRS_ENV}"
    );
    if mode == VerifyMode::Require {
        return Err(Problem::new(
            Code::RestoreVerifyUnavailable,
            format!("--verify require: {why}"),
        )
        .suggest(hint, None));
    }
    bus.publish(
        Event::new(Severity::Warning, "pg_verifybackup_unavailable")
            .body(json!({"major": major, "reason": why, "suggestion": hint})),
    );
    Ok("unavailable")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tool_of_the_backups_major_is_chosen_else_the_newest_newer_one() {
        assert_eq!(
            major_of_version("pg_verifybackup (PostgreSQL) 18.6\n"),
            Some(18)
        );
        assert_eq!(
            major_of_version("pg_verifybackup (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"),
            Some(15)
        );
        assert_eq!(major_of_version("garbage"), None);
        let t = |m: u32| (PathBuf::from(format!("/pg{m}/pg_verifybackup")), m);
        let tools = [t(15), t(18), t(17)];
        assert_eq!(choose(&tools, 15, 1), Some(&t(15)));
        assert_eq!(choose(&tools, 16, 1), Some(&t(18)));
        assert_eq!(choose(&tools, 17, 2), Some(&t(17)));
        assert_eq!(choose(&tools, 18, 2), Some(&t(18)));
        assert_eq!(choose(&[t(15)], 13, 1), Some(&t(15)));
        // An older tool refuses a newer manifest: never chosen; nor another
        // major's for a version-2 manifest (it misreads pg_control).
        assert_eq!(choose(&[t(15)], 18, 2), None);
        assert_eq!(choose(&[t(15), t(18)], 17, 2), None);
        assert_eq!(choose(&[t(18)], 16, 2), None, "the manifest decides");
    }

    #[test]
    fn the_manifest_version_is_read_from_the_restored_manifest() {
        let d = tempfile::tempdir().expect("tmp");
        let m = d.path().join("backup_manifest");
        std::fs::write(
            &m,
            "{ \"PostgreSQL-Backup-Manifest-Version\": 2,\n\"System-Identifier\": 7,\n",
        )
        .expect("w");
        assert_eq!(manifest_version(d.path()).expect("v"), 2);
        std::fs::write(
            &m,
            "{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [",
        )
        .expect("w");
        assert_eq!(manifest_version(d.path()).expect("v"), 1);
        std::fs::write(&m, "{}").expect("w");
        assert!(manifest_version(d.path()).is_err());
    }
}
