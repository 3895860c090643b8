//! Who is calling: a bearer token, or a client certificate whose Subject CN
//! names a token record (the certificate proves the identity; the record
//! gives its verbs and tenant). Default-deny.

use pg_hardstorage_engine::Problem;
use pg_hardstorage_repo::tokens::{self, Token};
use pg_hardstorage_repo::Repository;
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
    /// Names looked up and not found, and when: not looked up again within
    /// the TTL (a flood of made-up names costs no storage reads).
    misses: Mutex<std::collections::HashMap<String, Instant>>,
}

impl TokenCache {
    pub fn new(ttl: Duration) -> Self {
        TokenCache {
            ttl,
            cached: Mutex::new(None),
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
        let fresh = Arc::new(tokens::list(repo)?);
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
        let Some(t) = tokens::get(repo, name)? else {
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
        "auth.token_required",
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
        "authz.denied",
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
