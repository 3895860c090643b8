//! Recovery settings of a restored PostgreSQL data directory:
//! `recovery.signal` and lines appended to `postgresql.auto.conf`, written
//! beneath the target without following links, values quoted as
//! PostgreSQL's own configuration parser reads them.

use super::dest::Root;
use pg_hardstorage_engine::format::Entry;
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
    pub restore_command: String,
    pub target: RecoveryTarget,
}

/// A configuration value quoted for `postgresql.conf`: PostgreSQL's parser
/// reads `''` and `\'` as a quote and treats a backslash as an escape, so
/// both are doubled or escaped; a control character (a newline would end
/// the line and start a setting of the attacker's choosing) is refused.
pub fn quote_conf(what: &str, v: &str) -> Result<String, Problem> {
    if let Some(c) = v.chars().find(|c| c.is_control()) {
        return Err(Problem::new(
            "usage.invalid_argument",
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
pub fn recovery_conf(r: &Recovery, backup_id: &str) -> Result<String, Problem> {
    let mut conf = format!(
        "\n# pg_hardstorage: archive recovery for {}\nrestore_command = {}\n",
        backup_id.replace(|c: char| c.is_control(), ""),
        quote_conf("restore_command", &r.restore_command)?
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
    let conf = recovery_conf(r, backup_id)?;
    let auto = target.append(b"postgresql.auto.conf", conf.as_bytes())?;
    let signal = target.create_file(b"recovery.signal", 0)?;
    if unsafe { libc::geteuid() } == 0 {
        for (f, name) in [
            (&auto, "postgresql.auto.conf"),
            (&signal, "recovery.signal"),
        ] {
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
