//! The audit log: an append-only hash chain of every mutating operation.
//!
//! Record `n` lives at `audit/<n, 20 digits>` as a sealed object (its MAC is
//! bound to that key) holding `{seq, time, actor, action, subject, result,
//! error_code?, prev, hash}`, where `prev` is the previous record's `hash`
//! (64 zeros for the first) and `hash` is BLAKE3 over `prev` and the
//! record's other fields. An edited byte fails the seal; a removed record
//! leaves a hole in the sequence and breaks `prev`; a reordered one breaks
//! `prev` and its key. Appends are conditional creates of the next key, so
//! concurrent writers (CLI and API, several agents) never overwrite each
//! other: the loser re-reads the tail and takes the next number.

use crate::Repository;
use pg_hardstorage_engine::format::AUDIT_MAGIC;
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

const ZERO: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEvent {
    pub seq: u64,
    pub time: String,
    /// `cli:<user>`, `token:<name>`, `mtls:<cn>`.
    pub actor: String,
    /// e.g. `backup.take`, `backup.delete`, `token.create`.
    pub action: String,
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub subject: Map<String, Value>,
    /// `ok` or `error`.
    pub result: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    pub prev: String,
    pub hash: String,
}

impl AuditEvent {
    fn digest(&self) -> String {
        let fields = json!({
            "seq": self.seq,
            "time": self.time,
            "actor": self.actor,
            "action": self.action,
            "subject": self.subject,
            "result": self.result,
            "error_code": self.error_code,
        });
        let mut h = blake3::Hasher::new();
        h.update(self.prev.as_bytes());
        h.update(fields.to_string().as_bytes());
        h.finalize().to_hex().to_string()
    }
}

fn key(seq: u64) -> String {
    format!("audit/{seq:020}")
}

/// The sequence numbers present, ascending.
fn seqs(repo: &Repository) -> Result<Vec<u64>, Problem> {
    let mut out: Vec<u64> = repo
        .store
        .list("audit/")?
        .into_iter()
        .filter_map(|o| o.key.trim_start_matches("audit/").parse().ok())
        .collect();
    out.sort_unstable();
    Ok(out)
}

fn read(repo: &Repository, seq: u64) -> Result<Option<AuditEvent>, Problem> {
    match repo.get_sealed(AUDIT_MAGIC, &key(seq))? {
        Some(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Problem::new(Code::VerifyMalformed, format!("audit record {seq}: {e}"))),
        None => Ok(None),
    }
}

/// Appends one event; returns it. `result` is the operation's outcome.
pub fn append(
    repo: &Repository,
    actor: &str,
    action: &str,
    subject: Map<String, Value>,
    result: Result<(), &Problem>,
) -> Result<AuditEvent, Problem> {
    for _ in 0..64 {
        let last = seqs(repo)?.last().copied();
        let (seq, prev) = match last {
            Some(n) => {
                let p = read(repo, n)?.ok_or_else(|| {
                    Problem::new(
                        Code::VerifyMissingObject,
                        format!("audit record {n} vanished"),
                    )
                })?;
                (n + 1, p.hash)
            }
            None => (0, ZERO.to_string()),
        };
        let mut ev = AuditEvent {
            seq,
            time: pg_hardstorage_engine::event::now_rfc3339(),
            actor: actor.to_string(),
            action: action.to_string(),
            subject: subject.clone(),
            result: if result.is_ok() { "ok" } else { "error" }.into(),
            error_code: result.err().map(|p| p.code.to_string()),
            prev,
            hash: String::new(),
        };
        ev.hash = ev.digest();
        let body = serde_json::to_vec(&ev).map_err(|e| Problem::internal(e.to_string()))?;
        let sealed = repo.seal(AUDIT_MAGIC, &key(seq), &body)?;
        if repo
            .store
            .put_if_absent(&key(seq), bytes::Bytes::from(sealed))?
        {
            return Ok(ev);
        }
        // Another writer took this number: read the new tail and retry.
    }
    Err(Problem::new(
        Code::RepoLocked,
        "the audit log is too contended to append to",
    ))
}

/// The records from position `first` on that open, oldest first, and the
/// position after the last one present: what a reader that has seen the
/// log up to `first` reads next. Records that fail to open are skipped
/// (`verify_chain` reports them).
pub fn read_from(repo: &Repository, first: u64) -> Result<(Vec<AuditEvent>, u64), Problem> {
    let seqs: Vec<u64> = seqs(repo)?.into_iter().filter(|s| *s >= first).collect();
    let next = seqs.last().map_or(first, |s| s + 1);
    let mut out = Vec::with_capacity(seqs.len());
    for seq in seqs {
        if let Ok(Some(ev)) = read(repo, seq) {
            out.push(ev);
        }
    }
    Ok((out, next))
}

/// What `audit search` filters on.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// RFC 3339 or relative ("2 hours ago").
    pub since: Option<String>,
    pub action: Option<String>,
    pub deployment: Option<String>,
}

