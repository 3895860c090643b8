//! Recovery settings of a restored PostgreSQL data directory:
//! `recovery.signal` and lines appended to `postgresql.auto.conf`, written
//! beneath the target without following links, values quoted as
//! PostgreSQL's own configuration parser reads them.

use super::dest::Root;
use pg_hardstorage_engine::format::Entry;
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;

/// Where recovery stops.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecoveryTarget {
    /// The end of the archive.
    Latest,
    /// `YYYY-MM-DD HH:MM:SS.ffffff+00`.
    Time(String),
    Lsn(String),
    Name(String),
}

#[derive(Clone, Debug)]
pub struct Recovery {
    /// `wal fetch` from the repository, for WAL past the staged files
    /// (`None`: no key material PostgreSQL's user can read; then every WAL
    /// file recovery may need is staged and anything else is "not archived").
    pub restore_command: Option<String>,
    pub target: RecoveryTarget,
    /// WAL files (segments and history files) the restore copies, verified,
    /// into [`SPOOL`] for `restore_command` to move into place.
    pub staged: Vec<String>,
    /// With a `restore_command`: the restore stages only this many segments
    /// (and every history file), and each segment `wal fetch` delivers
    /// starts a background fill of the spool with the next this many, a
    /// window ahead of replay (0: stage everything, fill nothing).
    pub prefetch: usize,
}

/// Segments staged and kept ahead of replay by default: 1 GiB of 16 MiB
/// segments.
pub const DEFAULT_PREFETCH: usize = 64;

impl Recovery {
    /// The command `restore_command` falls back to past the spool: `wal
    /// fetch`, told to keep the spool filled `prefetch` segments ahead.
    fn fallback(&self, spool: &std::path::Path) -> Option<String> {
        let rc = self.restore_command.as_deref()?;
        Some(match self.prefetch {
            0 => rc.to_string(),
            n => format!(
                "{rc} --spool {} --prefetch {n}",
                command_word(&spool.display().to_string())
            ),
        })
    }
}

/// The directory in the target the restore stages WAL into.
pub const SPOOL: &str = "pg_hardstorage_wal";

/// `restore_command`: a staged file is moved into place (a history file,
/// which recovery may ask for again, copied); any other is fetched through
/// `fallback`, or is "not archived" (exit 1) without one. A failed move
/// exits 255, so recovery stops instead of promoting without that WAL.
pub fn staged_command(spool: &std::path::Path, fallback: Option<&str>) -> String {
    let dir = command_word(&spool.display().to_string());
    let other = fallback.unwrap_or("exit 1");
    format!(
        "f={dir}/%f; if [ -f \"$f\" ]; then case %f in *.history) cp \"$f\" %p;; *) mv \"$f\" %p;; esac || exit 255; else {other}; fi"
    )
}

/// A configuration value quoted for `postgresql.conf`: PostgreSQL's parser
/// reads `''` and `\'` as a quote and treats a backslash as an escape, so
/// both are doubled or escaped; a control character (a newline would end
/// the line and start a setting of the attacker's choosing) is refused.
pub fn quote_conf(what: &str, v: &str) -> Result<String, Problem> {
    if let Some(c) = v.chars().find(|c| c.is_control()) {
        return Err(Problem::new(
            Code::UsageInvalidArgument,
            format!("{what} contains the control character {c:?}, which a PostgreSQL setting cannot hold"),
        )
        .with("setting", what)
        .suggest("Remove newlines and other control characters from the value", None));
    }
    Ok(format!("'{}'", v.replace('\\', "\\\\").replace('\'', "''")))
}

/// One shell word for a command PostgreSQL runs (`restore_command`): single
/// quoted (a quote inside becomes `'\''`), and every `%` doubled, since
/// PostgreSQL replaces `%f`, `%p`, `%r` and `%%` before the shell sees it.
pub fn command_word(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''").replace('%', "%%"))
}

/// The settings appended to `postgresql.auto.conf`.
pub fn recovery_conf(
    r: &Recovery,
    spool: &std::path::Path,
    backup_id: &str,
) -> Result<String, Problem> {
    let cmd = staged_command(spool, r.fallback(spool).as_deref());
    let mut conf = format!(
        "\n# pg_hardstorage: archive recovery for {}\nrestore_command = {}\n",
        backup_id.replace(|c: char| c.is_control(), ""),
        quote_conf("restore_command", &cmd)?
    );
    let (name, value) = match &r.target {
        RecoveryTarget::Latest => return Ok(conf),
        RecoveryTarget::Time(t) => ("recovery_target_time", t),
        RecoveryTarget::Lsn(l) => ("recovery_target_lsn", l),
        RecoveryTarget::Name(n) => ("recovery_target_name", n),
    };
    conf.push_str(&format!("{name} = {}\n", quote_conf(name, value)?));
    conf.push_str("recovery_target_action = 'promote'\nrecovery_target_inclusive = off\n");
    Ok(conf)
}

/// Writes `recovery.signal` and the recovery settings beneath `target`,
/// owned like the data directory. A link at either name is replaced by a
/// file, never followed.
pub fn write_recovery(
    target: &Root,
    r: &Recovery,
    root: &Entry,
    backup_id: &str,
) -> Result<(), Problem> {
    let conf = recovery_conf(r, &target.path().join(SPOOL), backup_id)?;
    write_signal(target, &conf, "recovery.signal", root)
}

