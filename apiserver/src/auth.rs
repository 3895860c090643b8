//! Who is calling: a bearer token, or a client certificate whose Subject CN
//! names a token record (the certificate proves the identity; the record
//! gives its verbs and tenant). Default-deny.

use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use pg_hardstorage_repo::tokens::{self, Token};
use pg_hardstorage_repo::Repository;
use serde_json::{json, Map, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// An authenticated caller.
#[derive(Clone, Debug)]
pub struct Identity {
    pub name: String,
    /// `token` or `mtls`.
    pub via: &'static str,
    pub token: Token,
}

impl Identity {
    pub fn grants(&self, verb: &str) -> bool {
        self.token.grants(verb)
    }
    pub fn sees_tenant(&self, tenant: &str) -> bool {
        self.token.sees_tenant(tenant)
    }
}

/// Token records, re-read at most every `ttl` (a revoke takes effect within it).
pub struct TokenCache {
    ttl: Duration,
    cached: Mutex<Option<(Instant, Arc<Vec<Token>>)>>,
    /// Revoked secret hashes; the audit chain is read on from where the
    /// last refresh stopped.
    revoked: Mutex<tokens::Revoked>,
    /// Names looked up and not found, and when: not looked up again within
    /// the TTL (a flood of made-up names costs no storage reads).
    misses: Mutex<std::collections::HashMap<String, Instant>>,
}

impl TokenCache {
    pub fn new(ttl: Duration) -> Self {
        TokenCache {
            ttl,
            cached: Mutex::new(None),
            revoked: Mutex::new(tokens::Revoked::default()),
            misses: Mutex::new(std::collections::HashMap::new()),
        }
    }

    pub fn get(&self, repo: &Repository) -> Result<Arc<Vec<Token>>, Problem> {
        {
            let g = self.cached.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((at, t)) = g.as_ref() {
                if at.elapsed() < self.ttl {
                    return Ok(t.clone());
                }
            }
        }
        let fresh = {
            let mut revoked = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
            revoked.refresh(repo)?;
            Arc::new(revoked.tokens(repo)?)
        };
        *self.cached.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((Instant::now(), fresh.clone()));
        Ok(fresh)
    }

    /// A token whose name the cache does not know yet (created since the
    /// last listing): its one record is read and added, so it works at once.
    pub fn learn(&self, repo: &Repository, presented: &str) -> Result<Arc<Vec<Token>>, Problem> {
        let cached = self.get(repo)?;
        let Some(name) = tokens::name_of(presented.trim()) else {
            return Ok(cached);
        };
        if cached.iter().any(|t| t.name == name) {
            return Ok(cached);
        }
        {
            let mut m = self.misses.lock().unwrap_or_else(|e| e.into_inner());
            if m.get(name).is_some_and(|at| at.elapsed() < self.ttl) {
                return Ok(cached);
            }
            if m.len() > 10_000 {
                m.clear();
            }
        }
        let record = tokens::get(repo, name)?;
        let revoked = |t: &Token| -> Result<bool, Problem> {
            let mut r = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
            r.refresh(repo)?;
            Ok(r.contains(t))
        };
        let live = match record {
            Some(t) if !revoked(&t)? => Some(t),
            _ => None,
        };
        let Some(t) = live else {
            self.misses
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name.to_string(), Instant::now());
            return Ok(cached);
        };
        // Added to the list as it is now (a fresher listing may have
        // replaced the one this call started from: a revoke must stick).
        let mut g = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        let Some((_, current)) = g.as_mut() else {
            return Ok(Arc::new(vec![t]));
        };
        if !current.iter().any(|x| x.name == t.name) {
            let mut all = (**current).clone();
            all.push(t);
            *current = Arc::new(all);
        }
        Ok(current.clone())
    }
}

