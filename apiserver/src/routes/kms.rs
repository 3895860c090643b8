//! `/v1/kms/…`: the repository's key envelopes.

use super::{Ctx, Reply};
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use pg_hardstorage_repo::{ops, KeySource};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// `POST /v1/kms/rotate`: exactly one new KEK, a file name in the
/// server's `--kms-dir` (never a path elsewhere, never a command: rotating
/// to an external KMS command is done with the CLI on the host).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateKek {
    #[serde(default)]
    pub new_key_file: Option<String>,
    #[serde(default)]
    pub new_passphrase_file: Option<String>,
}

/// `POST /v1/kms/shred`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShredKeys {
    /// The repository id: every backup becomes unrecoverable.
    pub confirm: String,
}

pub fn inspect(c: Ctx) -> Reply {
    Box::pin(async move { c.answer(|st| ops::kms_inspect(&st.repo)).await })
}

/// `name` as a plain file name inside `dir`, or a refusal.
fn in_dir(dir: &Path, name: &str) -> Result<PathBuf, Problem> {
    let plain = !name.is_empty() && !name.contains('/') && name != "." && name != "..";
    plain.then(|| dir.join(name)).ok_or_else(|| {
        Problem::new(
            Code::ApiBadRequest,
            format!("{name:?} is not a file name in the server's --kms-dir"),
        )
    })
}

/// The new key the body names, in the server's `--kms-dir`.
fn new_key(dir: Option<&Path>, b: RotateKek) -> Result<KeySource, Problem> {
    let dir = dir.ok_or_else(|| {
        Problem::new(
            Code::ApiBadRequest,
            "this server takes no new key material over the API",
        )
        .suggest(
            "Start it with --kms-dir DIR and put the new key or passphrase file there, or rotate with the CLI on the host",
            Some("pg_hardstorage kms rotate --new-key-file FILE".into()),
        )
    })?;
    match (b.new_key_file, b.new_passphrase_file) {
        (Some(k), None) => Ok(KeySource::KeyFile(in_dir(dir, &k)?)),
        (None, Some(p)) => KeySource::from_env(None, Some(in_dir(dir, &p)?)),
        _ => Err(Problem::new(
            Code::ApiBadRequest,
            "give exactly one of new_key_file, new_passphrase_file",
        )),
    }
}

pub fn rotate(c: Ctx) -> Reply {
    Box::pin(async move {
        let b: RotateKek = c.json()?;
        let actor = c.actor();
        c.answer(move |st| {
            let new = new_key(st.kms_dir.as_deref(), b)?;
            ops::kms_rotate(&st.repo, &actor, &new)
        })
        .await
    })
}

pub fn shred(c: Ctx) -> Reply {
    Box::pin(async move {
        let b: ShredKeys = c.json()?;
        let actor = c.actor();
        c.answer(move |st| {
            let r = ops::kms_shred(&st.repo, &actor, &b.confirm);
            if r.is_ok() {
                st.shredded.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            r
        })
        .await
    })
}
