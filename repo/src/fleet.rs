//! The fleet: agents (long-running `pg_hardstorage` processes: API
//! servers, WAL streamers) register in the repository they work on and
//! heartbeat there, so a control plane sees every agent of a shared bucket;
//! and a search across every deployment's backups.

use crate::Repository;
use pg_hardstorage_engine::format::AGENT_MAGIC;
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// How often an agent writes its heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(30);
/// An agent unheard for this long is `offline`.
pub const OFFLINE_AFTER: Duration = Duration::from_secs(90);

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Agent {
    pub agent_id: String,
    pub host: String,
    pub pid: u32,
    pub version: String,
    /// `server`, `wal-stream`, …
    pub role: String,
    pub deployments: Vec<String>,
    pub started_at: String,
    pub last_seen: String,
    /// `online`, `stopped` (written at a clean exit); `offline` is derived.
    pub state: String,
}

fn key(id: &str) -> String {
    format!("agents/{id}")
}

fn write(repo: &Repository, a: &Agent) -> Result<(), Problem> {
    let body = serde_json::to_vec(a).map_err(|e| Problem::internal(e.to_string()))?;
    repo.put_sealed(AGENT_MAGIC, &key(&a.agent_id), &body)
}

/// A registered agent; heartbeats until dropped, then records `stopped`.
pub struct Registration {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Registers this process and starts its heartbeat.
pub fn register(
    repo: &Repository,
    role: &str,
    deployments: Vec<String>,
) -> Result<Registration, Problem> {
    let mut id = [0u8; 8];
    getrandom::fill(&mut id).map_err(|e| Problem::internal(format!("getrandom: {e}")))?;
    let now = pg_hardstorage_engine::event::now_rfc3339();
    let mut a = Agent {
        agent_id: hex::encode(id),
        host: gethostname::gethostname().to_string_lossy().into_owned(),
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        role: role.to_string(),
        deployments,
        started_at: now.clone(),
        last_seen: now,
        state: "online".into(),
    };
    write(repo, &a)?;
    let stop = Arc::new(AtomicBool::new(false));
    let (repo, stop2) = (repo.clone(), stop.clone());
    let thread = std::thread::Builder::new()
        .name("heartbeat".into())
        .spawn(move || {
            let mut last = std::time::Instant::now();
            while !stop2.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(200));
                if last.elapsed() >= HEARTBEAT {
                    last = std::time::Instant::now();
                    a.last_seen = pg_hardstorage_engine::event::now_rfc3339();
                    // A missed beat is retried at the next one.
                    let _ = write(&repo, &a);
                }
            }
            a.last_seen = pg_hardstorage_engine::event::now_rfc3339();
            a.state = "stopped".into();
            let _ = write(&repo, &a);
        })
        .ok();
    Ok(Registration { stop, thread })
}

/// Every agent that ever registered, with its derived state.
pub fn agents(repo: &Repository) -> Result<Vec<Agent>, Problem> {
    let now = OffsetDateTime::now_utc();
    let mut out = Vec::new();
    for o in repo.store.list("agents/")? {
        let Some(b) = repo.get_sealed(AGENT_MAGIC, &o.key)? else {
            continue;
        };
        let mut a: Agent = serde_json::from_slice(&b)
            .map_err(|e| Problem::new(Code::VerifyMalformed, format!("{}: {e}", o.key)))?;
        let seen =
            OffsetDateTime::parse(&a.last_seen, &Rfc3339).unwrap_or(OffsetDateTime::UNIX_EPOCH);
        if a.state == "online" && (now - seen).whole_seconds() > OFFLINE_AFTER.as_secs() as i64 {
            a.state = "offline".into();
        }
        out.push(a);
    }
    out.sort_by(|a, b| b.last_seen.cmp(&a.last_seen));
    Ok(out)
}

/// A parsed search: `deployment:D status:live|deleted|any held:true|false
/// since:WHEN until:WHEN kind:K` and bare words matched against backup ids;
/// WHEN is RFC 3339 or `30m`/`12h`/`7d` (ago).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Query {
    pub deployment: Option<String>,
    pub status: Option<String>,
    pub held: Option<bool>,
    pub since: Option<OffsetDateTime>,
    pub until: Option<OffsetDateTime>,
    pub kind: Option<String>,
    pub words: Vec<String>,
}

/// A term's part before `:` that reads as a field name: lowercase ASCII
/// letters, at least three.
fn looks_like_a_field(k: &str) -> bool {
    k.len() >= 3 && k.chars().all(|c| c.is_ascii_lowercase())
}

