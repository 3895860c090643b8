//! Point-in-time recovery targets: parsing them (strictly, in UTC), picking
//! the backup they start from, and refusing those the archive cannot reach.

use crate::restore::RecoveryTarget;
use crate::{catalog, Repository};
use pg_hardstorage_engine::format::Manifest;
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;

/// Parses `--to`: RFC 3339, or relative ("5 minutes ago"), in UTC.
pub fn parse_when(s: &str) -> Result<time::OffsetDateTime, Problem> {
    use time::format_description::well_known::Rfc3339;
    let bad = || {
        Problem::new(Code::UsageInvalidTime, format!("cannot read time {s:?}")).suggest(
            "Use RFC 3339 (2026-11-27T10:20:18Z) or \"N seconds|minutes|hours|days ago\"",
            None,
        )
    };
    if let Ok(t) = time::OffsetDateTime::parse(s.trim(), &Rfc3339) {
        return Ok(t.to_offset(time::UtcOffset::UTC));
    }
    let parts: Vec<&str> = s.split_whitespace().collect();
    if let [n, unit, "ago"] = parts.as_slice() {
        let n: i64 = n.parse().map_err(|_| bad())?;
        let secs = match unit.trim_end_matches('s') {
            "second" => 1,
            "minute" => 60,
            "hour" => 3600,
            "day" => 86400,
            _ => return Err(bad()),
        };
        if n < 0 {
            return Err(bad());
        }
        return ago(n, secs).ok_or_else(bad);
    }
    Err(bad())
}

/// `n × unit` seconds before now; `None` past the representable times
/// (a huge `n` must be a usage error, never an overflow).
pub fn ago(n: i64, unit: i64) -> Option<time::OffsetDateTime> {
    let secs = n.checked_mul(unit)?;
    time::OffsetDateTime::now_utc().checked_sub(time::Duration::seconds(secs))
}

pub fn recovery_target(
    to: Option<&str>,
    to_lsn: Option<&str>,
    to_name: Option<&str>,
) -> Result<Option<RecoveryTarget>, Problem> {
    let given = [to.is_some(), to_lsn.is_some(), to_name.is_some()];
    if given.iter().filter(|g| **g).count() > 1 {
        return Err(Problem::new(
            Code::UsageInvalidArgument,
            "give at most one of --to, --to-lsn, --to-name",
        ));
    }
    if let Some(w) = to {
        let t = parse_when(w)?;
        let f = time::macros::format_description!(
            "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:6]+00"
        );
        return Ok(Some(RecoveryTarget::Time(
            t.format(&f).map_err(|e| Problem::internal(e.to_string()))?,
        )));
    }
    if let Some(l) = to_lsn {
        if phs_pg::parse_lsn(l).is_some() {
            return Ok(Some(RecoveryTarget::Lsn(l.to_string())));
        }
        return Err(Problem::new(
            Code::UsageInvalidArgument,
            format!("{l:?} is not an LSN (like 0/3000028)"),
        ));
    }
    if let Some(n) = to_name {
        return Ok(Some(RecoveryTarget::Name(n.to_string())));
    }
    Ok(None)
}

/// The backup a restore starts from: `which` (an id), or for `latest` the
/// newest backup that can reach the target — finished before a time target,
/// ended at or before an LSN target; the newest one otherwise.
pub fn choose_backup(
    r: &Repository,
    deployment: &str,
    which: &str,
    target: Option<&RecoveryTarget>,
    when: Option<&str>,
) -> Result<Manifest, Problem> {
    match (target, which) {
        (Some(RecoveryTarget::Time(_)), "latest") => latest_before(r, deployment, when),
        (Some(RecoveryTarget::Lsn(l)), "latest") => {
            let want = phs_pg::parse_lsn(l).unwrap_or(0);
            for b in catalog::list(r, Some(deployment))?.iter().rev() {
                let m = catalog::resolve(r, deployment, &b.backup_id)?;
                let end = m.source["end_lsn"].as_str().and_then(phs_pg::parse_lsn);
                if end.is_some_and(|e| e <= want) {
                    return Ok(m);
                }
            }
            Err(Problem::new(
                Code::RestoreTargetOutsideArchive,
                format!("no backup of {deployment:?} ended before {l}"),
            ))
        }
        _ => catalog::resolve(r, deployment, which),
    }
}

