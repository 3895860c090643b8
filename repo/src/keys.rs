//! Key material: a random 32-byte master key per repository, wrapped by a
//! key-encryption key (KEK) derived from a passphrase with Argon2id or read
//! from a key file. Three subkeys are derived from the master key with
//! BLAKE3's KDF, one per purpose, so no key is used for two things.

use argon2::{Algorithm, Argon2, Params, Version};
use pg_hardstorage_engine::format::{Kdf, KeyEnvelope, NONCE_LEN};
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use phs_encrypt::{random_nonce, Aead};
use std::path::PathBuf;

/// Where the KEK comes from.
#[derive(Clone)]
pub enum KeySource {
    Passphrase(String),
    KeyFile(PathBuf),
    /// A shell command run as `CMD wrap` / `CMD unwrap` (stdin → stdout).
    Command(String),
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::Passphrase(_) => f.write_str("Passphrase(<redacted>)"),
            KeySource::KeyFile(p) => write!(f, "KeyFile({})", p.display()),
            KeySource::Command(c) => write!(f, "Command({c})"),
        }
    }
}

impl KeySource {
    /// `--key-file` wins over `--passphrase-file`, which wins over
    /// `PG_HARDSTORAGE_PASSPHRASE`.
    pub fn from_env(
        key_file: Option<PathBuf>,
        passphrase_file: Option<PathBuf>,
    ) -> Result<Self, Problem> {
        Self::from_env_or_command(key_file, passphrase_file, None)
    }

    /// As [`from_env`], with an external KMS command between the
    /// passphrase file and the passphrase variable.
    pub fn from_env_or_command(
        key_file: Option<PathBuf>,
        passphrase_file: Option<PathBuf>,
        command: Option<String>,
    ) -> Result<Self, Problem> {
        if let Some(p) = key_file {
            return Ok(KeySource::KeyFile(p));
        }
        if passphrase_file.is_none() {
            if let Some(c) = command.filter(|c| !c.trim().is_empty()) {
                return Ok(KeySource::Command(c));
            }
        }
        if let Some(p) = passphrase_file {
            let text = std::fs::read_to_string(&p).map_err(|e| {
                Problem::io(
                    Code::AuthKeyRequired,
                    format!("passphrase file {}", p.display()),
                    &e,
                )
            })?;
            let pass = text.trim_end_matches(['\n', '\r']).to_string();
            if pass.is_empty() {
                return Err(Problem::new(
                    Code::AuthKeyRequired,
                    format!("passphrase file {} is empty", p.display()),
                ));
            }
            return Ok(KeySource::Passphrase(pass));
        }
        match std::env::var("PG_HARDSTORAGE_PASSPHRASE") {
            Ok(p) if !p.is_empty() => Ok(KeySource::Passphrase(p)),
            _ => Err(Problem::new(
                Code::AuthKeyRequired,
                "no key material: set PG_HARDSTORAGE_PASSPHRASE or pass --key-file",
            )
            .suggest(
                "Export the repository passphrase, or point --key-file at the key file",
                Some("export PG_HARDSTORAGE_PASSPHRASE=...".into()),
            )),
        }
    }
}

/// The repository's working keys.
#[derive(Clone)]
pub struct Keys {
    pub key_id: String,
    /// The master key itself: only rotation (re-wrapping) uses it.
    pub(crate) master: [u8; 32],
    /// Chunk and metadata encryption (AES-256-GCM).
    pub enc: [u8; 32],
    /// Chunk ids (keyed BLAKE3).
    pub id: [u8; 32],
    /// Metadata signatures (keyed BLAKE3).
    pub mac: [u8; 32],
}

impl Keys {
    pub fn derive(key_id: String, master: &[u8; 32]) -> Self {
        Keys {
            key_id,
            master: *master,
            enc: blake3::derive_key("pg_hardstorage v1 chunk and metadata encryption", master),
            id: blake3::derive_key("pg_hardstorage v1 chunk id", master),
            mac: blake3::derive_key("pg_hardstorage v1 metadata signature", master),
        }
    }
}