pub fn parse_query(q: &str) -> Result<Query, Problem> {
    let bad = |m: String| {
        Problem::new(Code::UsageInvalidArgument, format!("search {q:?}: {m}")).suggest(
            "Terms: deployment:D status:live|deleted|any held:true|false since:WHEN until:WHEN kind:K, and words of the backup id",
            None,
        )
    };
    let mut out = Query::default();
    for term in q.split_whitespace() {
        match term.split_once(':') {
            Some(("deployment", v)) => out.deployment = Some(v.to_string()),
            Some(("status", v)) if ["live", "deleted", "any"].contains(&v) => {
                out.status = Some(v.to_string())
            }
            Some(("held", "true")) => out.held = Some(true),
            Some(("held", "false")) => out.held = Some(false),
            Some(("since", v)) => out.since = Some(when(v)?),
            Some(("until", v)) => out.until = Some(when(v)?),
            Some(("kind", v)) => out.kind = Some(v.to_string()),
            Some((k, v))
                if ["deployment", "status", "held", "since", "until", "kind"].contains(&k) =>
            {
                return Err(bad(format!("{k}:{v} is not a valid value")))
            }
            // A mistyped field (`stauts:live`) is refused with the terms
            // that exist; anything else with a colon (`:x`, a time) is a word.
            Some((k, _)) if looks_like_a_field(k) => {
                return Err(bad(format!("unknown field {k:?}")))
            }
            _ => out.words.push(term.to_string()),
        }
    }
    Ok(out)
}

/// RFC 3339, or compact relative: `30m`, `12h`, `7d` (that long ago).
fn when(v: &str) -> Result<OffsetDateTime, Problem> {
    let (n, unit) = v.split_at(v.len().saturating_sub(1));
    let unit = match unit {
        "s" => Some(1),
        "m" => Some(60),
        "h" => Some(3600),
        "d" => Some(86400),
        _ => None,
    };
    match (n.parse::<i64>(), unit) {
        (Ok(n), Some(unit)) => crate::pitr::ago(n, unit).ok_or_else(|| {
            Problem::new(Code::UsageInvalidTime, format!("{v:?} is too long ago")).suggest(
                "Use a time after year 1, e.g. 7d or 2026-11-27T10:20:18Z",
                None,
            )
        }),
        _ => crate::pitr::parse_when(v),
    }
}

/// Backups across deployments matching `q`, newest first.
/// `tenant`: only that tenant's deployments (an API caller bound to one).
pub fn search(repo: &Repository, q: &Query, tenant: Option<&str>) -> Result<Vec<Value>, Problem> {
    let deployments: Vec<String> = crate::deployment::list(repo)?
        .into_iter()
        .filter(|d| q.deployment.as_ref().is_none_or(|x| *x == d.name))
        .filter(|d| tenant.is_none_or(|t| d.tenant() == t))
        .map(|d| d.name)
        .collect();
    let status = q.status.as_deref().unwrap_or("live");
    let mut out = Vec::new();
    for d in deployments {
        crate::deployment::validate_name(&d)?;
        let lc = crate::catalog::Lifecycle::of(repo, &d)?;
        for o in repo.store.list(&format!("snapshots/{d}/"))? {
            let id = o.key.rsplit('/').next().unwrap_or("").to_string();
            let deleted = lc.tombstoned.contains(&id);
            if (status == "live" && deleted) || (status == "deleted" && !deleted) {
                continue;
            }
            if !q.words.iter().all(|w| id.contains(w.as_str())) {
                continue;
            }
            let held = lc.held(&id);
            if q.held.is_some_and(|h| h != held) {
                continue;
            }
            let m = crate::catalog::load_manifest(repo, &d, &id)?;
            if q.kind.as_ref().is_some_and(|k| *k != m.kind) {
                continue;
            }
            let at = OffsetDateTime::parse(&m.finished_at, &Rfc3339).ok();
            if let (Some(s), Some(t)) = (q.since, at) {
                if t < s {
                    continue;
                }
            }
            if let (Some(u), Some(t)) = (q.until, at) {
                if t > u {
                    continue;
                }
            }
            let mut s = crate::backup::BackupSummary::of(&m);
            s.held = held;
            let mut v = serde_json::to_value(s).map_err(|e| Problem::internal(e.to_string()))?;
            v["status"] = Value::String(if deleted { "deleted" } else { "live" }.into());
            out.push(v);
        }
    }
    out.sort_by(|a, b| b["finished_at"].as_str().cmp(&a["finished_at"].as_str()));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_relative_time_in_a_query_is_a_usage_error() {
        for q in ["since:9223372036854775807d", "until:106751991167300d"] {
            let e = parse_query(q).expect_err(q);
            assert_eq!(e.code, "usage.invalid_time", "{q}: {e}");
        }
        assert!(parse_query("since:7d").is_ok());
    }

    #[test]
    fn colons_outside_field_names_are_words_and_typos_are_refused() {
        // Found by schemathesis: an empty field name was an error.
        let q = parse_query(":\u{d1} 12:30 T:x").expect("words");
        assert_eq!(q.words, vec![":\u{d1}", "12:30", "T:x"]);
        let e = parse_query("stauts:live").map(|_| ()).expect_err("typo");
        assert_eq!(e.code.as_ref(), "usage.invalid_argument");
        let q = parse_query("status:deleted held:true").expect("fields");
        assert_eq!((q.status.as_deref(), q.held), (Some("deleted"), Some(true)));
    }
}
