//! API bearer tokens. A token is `phs.<name>.<64 hex>`; the repository keeps
//! only the BLAKE3 hash of its secret part (sealed, under `tokens/<name>`),
//! so the token itself is shown once, at creation, and never again.
//!
//! A revoke deletes the record, but deleting is not enough: an old copy of
//! the record put back (a storage rollback, a restored bucket version)
//! would revive the token. So a revoke first writes a revocation record,
//! `revocations/<secret_hash>` (sealed, conditional create, never deleted),
//! and its audit record names the same hash. A token whose hash either
//! names is refused whatever records exist; removing both needs a hole in
//! the audit chain, which `audit verify` reports.

use crate::Repository;
use pg_hardstorage_engine::format::{REVOCATION_MAGIC, TOKEN_MAGIC};
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use serde::{Deserialize, Serialize};

/// The RBAC verbs of the contract. `admin:*` grants every verb.
pub const VERBS: &[&str] = &[
    "backup:create",
    "backup:read",
    "restore:execute",
    "kms:rotate",
    "kms:shred",
    "audit:read",
    "admin:*",
];

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Token {
    pub name: String,
    pub verbs: Vec<String>,
    /// The tenant whose deployments it may touch; `None`: every tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub created_at: String,
    /// Hex BLAKE3 of the secret part.
    pub secret_hash: String,
}

impl Token {
    /// What `token list` shows (never the hash).
    pub fn public(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "verbs": self.verbs,
            "tenant": self.tenant,
            "created_at": self.created_at,
        })
    }

    pub fn grants(&self, verb: &str) -> bool {
        self.verbs.iter().any(|v| v == verb || v == "admin:*")
    }

    /// Whether it may act on a deployment of `tenant`.
    pub fn sees_tenant(&self, tenant: &str) -> bool {
        self.tenant.as_deref().is_none_or(|t| t == tenant)
    }
}

fn key(name: &str) -> String {
    format!("tokens/{name}")
}

fn validate_name(name: &str) -> Result<(), Problem> {
    crate::deployment::validate_name(name).map_err(|_| {
        Problem::new(
            Code::UsageInvalidArgument,
            format!("token name {name:?} is invalid: use 1-63 of [A-Za-z0-9_-]"),
        )
    })
}

/// Creates a token; returns it and the one-time secret string.
pub fn create(
    repo: &Repository,
    name: &str,
    verbs: &[String],
    tenant: Option<String>,
) -> Result<(Token, String), Problem> {
    validate_name(name)?;
    if verbs.is_empty() {
        return Err(Problem::new(
            Code::UsageInvalidArgument,
            "a token needs at least one verb",
        )
        .suggest(
            format!("Pass --verbs with some of {}", VERBS.join(", ")),
            None,
        ));
    }
    for v in verbs {
        if !VERBS.contains(&v.as_str()) {
            return Err(
                Problem::new(Code::UsageInvalidArgument, format!("unknown verb {v:?}"))
                    .suggest(format!("Verbs are {}", VERBS.join(", ")), None),
            );
        }
    }
    if let Some(t) = &tenant {
        crate::deployment::validate_name(t)?;
    }
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| Problem::internal(format!("getrandom: {e}")))?;
    let secret_hex = hex::encode(secret);
    let t = Token {
        name: name.to_string(),
        verbs: verbs.to_vec(),
        tenant,
        created_at: pg_hardstorage_engine::event::now_rfc3339(),
        secret_hash: blake3::hash(secret_hex.as_bytes()).to_hex().to_string(),
    };
    let body = serde_json::to_vec(&t).map_err(|e| Problem::internal(e.to_string()))?;
    let sealed = repo.seal(TOKEN_MAGIC, &key(name), &body)?;
    if !repo
        .store
        .put_if_absent(&key(name), bytes::Bytes::from(sealed))?
    {
        return Err(Problem::new(
            Code::TokenConflict,
            format!("a token named {name:?} exists"),
        )
        .suggest(
            "Revoke it first or pick another name",
            Some(format!("pg_hardstorage token revoke {name}")),
        ));
    }
    Ok((t, format!("phs.{name}.{secret_hex}")))
}