pub fn latest_before(
    r: &Repository,
    deployment: &str,
    when: Option<&str>,
) -> Result<Manifest, Problem> {
    let at = parse_when(when.unwrap_or_default())?;
    let all = catalog::list(r, Some(deployment))?;
    let pick = all.iter().rev().find(|b| {
        time::OffsetDateTime::parse(
            &b.finished_at,
            &time::format_description::well_known::Rfc3339,
        )
        .is_ok_and(|f| f <= at)
    });
    match pick {
        Some(b) => catalog::resolve(r, deployment, &b.backup_id),
        None => Err(Problem::new(
            Code::RestoreTargetOutsideArchive,
            format!(
                "no backup of {deployment:?} finished before {}",
                when.unwrap_or_default()
            ),
        )),
    }
}

/// Refuses targets the archive cannot reach: before the backup, past the
/// newest archived WAL, or behind a missing segment.
pub fn check_target(
    r: &Repository,
    deployment: &str,
    m: &Manifest,
    t: &RecoveryTarget,
    when: Option<&str>,
    archived: &[String],
) -> Result<(), Problem> {
    use crate::wal::{parse_segment_name, SEGMENT_SIZE};
    use time::format_description::well_known::Rfc3339;
    let outside = |msg: String| {
        Problem::new(Code::RestoreTargetOutsideArchive, msg)
            .with("deployment", deployment)
            .suggest(
                "Pick a target between a backup and the newest archived WAL",
                Some(format!("pg_hardstorage wal list {deployment}")),
            )
    };
    let segs: Vec<(u32, u64)> = archived
        .iter()
        .filter_map(|n| parse_segment_name(n))
        .collect();
    // Recovery stops at the first missing segment and, without a target
    // beyond it, promotes there: a hole after the backup must be refused.
    let tli = timeline(m);
    let end_seg = lsn(m, "end_lsn") / SEGMENT_SIZE;
    if let Some(newest) = segs
        .iter()
        .filter(|(t, _)| *t == tli)
        .map(|(_, s)| *s)
        .max()
    {
        for seg in (end_seg + 1)..newest {
            if !segs.contains(&(tli, seg)) && !matches!(t, RecoveryTarget::Lsn(_)) {
                let name = crate::wal::segment_name(tli, seg);
                return Err(Problem::new(
                    Code::RestoreWalMissing,
                    format!("WAL segment {name} is missing from the archive after backup {}", m.backup_id),
                )
                .with("segment", name)
                .suggest(
                    "Recovery would stop at the hole; restore to a target before it, or pass --force to accept that",
                    Some(format!("pg_hardstorage wal list {deployment}")),
                ));
            }
        }
    }
    match t {
        RecoveryTarget::Time(_) => {
            let at = parse_when(when.unwrap_or_default())?;
            let finished = time::OffsetDateTime::parse(&m.finished_at, &Rfc3339)
                .map_err(|e| Problem::internal(e.to_string()))?;
            if at < finished {
                return Err(outside(format!(
                    "{} is before backup {} finished ({})",
                    when.unwrap_or_default(),
                    m.backup_id,
                    m.finished_at
                )));
            }
            // WAL archived at time X holds nothing later than X.
            let newest = archived
                .iter()
                .filter(|n| parse_segment_name(n).is_some())
                .max_by_key(|n| parse_segment_name(n))
                .map(|n| crate::wal::record(r, deployment, n))
                .transpose()?
                .flatten();
            let archived_until = newest
                .as_ref()
                .and_then(|rec| time::OffsetDateTime::parse(&rec.archived_at, &Rfc3339).ok())
                .unwrap_or(finished);
            if at > archived_until {
                return Err(outside(format!(
                    "{} is past the archived WAL (newest segment archived at {archived_until})",
                    when.unwrap_or_default()
                )));
            }
        }
        RecoveryTarget::Lsn(l) => {
            let target = phs_pg::parse_lsn(l).unwrap_or(0);
            let end = lsn(m, "end_lsn");
            if target < end {
                return Err(outside(format!(
                    "{l} is before the end of backup {} ({})",
                    m.backup_id,
                    phs_pg::format_lsn(end)
                )));
            }
            let tli = timeline(m);
            // The backup carries its WAL through its end segment; every
            // later segment up to the target must be archived.
            for seg in (end / SEGMENT_SIZE + 1)..=(target / SEGMENT_SIZE) {
                if !segs.contains(&(tli, seg)) {
                    let name = crate::wal::segment_name(tli, seg);
                    return Err(Problem::new(
                        Code::RestoreWalMissing,
                        format!("WAL segment {name}, needed to reach {l}, is not in the archive"),
                    )
                    .with("segment", name)
                    .suggest(
                        "Check the WAL streamer, or pick an earlier target",
                        Some(format!("pg_hardstorage wal list {deployment}")),
                    ));
                }
            }
        }
        RecoveryTarget::Name(_) | RecoveryTarget::Latest => {}
    }
    Ok(())
}

