//! Key management: the keyring of key-encryption keys (KEKs) that wrap the
//! repository's master key. Providers: a passphrase (Argon2id), a key file,
//! or an external command (`--kms-command`: any cloud KMS CLI or Vault).
//!
//! * `rotate`: wraps the master key under a new KEK, checks the new
//!   envelope opens, then removes every other envelope (the old KEK is
//!   retired). No data is rewritten: chunks are encrypted with subkeys of
//!   the master key, which does not change.
//! * `shred`: destroys every envelope, after writing its audit event and a
//!   `keys/SHREDDED` marker; no key material can open the repository again
//!   and every read fails with `kms.key_destroyed`.

use crate::keys::{self, KeySource};
use crate::Repository;
use bytes::Bytes;
use pg_hardstorage_engine::format::{Kdf, KeyEnvelope};
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use serde_json::{json, Value};

pub const SHREDDED: &str = "keys/SHREDDED";

pub fn envelope_key(env: &KeyEnvelope) -> String {
    match &env.kek_id {
        Some(k) => format!("keys/{}.{k}.json", env.key_id),
        None => format!("keys/{}.json", env.key_id),
    }
}

/// The problem every open of a shredded repository gets.
pub fn destroyed(marker: &[u8]) -> Problem {
    let m: Value = serde_json::from_slice(marker).unwrap_or_default();
    Problem::new(
        Code::KmsKeyDestroyed,
        format!(
            "the repository's keys were destroyed (kms shred at {} by {}): its data is unrecoverable",
            m["shredded_at"].as_str().unwrap_or("?"),
            m["by"].as_str().unwrap_or("?")
        ),
    )
    .suggest(
        "Nothing can decrypt it any more; restore from another repository or copy",
        None,
    )
}

fn envelopes(repo: &Repository) -> Result<Vec<(String, KeyEnvelope)>, Problem> {
    let mut out = Vec::new();
    for o in repo.store.list("keys/")? {
        if o.key == SHREDDED {
            continue;
        }
        if let Some(raw) = repo.store.get(&o.key)? {
            let env: KeyEnvelope = serde_json::from_slice(&raw)
                .map_err(|e| Problem::new(Code::RepoConfigInvalid, format!("{}: {e}", o.key)))?;
            out.push((o.key, env));
        }
    }
    Ok(out)
}

fn provider(kdf: &Kdf) -> &'static str {
    match kdf {
        Kdf::Argon2id { .. } => "passphrase",
        Kdf::KeyFile => "key-file",
        Kdf::Command => "command",
    }
}

/// The keyring, never key material.
pub fn inspect(repo: &Repository) -> Result<Value, Problem> {
    let ring: Vec<Value> = envelopes(repo)?
        .into_iter()
        .map(|(k, e)| {
            json!({
                "object": k,
                "key_id": e.key_id,
                "kek_id": e.kek_id,
                "provider": provider(&e.kdf),
                "created_at": e.created_at,
                "active": e.key_id == repo.keys.key_id,
            })
        })
        .collect();
    Ok(json!({
        "repo_id": repo.config.repo_id,
        "encryption": repo.config.encryption,
        "master_key_id": repo.keys.key_id,
        "keks": ring,
    }))
}

/// Re-wraps the master key under `new` and retires every other KEK.
pub fn rotate(repo: &Repository, new: &KeySource) -> Result<Value, Problem> {
    let old = envelopes(repo)?;
    let env = keys::wrap(new, &repo.keys.key_id, &repo.keys.master)?;
    // The new KEK must open it before anything old goes.
    let back = keys::unwrap(&env, new)?;
    if back.id != repo.keys.id {
        return Err(Problem::internal("re-wrapped key does not round-trip"));
    }
    let body = serde_json::to_vec_pretty(&env).map_err(|e| Problem::internal(e.to_string()))?;
    let key = envelope_key(&env);
    if !repo.store.put_if_absent(&key, Bytes::from(body))? {
        return Err(Problem::new(
            Code::RepoLocked,
            "a concurrent rotation wrote the same envelope",
        ));
    }
    let mut retired = Vec::new();
    for (k, e) in old {
        repo.store.delete(&k)?;
        retired.push(json!({"object": k, "kek_id": e.kek_id, "provider": provider(&e.kdf)}));
    }
    Ok(json!({
        "master_key_id": repo.keys.key_id,
        "new_kek": {"object": key, "kek_id": env.kek_id, "provider": provider(&env.kdf)},
        "retired": retired,
        "data_rewritten": false,
    }))
}

/// Destroys every envelope; `confirm` must be the repository id.
pub fn shred(repo: &Repository, confirm: &str, by: &str) -> Result<Value, Problem> {
    if confirm != repo.config.repo_id {
        return Err(Problem::new(
            Code::UsageInvalidArgument,
            "kms shred makes every backup in this repository unrecoverable: confirm with the repository id",
        )
        // The id is not echoed: a caller that could read it here could
        // shred without ever having looked it up.
        .suggest(
            "Pass --confirm with the repository id (`repo show` prints it) if you mean it",
            Some("pg_hardstorage repo show".into()),
        ));
    }
    let marker = json!({
        "shredded_at": pg_hardstorage_engine::event::now_rfc3339(),
        "by": by,
        "master_key_id": repo.keys.key_id,
    });
    repo.store.put(
        SHREDDED,
        Bytes::from(
            serde_json::to_vec_pretty(&marker).map_err(|e| Problem::internal(e.to_string()))?,
        ),
    )?;
    let mut destroyed = 0;
    for (k, _) in envelopes(repo)? {
        repo.store.delete(&k)?;
        destroyed += 1;
    }
    Ok(json!({
        "master_key_id": repo.keys.key_id,
        "envelopes_destroyed": destroyed,
        "shredded_at": marker["shredded_at"],
    }))
}