/// One token record, if it exists.
pub fn get(repo: &Repository, name: &str) -> Result<Option<Token>, Problem> {
    if validate_name(name).is_err() {
        return Ok(None);
    }
    match repo.get_sealed(TOKEN_MAGIC, &key(name))? {
        Some(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Problem::new(Code::VerifyMalformed, format!("token {name}: {e}"))),
        None => Ok(None),
    }
}

/// The name part of a presented `phs.<name>.<secret>` token.
pub fn name_of(presented: &str) -> Option<&str> {
    presented
        .strip_prefix("phs.")?
        .rsplit_once('.')
        .map(|(n, _)| n)
        // Only a name a token could have (1-63 of [A-Za-z0-9_-]): what a
        // caller remembers of presented names stays small.
        .filter(|n| validate_name(n).is_ok())
}

/// Every token record, revoked or not (what storage holds).
fn records(repo: &Repository) -> Result<Vec<Token>, Problem> {
    let mut out = Vec::new();
    for o in repo.store.list("tokens/")? {
        let name = o.key.trim_start_matches("tokens/");
        if let Some(b) = repo.get_sealed(TOKEN_MAGIC, &key(name))? {
            out.push(
                serde_json::from_slice(&b).map_err(|e| {
                    Problem::new(Code::VerifyMalformed, format!("token {name}: {e}"))
                })?,
            );
        }
    }
    out.sort_by(|a: &Token, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The tokens that authenticate: every record not revoked.
pub fn list(repo: &Repository) -> Result<Vec<Token>, Problem> {
    let revoked = Revoked::load(repo)?;
    Ok(revoked.filter(records(repo)?))
}

/// The secret hashes of revoked tokens, from the revocation records and
/// from the audit chain's `token.revoke` records, read up to `audit_next`.
#[derive(Clone, Debug, Default)]
pub struct Revoked {
    hashes: std::collections::HashSet<String>,
    audit_next: u64,
}

fn revocation_key(secret_hash: &str) -> String {
    format!("revocations/{secret_hash}")
}

impl Revoked {
    pub fn load(repo: &Repository) -> Result<Self, Problem> {
        let mut r = Revoked::default();
        r.refresh(repo)?;
        Ok(r)
    }

    /// Re-lists the revocation records and reads the audit records appended
    /// since the last call (a server calls this on every token refresh).
    pub fn refresh(&mut self, repo: &Repository) -> Result<(), Problem> {
        for o in repo.store.list("revocations/")? {
            self.hashes
                .insert(o.key.trim_start_matches("revocations/").to_string());
        }
        let (events, next) = crate::audit::read_from(repo, self.audit_next)?;
        for ev in events {
            if ev.action == "token.revoke" && ev.result == "ok" {
                if let Some(h) = ev.subject.get("secret_hash").and_then(|v| v.as_str()) {
                    self.hashes.insert(h.to_string());
                }
            }
        }
        self.audit_next = next;
        Ok(())
    }

    pub fn contains(&self, t: &Token) -> bool {
        self.hashes.contains(&t.secret_hash)
    }

    /// `tokens` without the revoked ones.
    pub fn filter(&self, tokens: Vec<Token>) -> Vec<Token> {
        tokens.into_iter().filter(|t| !self.contains(t)).collect()
    }

    /// All of a repository's token records, less the revoked ones.
    pub fn tokens(&self, repo: &Repository) -> Result<Vec<Token>, Problem> {
        Ok(self.filter(records(repo)?))
    }
}

/// Revokes a token: writes its revocation record (durable before anything
/// else), then deletes its record. Returns the revoked token; its
/// `secret_hash` goes into the audit record.
pub fn revoke(repo: &Repository, name: &str) -> Result<Token, Problem> {
    validate_name(name)?;
    let t = list(repo)?
        .into_iter()
        .find(|t| t.name == name)
        .ok_or_else(|| {
            Problem::new(Code::TokenNotFound, format!("no token named {name:?}"))
                .suggest("List the tokens", Some("pg_hardstorage token list".into()))
        })?;
    let rec = serde_json::json!({
        "name": t.name,
        "secret_hash": t.secret_hash,
        "revoked_at": pg_hardstorage_engine::event::now_rfc3339(),
    });
    let k = revocation_key(&t.secret_hash);
    let sealed = repo.seal(REVOCATION_MAGIC, &k, rec.to_string().as_bytes())?;
    // Already there (a revoke retried after a crash) is as good.
    repo.store.put_if_absent(&k, bytes::Bytes::from(sealed))?;
    repo.store.delete(&key(name))?;
    Ok(t)
}

/// Finds the token a presented bearer string belongs to. The secret is
/// compared as BLAKE3 hashes with `blake3::Hash`'s constant-time equality.
pub fn authenticate<'a>(tokens: &'a [Token], presented: &str) -> Option<&'a Token> {
    let rest = presented.strip_prefix("phs.")?;
    let (name, secret) = rest.rsplit_once('.')?;
    let t = tokens.iter().find(|t| t.name == name)?;
    let want = blake3::Hash::from_hex(&t.secret_hash).ok()?;
    let got = blake3::hash(secret.as_bytes());
    (got == want).then_some(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_possible_token_name_is_taken_from_a_presented_token() {
        assert_eq!(name_of("phs.ci-1.secret"), Some("ci-1"));
        let long = format!("phs.{}.secret", "a".repeat(5000));
        assert_eq!(name_of(&long), None, "longer than any token name");
        assert_eq!(name_of("phs.../x.secret"), None);
        assert_eq!(name_of("phs..secret"), None);
    }

    #[test]
    fn tokens_authenticate_only_with_their_secret() {
        let repo = crate::testing::memory_repo();
        let (t, secret) = create(&repo, "ci", &["backup:read".into()], None).expect("create");
        assert!(t.grants("backup:read") && !t.grants("backup:create"));
        let all = list(&repo).expect("list");
        assert_eq!(authenticate(&all, &secret).map(|t| &t.name), Some(&t.name));
        let mut wrong = secret.clone();
        wrong.pop();
        wrong.push('x');
        assert!(authenticate(&all, &wrong).is_none());
        assert!(authenticate(&all, "phs.ci.").is_none());
        assert!(authenticate(&all, "garbage").is_none());
        assert_eq!(
            create(&repo, "ci", &["backup:read".into()], None)
                .expect_err("dup")
                .code
                .as_ref(),
            "token.conflict"
        );
        assert_eq!(
            create(&repo, "x", &["root".into()], None)
                .expect_err("verb")
                .code
                .as_ref(),
            "usage.invalid_argument"
        );
        revoke(&repo, "ci").expect("revoke");
        assert!(authenticate(&list(&repo).expect("list"), &secret).is_none());
        assert!(!all.is_empty());
        assert_eq!(
            revoke(&repo, "ci").expect_err("gone").code.as_ref(),
            "token.not_found"
        );
    }

    /// Finding 7: an old token record put back (a storage rollback) does
    /// not revive a revoked token, and the audit chain still knows the
    /// revocation when the revocation record is gone as well.
    #[test]
    fn a_rolled_back_token_record_does_not_revive_a_revoked_token() {
        let repo = crate::testing::memory_repo();
        let made = crate::ops::tokens_create(&repo, "cli:t", "ci", &["backup:read".into()], None)
            .expect("create");
        let secret = made["token"].as_str().expect("secret").to_string();
        let mut seen = Revoked::load(&repo).expect("revoked");
        let old = repo.store.get("tokens/ci").expect("get").expect("record");
        crate::ops::tokens_revoke(&repo, "cli:t", "ci").expect("revoke");
        repo.store.put("tokens/ci", old).expect("roll back");
        assert!(
            get(&repo, "ci").expect("get").is_some(),
            "the record is back"
        );
        assert!(authenticate(&list(&repo).expect("list"), &secret).is_none());
        // A reader that had read the log before the revoke learns it.
        seen.refresh(&repo).expect("refresh");
        assert!(authenticate(&seen.tokens(&repo).expect("tokens"), &secret).is_none());
        // Without the revocation record, the audit chain still says so.
        let revocations = repo.store.list("revocations/").expect("list");
        assert_eq!(revocations.len(), 1);
        for o in revocations {
            repo.store.delete(&o.key).expect("delete");
        }
        assert!(authenticate(&list(&repo).expect("list"), &secret).is_none());
        // A new token of the same name, once the old record is gone, works.
        repo.store.delete("tokens/ci").expect("delete");
        let (_, again) = create(&repo, "ci", &["backup:read".into()], None).expect("again");
        assert!(authenticate(&list(&repo).expect("list"), &again).is_some());
    }
}