/// The credentials of an `Authorization: Bearer …` header (the scheme is
/// case-insensitive, RFC 7235).
pub fn bearer(h: &str) -> Option<&str> {
    let (scheme, rest) = h.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

pub fn required() -> Problem {
    Problem::new(
        Code::AuthTokenRequired,
        "this route needs a bearer token or a client certificate",
    )
    .suggest(
        "Send Authorization: Bearer <token>; an administrator creates one",
        Some("pg_hardstorage token create --name NAME --verbs backup:read".into()),
    )
}

/// Authenticates a request from its Authorization header and, over mTLS,
/// the client certificate's CN.
pub fn authenticate(
    all: &[Token],
    authorization: Option<&str>,
    client_cn: Option<&str>,
) -> Result<Identity, Problem> {
    if let Some(h) = authorization {
        let presented = bearer(h).ok_or_else(required)?;
        let t = tokens::authenticate(all, presented.trim()).ok_or_else(required)?;
        return Ok(Identity {
            name: t.name.clone(),
            via: "token",
            token: t.clone(),
        });
    }
    if let Some(cn) = client_cn {
        // Verified by the TLS layer against the client CA; the record of the
        // same name carries its verbs. No record: authenticated, no verbs.
        let token = all.iter().find(|t| t.name == cn).cloned().unwrap_or(Token {
            name: cn.to_string(),
            verbs: Vec::new(),
            tenant: Some(String::new()),
            created_at: String::new(),
            secret_hash: String::new(),
        });
        return Ok(Identity {
            name: cn.to_string(),
            via: "mtls",
            token,
        });
    }
    Err(required())
}

pub fn denied(who: &Identity, verb: &str) -> Problem {
    Problem::new(
        Code::AuthzDenied,
        format!("{} {:?} lacks the verb {verb}", who.via, who.name),
    )
    .with("verb", verb)
    .suggest(
        format!("Use a token granted {verb}"),
        Some(format!(
            "pg_hardstorage token create --name NAME --verbs {verb}"
        )),
    )
}

/// Failed authentications and denials reach the audit log at most this
/// often, as one record of the counts since the last one: a flood of bad
/// tokens costs no more storage writes than that.
pub const AUDIT_FAILURES_EVERY: Duration = Duration::from_secs(60);

/// Counts of refused requests since the last audit record of them.
#[derive(Default)]
pub struct Failures(Mutex<FailState>);

#[derive(Default)]
struct FailState {
    unauthenticated: u64,
    denied: u64,
    written: Option<Instant>,
}

impl Failures {
    /// Counts one refusal of `route` (`denied`: authenticated but not
    /// allowed); returns the audit subject to write now, when one is due.
    pub fn record(&self, denied: bool, route: &str) -> Option<Map<String, Value>> {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match denied {
            true => s.denied += 1,
            false => s.unauthenticated += 1,
        }
        if s.written
            .is_some_and(|t| t.elapsed() < AUDIT_FAILURES_EVERY)
        {
            return None;
        }
        let subject = json!({
            "unauthenticated": s.unauthenticated,
            "denied": s.denied,
            "last_route": route,
        });
        (s.unauthenticated, s.denied, s.written) = (0, 0, Some(Instant::now()));
        subject.as_object().cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_written_at_most_once_a_minute_with_their_counts() {
        let f = Failures::default();
        let first = f
            .record(false, "/v1/deployments")
            .expect("the first is written");
        assert_eq!(first["unauthenticated"], 1);
        for _ in 0..1000 {
            assert!(f.record(true, "/v1/kms/shred").is_none(), "rate-limited");
        }
        let mut s = f.0.lock().expect("lock");
        assert_eq!((s.unauthenticated, s.denied), (0, 1000));
        s.written = Instant::now().checked_sub(AUDIT_FAILURES_EVERY);
        drop(s);
        let next = f.record(false, "/v1/x").expect("due again");
        assert_eq!(
            (next["unauthenticated"].as_u64(), next["denied"].as_u64()),
            (Some(1), Some(1000))
        );
    }
}