/// The archived WAL a recovery from `m` may ask for: every history file,
/// and every segment from the one the backup started in onwards, on its
/// timeline and any later one.
pub fn needed_wal(m: &Manifest, archived: &[String]) -> Vec<String> {
    use crate::wal::{parse_segment_name, SEGMENT_SIZE};
    let (tli, start) = (timeline(m), lsn(m, "start_lsn") / SEGMENT_SIZE);
    archived
        .iter()
        .filter(|n| match parse_segment_name(n) {
            Some((t, seg)) => t > tli || (t == tli && seg >= start),
            None => n.ends_with(".history"),
        })
        .cloned()
        .collect()
}

/// Of the WAL files `needed` (in archive order), every history file and the
/// first `segments` segments (all of them when `segments` is 0): what a
/// restore stages when `restore_command` fetches the rest ahead of replay.
pub fn staged_window(needed: Vec<String>, segments: usize) -> Vec<String> {
    if segments == 0 {
        return needed;
    }
    let mut kept = 0;
    needed
        .into_iter()
        .filter(|n| {
            let keep = n.ends_with(".history") || kept < segments;
            kept += usize::from(!n.ends_with(".history"));
            keep
        })
        .collect()
}

/// The timeline a PostgreSQL backup was taken on.
fn timeline(m: &Manifest) -> u32 {
    m.source["timeline"].as_u64().unwrap_or(1) as u32
}

/// A position the backup's source records (`start_lsn`, `end_lsn`); 0 if absent.
fn lsn(m: &Manifest, field: &str) -> u64 {
    m.source[field]
        .as_str()
        .and_then(phs_pg::parse_lsn)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_relative_time_is_a_usage_error() {
        for s in [
            "9223372036854775807 days ago",
            "106751991167300 days ago",
            "-1 days ago",
        ] {
            let e = parse_when(s).expect_err(s);
            assert_eq!(e.code, "usage.invalid_time", "{s}: {e}");
        }
        assert!(parse_when("2 days ago").is_ok());
    }

    #[test]
    fn the_staged_window_keeps_history_and_the_first_segments() {
        let names: Vec<String> = [
            "000000010000000000000003",
            "00000002.history",
            "000000010000000000000004",
            "000000020000000000000004",
            "000000020000000000000005",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(staged_window(names.clone(), 0), names);
        assert_eq!(
            staged_window(names.clone(), 2),
            [
                "000000010000000000000003",
                "00000002.history",
                "000000010000000000000004"
            ]
        );
        assert_eq!(staged_window(names.clone(), 9), names);
    }
}
