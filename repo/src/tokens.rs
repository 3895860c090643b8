//! API bearer tokens. A token is `phs.<name>.<64 hex>`; the repository keeps
//! only the BLAKE3 hash of its secret part (sealed, under `tokens/<name>`),
//! so the token itself is shown once, at creation, and never again.

use crate::Repository;
use pg_hardstorage_engine::format::TOKEN_MAGIC;
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
            "usage.invalid_argument",
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
        return Err(
            Problem::new("usage.invalid_argument", "a token needs at least one verb").suggest(
                format!("Pass --verbs with some of {}", VERBS.join(", ")),
                None,
            ),
        );
    }
    for v in verbs {
        if !VERBS.contains(&v.as_str()) {
            return Err(
                Problem::new("usage.invalid_argument", format!("unknown verb {v:?}"))
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
        return Err(
            Problem::new("token.conflict", format!("a token named {name:?} exists")).suggest(
                "Revoke it first or pick another name",
                Some(format!("pg_hardstorage token revoke {name}")),
            ),
        );
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
            .map_err(|e| Problem::new("verify.malformed", format!("token {name}: {e}"))),
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

pub fn list(repo: &Repository) -> Result<Vec<Token>, Problem> {
    let mut out = Vec::new();
    for o in repo.store.list("tokens/")? {
        let name = o.key.trim_start_matches("tokens/");
        if let Some(b) = repo.get_sealed(TOKEN_MAGIC, &key(name))? {
            out.push(
                serde_json::from_slice(&b)
                    .map_err(|e| Problem::new("verify.malformed", format!("token {name}: {e}")))?,
            );
        }
    }
    out.sort_by(|a: &Token, b| a.name.cmp(&b.name));
    Ok(out)
}

pub fn revoke(repo: &Repository, name: &str) -> Result<Token, Problem> {
    validate_name(name)?;
    let t = list(repo)?
        .into_iter()
        .find(|t| t.name == name)
        .ok_or_else(|| {
            Problem::new("token.not_found", format!("no token named {name:?}"))
                .suggest("List the tokens", Some("pg_hardstorage token list".into()))
        })?;
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
}