fn kek(source: &KeySource, kdf: &Kdf) -> Result<[u8; 32], Problem> {
    match (source, kdf) {
        (
            KeySource::Passphrase(p),
            Kdf::Argon2id {
                m_kib,
                t,
                p: lanes,
                salt,
            },
        ) => {
            check_cost(*m_kib, *t, *lanes)?;
            let salt = hex::decode(salt)
                .map_err(|_| Problem::new(Code::RepoConfigInvalid, "key envelope: bad salt"))?;
            let params = Params::new(*m_kib, *t, *lanes, Some(32))
                .map_err(|e| Problem::new(Code::RepoConfigInvalid, format!("argon2 params: {e}")))?;
            let mut out = [0u8; 32];
            Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
                .hash_password_into(p.as_bytes(), &salt, &mut out)
                .map_err(|e| Problem::internal(format!("argon2: {e}")))?;
            Ok(out)
        }
        (KeySource::KeyFile(path), Kdf::KeyFile) => read_key_file(path),
        (KeySource::Passphrase(_), Kdf::KeyFile) => Err(Problem::new(
            Code::AuthBadKey,
            "this repository key is protected by a key file, not a passphrase",
        )
        .suggest("Pass --key-file PATH", None)),
        (KeySource::KeyFile(_), Kdf::Argon2id { .. }) => Err(Problem::new(
            Code::AuthBadKey,
            "this repository key is protected by a passphrase, not a key file",
        )
        .suggest("Set PG_HARDSTORAGE_PASSPHRASE", None)),
        (_, Kdf::Command) | (KeySource::Command(_), _) => Err(Problem::new(
            Code::AuthBadKey,
            "this key envelope and the key material given are of different kinds (KMS command vs passphrase or key file)",
        )
        .suggest("Pass the --kms-command, --key-file or passphrase the repository was set up with", None)),
    }
}

