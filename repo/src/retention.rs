//! Retention: which backups a keep-last / daily / weekly / monthly policy
//! keeps. The newest backup is always kept, and a held one is never
//! deleted; the rest are soft-deleted (tombstoned) with `--apply` and
//! reclaimed by the next `repo gc --apply`.

use crate::backup::BackupSummary;
use crate::Repository;
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use serde::Serialize;
use std::collections::{BTreeSet, HashSet};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub keep_last: usize,
    pub keep_daily: usize,
    pub keep_weekly: usize,
    pub keep_monthly: usize,
}

impl Policy {
    pub fn is_empty(&self) -> bool {
        *self == Policy::default()
    }
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Decision {
    pub backup_id: String,
    pub finished_at: String,
    pub keep: bool,
    /// Why it is kept (`newest`, `last`, `daily`, `weekly`, `monthly`, `held`).
    pub reasons: Vec<String>,
}

/// Decides, newest first. `backups` may be in any order.
pub fn decide(backups: &[BackupSummary], p: &Policy) -> Vec<Decision> {
    let mut sorted: Vec<&BackupSummary> = backups.iter().collect();
    sorted.sort_by(|a, b| (&b.finished_at, &b.backup_id).cmp(&(&a.finished_at, &a.backup_id)));
    let mut seen: [HashSet<String>; 3] = Default::default();
    let limits = [p.keep_daily, p.keep_weekly, p.keep_monthly];
    let names = ["daily", "weekly", "monthly"];
    sorted
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let mut reasons = Vec::new();
            if i == 0 {
                reasons.push("newest".to_string());
            }
            if i < p.keep_last {
                reasons.push("last".into());
            }
            if let Ok(t) = OffsetDateTime::parse(&b.finished_at, &Rfc3339) {
                let t = t.to_offset(time::UtcOffset::UTC);
                let (iso_year, week, _) = t.to_iso_week_date();
                let buckets = [
                    format!("{}", t.date()),
                    format!("{iso_year}-W{week}"),
                    format!("{}-{:02}", t.year(), t.month() as u8),
                ];
                for k in 0..3 {
                    // The newest backup of each period, for the newest N periods.
                    if seen[k].len() < limits[k] && seen[k].insert(buckets[k].clone()) {
                        reasons.push(names[k].into());
                    }
                }
            }
            if b.held {
                reasons.push("held".into());
            }
            Decision {
                backup_id: b.backup_id.clone(),
                finished_at: b.finished_at.clone(),
                keep: !reasons.is_empty(),
                reasons,
            }
        })
        .collect()
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PruneReport {
    pub deployment: String,
    pub applied: bool,
    pub kept: u64,
    pub deleted: u64,
    pub decisions: Vec<Decision>,
}

/// Applies a policy to a deployment's live backups (dry-run unless `apply`).
pub fn prune(
    repo: &Repository,
    deployment: &str,
    p: &Policy,
    apply: bool,
    by: &str,
) -> Result<PruneReport, Problem> {
    if p.is_empty() {
        return Err(Problem::new(
            Code::UsageInvalidArgument,
            "a retention policy needs at least one of --keep-last, --keep-daily, --keep-weekly, --keep-monthly",
        )
        .suggest("e.g. --keep-daily 7 --keep-weekly 4 --keep-monthly 12", None));
    }
    crate::deployment::get(repo, deployment)?;
    let backups = crate::catalog::list(repo, Some(deployment))?;
    let decisions = decide(&backups, p);
    let mut deleted = BTreeSet::new();
    if apply {
        for d in decisions.iter().filter(|d| !d.keep) {
            crate::ops::backups_delete(repo, &d.backup_id, by, Some("retention policy".into()))?;
            deleted.insert(d.backup_id.clone());
        }
    }
    Ok(PruneReport {
        deployment: deployment.to_string(),
        applied: apply,
        kept: decisions.iter().filter(|d| d.keep).count() as u64,
        deleted: decisions.iter().filter(|d| !d.keep).count() as u64,
        decisions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(id: &str, at: &str, held: bool) -> BackupSummary {
        BackupSummary {
            backup_id: id.into(),
            deployment: "d".into(),
            kind: "full".into(),
            started_at: at.into(),
            finished_at: at.into(),
            files: 0,
            bytes_logical: 0,
            bytes_added: 0,
            chunks: 0,
            held,
        }
    }

    #[test]
    fn daily_weekly_monthly_and_the_newest() {
        // Two a day over 40 days, one of them held.
        let mut all = Vec::new();
        for day in 0..40 {
            let date = time::Date::from_calendar_date(2026, time::Month::October, 1)
                .expect("date")
                .saturating_add(time::Duration::days(day));
            for h in [6, 18] {
                let at = format!("{date}T{h:02}:00:00Z");
                all.push(b(&format!("d.full.{day}-{h}"), &at, day == 3 && h == 6));
            }
        }
        let p = Policy {
            keep_last: 2,
            keep_daily: 7,
            keep_weekly: 4,
            keep_monthly: 3,
        };
        let d = decide(&all, &p);
        let kept: Vec<&Decision> = d.iter().filter(|x| x.keep).collect();
        assert!(d[0].reasons.contains(&"newest".into()));
        assert_eq!(
            d.iter()
                .filter(|x| x.reasons.contains(&"daily".into()))
                .count(),
            7
        );
        assert_eq!(
            d.iter()
                .filter(|x| x.reasons.contains(&"weekly".into()))
                .count(),
            4
        );
        assert_eq!(
            d.iter()
                .filter(|x| x.reasons.contains(&"monthly".into()))
                .count(),
            2
        );
        assert!(d
            .iter()
            .any(|x| x.backup_id == "d.full.3-6" && x.keep && x.reasons == ["held"]));
        // Daily keeps the evening (newest) backup of each of the last 7 days.
        assert!(d.iter().any(|x| x.backup_id == "d.full.39-18" && x.keep));
        assert!(d.iter().any(|x| x.backup_id == "d.full.38-6" && !x.keep));
        assert!(kept.len() < all.len() / 3, "{} kept", kept.len());
        // keep-last 1 alone still keeps the newest only.
        let only = decide(
            &all,
            &Policy {
                keep_last: 1,
                ..Default::default()
            },
        );
        assert_eq!(
            only.iter()
                .filter(|x| x.keep && !x.reasons.contains(&"held".into()))
                .count(),
            1
        );
    }
}
