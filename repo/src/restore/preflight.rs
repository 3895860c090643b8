//! Checks before a restore writes anything: the target is absolute and
//! empty (or forced), no live postmaster owns it, it is not another
//! cluster's data directory, and every tablespace directory passes the
//! same checks.

use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use std::path::Path;

/// A live postmaster owns `target`: its `postmaster.pid` names a running process.
fn live_postmaster(target: &Path) -> Option<i32> {
    let pidfile = std::fs::read_to_string(target.join("postmaster.pid")).ok()?;
    let pid: i32 = pidfile.lines().next()?.trim().parse().ok()?;
    // SAFETY: signal 0 only checks that the process exists.
    let alive = pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM));
    alive.then_some(pid)
}

/// The system identifier in a data directory's `global/pg_control`.
fn pg_system_identifier(dir: &Path) -> Option<u64> {
    let b = std::fs::read(dir.join("global/pg_control")).ok()?;
    Some(u64::from_le_bytes(b.get(..8)?.try_into().ok()?))
}

pub fn preflight(
    target: &Path,
    force: bool,
    delta: bool,
    sysid: Option<&str>,
) -> Result<(), Problem> {
    absolute(target, "target")?;
    // A delta restore writes into a data directory of this very cluster.
    if delta && !force && sysid.is_some() && pg_system_identifier(target).is_none() {
        let nonempty = std::fs::read_dir(target).is_ok_and(|mut d| d.next().is_some());
        if nonempty {
            return Err(Problem::new(
                Code::RestoreForeignSystem,
                format!(
                    "{} is not a PostgreSQL data directory (no global/pg_control): --delta writes only into one of the backed-up cluster",
                    target.display()
                ),
            )
            .with("target", target.display().to_string())
            .suggest("Restore into an empty directory without --delta, or pass --force", None));
        }
    }
    // A data directory of another cluster is named as such, not just "not empty".
    if let (Some(want), Some(have)) = (sysid, pg_system_identifier(target)) {
        if want != have.to_string() && !force {
            return Err(Problem::new(
                Code::RestoreForeignSystem,
                format!(
                    "{} holds the data directory of another cluster (system identifier {have}, the backup is of {want})",
                    target.display()
                ),
            )
            .with("target", target.display().to_string())
            .suggest("Restore into an empty directory; --force overwrites the other cluster", None));
        }
    }
    // Never overridable: writing under a running server destroys it.
    if let Some(pid) = live_postmaster(target) {
        return Err(Problem::new(
            Code::RestorePostmasterRunning,
            format!("PostgreSQL (pid {pid}) is running on {}", target.display()),
        )
        .with("target", target.display().to_string())
        .with("pid", pid)
        .suggest(
            "Stop that server first, or restore into another directory",
            Some(format!("pg_ctl -D {} stop", target.display())),
        ));
    }
    match std::fs::symlink_metadata(target) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Problem::io(
            Code::RestoreTargetInvalid,
            format!("target {}", target.display()),
            &e,
        )),
        Ok(m) if !m.is_dir() => Err(Problem::new(
            Code::RestoreTargetInvalid,
            format!("target {} exists and is not a directory", target.display()),
        )
        .with("target", target.display().to_string())),
        Ok(_) => preflight_dir(
            target,
            force || delta,
            "target",
            "Restore into an empty or new directory, or pass --force to write over it",
        ),
    }
}

/// A directory a restore writes into must be absent or empty (unless forced).
pub fn preflight_dir(dir: &Path, force: bool, what: &str, suggestion: &str) -> Result<(), Problem> {
    let nonempty = match std::fs::read_dir(dir) {
        Ok(mut d) => d.next().is_some(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => {
            return Err(Problem::io(
                Code::RestoreTargetInvalid,
                format!("{what} {}", dir.display()),
                &e,
            ))
        }
    };
    if nonempty && !force {
        return Err(Problem::new(
            Code::RestoreTargetNotEmpty,
            format!("{what} {} is not empty", dir.display()),
        )
        .with("target", dir.display().to_string())
        .suggest(suggestion, None));
    }
    Ok(())
}

/// A restore writes only to an absolute path: an empty or relative one
/// would land wherever the process (the API server) happens to run.
pub fn absolute(dir: &Path, what: &str) -> Result<(), Problem> {
    if dir.is_absolute() {
        return Ok(());
    }
    Err(Problem::new(
        Code::RestoreTargetInvalid,
        format!(
            "the {what} {:?} is not an absolute path",
            dir.display().to_string()
        ),
    )
    .with("target", dir.display().to_string())
    .suggest(
        "Give an absolute path, e.g. /var/lib/postgresql/restored",
        None,
    ))
}