/// Runs the external KMS command: `sh -c '<cmd> <verb>'`, `input` on
/// stdin; returns its trimmed stdout.
fn run_command(cmd: &str, verb: &str, key_id: &str, input: &str) -> Result<String, Problem> {
    use std::io::Write;
    let unavailable = |why: String| {
        Problem::new(
            Code::KmsUnavailable,
            format!("KMS command {verb} failed: {why}"),
        )
        .suggest(
            "Check the --kms-command program and its access to the KMS",
            None,
        )
    };
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{cmd} {verb}"))
        .env("PG_HARDSTORAGE_KEY_ID", key_id)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| unavailable(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A line, as shell tools expect.
        stdin
            .write_all(format!("{input}\n").as_bytes())
            .map_err(|e| unavailable(e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| unavailable(e.to_string()))?;
    if !out.status.success() {
        return Err(unavailable(format!(
            "{} ({})",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Wraps `master` for `source`: a new envelope with a fresh KEK id.
pub fn wrap(source: &KeySource, key_id: &str, master: &[u8; 32]) -> Result<KeyEnvelope, Problem> {
    let kek_id = hex::encode(&random32()?[..8]);
    let (kdf, wrapped) = match source {
        KeySource::Command(cmd) => (
            Kdf::Command,
            run_command(cmd, "wrap", key_id, &hex::encode(master))?,
        ),
        _ => {
            let kdf = match source {
                KeySource::Passphrase(_) => default_kdf()?,
                _ => Kdf::KeyFile,
            };
            let kek = kek(source, &kdf)?;
            let nonce = random_nonce()?;
            let mut buf = nonce.to_vec();
            buf.extend_from_slice(master);
            Aead::new(&kek).seal_in_place(&nonce, &wrap_aad(key_id), &mut buf, NONCE_LEN)?;
            (kdf, hex::encode(buf))
        }
    };
    if wrapped.is_empty() {
        return Err(Problem::new(
            Code::KmsUnavailable,
            "the KMS command printed nothing",
        ));
    }
    Ok(KeyEnvelope {
        version: 1,
        key_id: key_id.to_string(),
        created_at: pg_hardstorage_engine::event::now_rfc3339(),
        kdf,
        wrapped,
        kek_id: Some(kek_id),
    })
}

/// A key file holds 32 bytes: raw, or 64 hex digits.
pub fn read_key_file(path: &std::path::Path) -> Result<[u8; 32], Problem> {
    let raw = std::fs::read(path).map_err(|e| {
        Problem::io(
            Code::AuthKeyRequired,
            format!("key file {}", path.display()),
            &e,
        )
    })?;
    let text = String::from_utf8_lossy(&raw);
    let mut out = [0u8; 32];
    if hex::decode_to_slice(text.trim(), &mut out).is_ok() {
        return Ok(out);
    }
    if raw.len() == 32 {
        out.copy_from_slice(&raw);
        return Ok(out);
    }
    Err(Problem::new(
        Code::AuthBadKey,
        format!(
            "key file {} must hold 32 bytes or 64 hex digits",
            path.display()
        ),
    ))
}

/// Writes a new random key file (mode 0600).
pub fn generate_key_file(path: &std::path::Path) -> Result<(), Problem> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let key = random32()?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            Problem::io(
                Code::IoWriteFailed,
                format!("key file {}", path.display()),
                &e,
            )
        })?;
    writeln!(f, "{}", hex::encode(key))
        .map_err(|e| Problem::io(Code::IoWriteFailed, "write key file", &e))
}

pub fn random32() -> Result<[u8; 32], Problem> {
    let mut k = [0u8; 32];
    getrandom::fill(&mut k).map_err(|e| Problem::internal(format!("getrandom: {e}")))?;
    Ok(k)
}

/// The most an Argon2id key envelope may ask for: 1 GiB of memory, 16
/// passes, 16 lanes. The cost is read from storage before anything is
/// authenticated, so a planted envelope must not hang or exhaust every
/// process that opens the repository.
pub const KDF_MAX: (u32, u32, u32) = (1 << 20, 16, 16);

fn check_cost(m_kib: u32, t: u32, lanes: u32) -> Result<(), Problem> {
    let (m_max, t_max, p_max) = KDF_MAX;
    if m_kib > m_max || t > t_max || lanes > p_max {
        return Err(Problem::new(
            Code::RepoConfigInvalid,
            format!(
                "key envelope asks for argon2id m={m_kib} KiB, t={t}, p={lanes}; \
                 at most m={m_max}, t={t_max}, p={p_max} is accepted"
            ),
        )
        .suggest(
            "The key envelope may have been tampered with: restore keys/ from a trusted copy",
            None,
        ));
    }
    Ok(())
}

fn wrap_aad(key_id: &str) -> Vec<u8> {
    format!("pg_hardstorage key v1:{key_id}").into_bytes()
}

/// Argon2id cost: OWASP's 19 MiB / 2 passes by default. `repo init` reads
/// `PG_HARDSTORAGE_KDF_MEMORY_KIB` to raise it (or lower it in tests).
fn default_kdf() -> Result<Kdf, Problem> {
    let m_kib = std::env::var("PG_HARDSTORAGE_KDF_MEMORY_KIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(19 * 1024);
    check_cost(m_kib, 2, 1)?;
    Ok(Kdf::Argon2id {
        m_kib,
        t: 2,
        p: 1,
        salt: hex::encode(&random32()?[..16]),
    })
}

/// Makes a new master key and its envelope.
pub fn new_envelope(source: &KeySource) -> Result<(KeyEnvelope, Keys), Problem> {
    let master = random32()?;
    let key_id = hex::encode(&random32()?[..8]);
    let env = wrap(source, &key_id, &master)?;
    Ok((env, Keys::derive(key_id, &master)))
}

/// Unwraps an envelope; a wrong passphrase or key file is `auth.bad_key`.
pub fn unwrap(env: &KeyEnvelope, source: &KeySource) -> Result<Keys, Problem> {
    if let (KeySource::Command(cmd), Kdf::Command) = (source, &env.kdf) {
        let out = run_command(cmd, "unwrap", &env.key_id, &env.wrapped)?;
        let mut m = [0u8; 32];
        hex::decode_to_slice(out.trim(), &mut m).map_err(|_| {
            Problem::new(
                Code::AuthBadKey,
                "the KMS command did not return this repository's key",
            )
        })?;
        return Ok(Keys::derive(env.key_id.clone(), &m));
    }
    let kek = kek(source, &env.kdf)?;
    let raw = hex::decode(&env.wrapped)
        .map_err(|_| Problem::new(Code::RepoConfigInvalid, "key envelope: bad hex"))?;
    if raw.len() != NONCE_LEN + 32 + 16 {
        return Err(Problem::new(
            Code::RepoConfigInvalid,
            "key envelope: bad length",
        ));
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&raw[..NONCE_LEN]);
    let master = Aead::new(&kek)
        .open(&nonce, &wrap_aad(&env.key_id), &raw[NONCE_LEN..])
        .map_err(|_| {
            Problem::new(
                Code::AuthBadKey,
                "the passphrase or key file does not unlock this repository",
            )
            .suggest(
                "Check PG_HARDSTORAGE_PASSPHRASE or --key-file; the repository itself is untouched",
                None,
            )
        })?;
    let mut m = [0u8; 32];
    m.copy_from_slice(&master);
    Ok(Keys::derive(env.key_id.clone(), &m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_planted_key_envelope_cannot_ask_for_unbounded_work() {
        let source = KeySource::Passphrase("unit test".into());
        let salt = hex::encode([7u8; 16]);
        let kdf = |m_kib, t, p| Kdf::Argon2id {
            m_kib,
            t,
            p,
            salt: salt.clone(),
        };
        let t0 = std::time::Instant::now();
        for bad in [
            kdf(8, 4_000_000_000, 1),
            kdf(4 << 20, 2, 1),
            kdf(64, 2, 1000),
        ] {
            let e = kek(&source, &bad).expect_err("refused");
            assert_eq!(e.code, "repo.config_invalid", "{e}");
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(1),
            "refused before any work"
        );
        kek(&source, &kdf(64, 2, 1)).expect("a bounded cost is derived");
    }
}