/// `restore --standby`: the restored cluster starts as a standby
/// (`standby.signal`), of `primary_conninfo` when given (appended to
/// `postgresql.auto.conf`; else the one the backup holds, if any).
#[derive(Clone, Debug, Default)]
pub struct Standby {
    pub primary_conninfo: Option<String>,
}

/// The settings a standby restore appends.
pub fn standby_conf(s: &Standby, backup_id: &str) -> Result<String, Problem> {
    let mut conf = format!(
        "\n# pg_hardstorage: a standby restored from {}\n",
        backup_id.replace(|c: char| c.is_control(), "")
    );
    if let Some(ci) = &s.primary_conninfo {
        conf.push_str(&format!(
            "primary_conninfo = {}\n",
            quote_conf("primary_conninfo", ci)?
        ));
    }
    Ok(conf)
}

/// Writes `standby.signal` and the standby settings beneath `target`.
pub fn write_standby(
    target: &Root,
    s: &Standby,
    root: &Entry,
    backup_id: &str,
) -> Result<(), Problem> {
    write_signal(target, &standby_conf(s, backup_id)?, "standby.signal", root)
}

/// Appends `conf` to `postgresql.auto.conf` and creates `signal`, both
/// owned like the data directory. A link at either name is replaced by a
/// file, never followed.
fn write_signal(target: &Root, conf: &str, signal: &str, root: &Entry) -> Result<(), Problem> {
    let auto = target.append(b"postgresql.auto.conf", conf.as_bytes())?;
    let sig = target.create_file(signal.as_bytes(), 0)?;
    if unsafe { libc::geteuid() } == 0 {
        for (f, name) in [(&auto, "postgresql.auto.conf"), (&sig, signal)] {
            std::os::unix::fs::fchown(f, Some(root.uid), Some(root.gid))
                .map_err(|e| super::dest::werr(&target.path().join(name), e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_quoted_as_postgresql_reads_them_and_newlines_refused() {
        assert_eq!(quote_conf("x", "it's").expect("ok"), "'it''s'");
        // A trailing backslash would escape the closing quote.
        assert_eq!(quote_conf("x", "a\\").expect("ok"), "'a\\\\'");
        let e =
            quote_conf("recovery_target_name", "x\\\nrestore_command = 'sh'").expect_err("refused");
        assert_eq!(e.code.as_ref(), "usage.invalid_argument");
    }

    /// Runs `restore_command` as PostgreSQL would: %f and %p replaced, in
    /// the data directory, through sh.
    fn run_as_postgres(cmd: &str, dir: &std::path::Path, f: &str) -> Option<i32> {
        let line = cmd
            .replace("%f", f)
            .replace("%p", "pg_wal/RECOVERYXLOG")
            .replace("%%", "%");
        std::process::Command::new("sh")
            .arg("-c")
            .arg(line)
            .current_dir(dir)
            .status()
            .expect("sh")
            .code()
    }

    #[test]
    fn the_staged_command_moves_segments_copies_history_and_falls_back() {
        let tmp = tempfile::tempdir().expect("tmp");
        let data = tmp.path().join("it's 100%");
        let spool = data.join(SPOOL);
        std::fs::create_dir_all(&spool).expect("mkdir");
        std::fs::create_dir_all(data.join("pg_wal")).expect("mkdir");
        let seg = "000000010000000000000003";
        std::fs::write(spool.join(seg), b"wal").expect("write");
        std::fs::write(spool.join("00000002.history"), b"h").expect("write");
        let cmd = staged_command(&spool, None);
        let got = || std::fs::read(data.join("pg_wal/RECOVERYXLOG")).expect("read");
        assert_eq!(run_as_postgres(&cmd, &data, seg), Some(0));
        assert_eq!(got(), b"wal");
        assert!(!spool.join(seg).exists(), "moved");
        for _ in 0..2 {
            assert_eq!(run_as_postgres(&cmd, &data, "00000002.history"), Some(0));
            assert_eq!(got(), b"h");
        }
        // Not staged, no fallback: "not archived".
        assert_eq!(
            run_as_postgres(&cmd, &data, "000000010000000000000004"),
            Some(1)
        );
        // With one: its exit status.
        let with = staged_command(&spool, Some("exit 7"));
        assert_eq!(
            run_as_postgres(&with, &data, "000000010000000000000004"),
            Some(7)
        );
        // A move that fails stops recovery.
        std::fs::write(spool.join(seg), b"wal").expect("write");
        std::fs::remove_dir_all(data.join("pg_wal")).expect("rm");
        assert_eq!(run_as_postgres(&cmd, &data, seg), Some(255));
    }

    #[test]
    fn a_command_word_survives_postgresql_and_the_shell() {
        let word = command_word("/k/it's 100%; rm -rf ~");
        assert_eq!(word, "'/k/it'\\''s 100%%; rm -rf ~'");
        // What PostgreSQL hands the shell after its % substitution.
        let after_pg = word.replace("%%", "%");
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {after_pg}"))
            .output()
            .expect("sh");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "/k/it's 100%; rm -rf ~"
        );
    }
}