/// Events matching `f`, oldest first. Records that fail to open are
/// skipped here; `verify_chain` is what reports them.
pub fn search(repo: &Repository, f: &Filter) -> Result<Vec<AuditEvent>, Problem> {
    let since = match &f.since {
        Some(s) => Some(crate::pitr::parse_when(s)?),
        None => None,
    };
    let mut out = Vec::new();
    for seq in seqs(repo)? {
        let Ok(Some(ev)) = read(repo, seq) else {
            continue;
        };
        let t =
            time::OffsetDateTime::parse(&ev.time, &time::format_description::well_known::Rfc3339);
        if let (Some(s), Ok(t)) = (since, t) {
            if t < s {
                continue;
            }
        }
        if f.action.as_ref().is_some_and(|a| &ev.action != a) {
            continue;
        }
        if f.deployment
            .as_ref()
            .is_some_and(|d| ev.subject.get("deployment").and_then(Value::as_str) != Some(d))
        {
            continue;
        }
        out.push(ev);
    }
    Ok(out)
}

/// Walks the chain; `Ok` with the count when intact, else a
/// `verify.audit_chain_broken` problem naming the first bad position.
pub fn verify_chain(repo: &Repository) -> Result<Value, Problem> {
    let seqs = seqs(repo)?;
    let broken = |at: u64, why: String| {
        Problem::new(
            Code::VerifyAuditChainBroken,
            format!("audit chain breaks at record {at}: {why}"),
        )
        .with("position", at)
        .suggest(
            "Treat the log from this position as tampered with; compare with an off-site copy",
            None,
        )
    };
    let mut prev = ZERO.to_string();
    for (i, seq) in seqs.iter().enumerate() {
        let want = i as u64;
        if *seq != want {
            return Err(broken(
                want,
                format!("record {want} is missing (next present is {seq})"),
            ));
        }
        let ev = match read(repo, *seq) {
            Ok(Some(ev)) => ev,
            Ok(None) => return Err(broken(want, "record vanished while reading".into())),
            Err(p) => return Err(broken(want, format!("{} ({})", p.message, p.code))),
        };
        if ev.seq != want {
            return Err(broken(want, format!("record claims position {}", ev.seq)));
        }
        if ev.prev != prev {
            return Err(broken(
                want,
                "it does not follow the record before it".into(),
            ));
        }
        if ev.digest() != ev.hash {
            return Err(broken(want, "its hash does not match its content".into()));
        }
        prev = ev.hash;
    }
    Ok(json!({"records": seqs.len(), "intact": true, "head": prev}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subj(d: &str) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("deployment".into(), json!(d));
        m
    }

    #[test]
    fn chain_detects_edits_removals_and_reorders() {
        let repo = crate::testing::memory_repo();
        for i in 0..5 {
            append(
                &repo,
                "cli:test",
                "backup.take",
                subj(&format!("d{i}")),
                Ok(()),
            )
            .expect("append");
        }
        let err = Problem::new(Code::BackupHeld, "held");
        append(&repo, "token:x", "backup.delete", subj("d1"), Err(&err)).expect("append");
        assert_eq!(verify_chain(&repo).expect("intact")["records"], 6);
        let found = search(
            &repo,
            &Filter {
                action: Some("backup.delete".into()),
                ..Default::default()
            },
        )
        .expect("search");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].error_code.as_deref(), Some("backup.held"));

        // Edit one byte of record 2.
        let k = key(2);
        let orig = repo.store.get(&k).expect("get").expect("exists");
        let mut b = orig.to_vec();
        let mid = b.len() / 2;
        b[mid] ^= 1;
        repo.store.put(&k, bytes::Bytes::from(b)).expect("put");
        let e = verify_chain(&repo).expect_err("edited");
        assert_eq!(
            (e.code.as_ref(), e.subject["position"].clone()),
            ("verify.audit_chain_broken", json!(2))
        );
        repo.store.put(&k, orig.clone()).expect("restore");
        verify_chain(&repo).expect("intact again");

        // Swap records 3 and 4 (their bytes under each other's keys).
        let (a, c) = (
            repo.store.get(&key(3)).expect("get").expect("3"),
            repo.store.get(&key(4)).expect("get").expect("4"),
        );
        repo.store.put(&key(3), c.clone()).expect("put");
        repo.store.put(&key(4), a.clone()).expect("put");
        let e = verify_chain(&repo).expect_err("reordered");
        assert_eq!(e.subject["position"], json!(3));
        repo.store.put(&key(3), a).expect("put");
        repo.store.put(&key(4), c).expect("put");

        // Remove record 1.
        repo.store.delete(&key(1)).expect("delete");
        let e = verify_chain(&repo).expect_err("removed");
        assert_eq!(e.subject["position"], json!(1));
        assert!(e.message.contains("missing"), "{}", e.message);
    }
}
