//! Opening and initialising a repository, and its sealed metadata objects.

use crate::keys::{self, KeySource, Keys};
use bytes::Bytes;
use pg_hardstorage_engine::format::{
    parse_sealed, sealed_header, ChunkerParams, CompressionParams, KeyEnvelope, RepoConfig,
    Sealing, FORMAT_VERSION,
};
use pg_hardstorage_engine::stage::flags;
use pg_hardstorage_engine::store::DynStore;
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use phs_encrypt::{random_nonce, random_salt, Aead, Domain};
use serde::{Deserialize, Serialize};

pub const CONFIG_KEY: &str = "config";
/// Metadata objects never legitimately exceed this once decompressed.
const MAX_METADATA: usize = 1 << 30;

#[derive(Clone, Debug)]
pub struct InitOptions {
    pub encryption: bool,
    /// `None`: no compression.
    pub zstd_level: Option<i32>,
    pub chunker: ChunkerParams,
    pub pack_target_bytes: u64,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            encryption: true,
            zstd_level: Some(1),
            chunker: ChunkerParams::default(),
            pack_target_bytes: 32 << 20,
        }
    }
}

/// `config` on storage: the JSON config and its signature.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignedConfig {
    config: RepoConfig,
    mac: String,
}

#[derive(Clone)]
pub struct Repository {
    pub store: DynStore,
    pub config: RepoConfig,
    pub keys: Keys,
}

fn mac(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(key);
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    }
    *h.finalize().as_bytes()
}

impl Repository {
    pub fn init(store: DynStore, source: &KeySource, opts: InitOptions) -> Result<Self, Problem> {
        opts.chunker.validate()?;
        if store.head(CONFIG_KEY)?.is_some() {
            return Err(Problem::new(
                Code::RepoAlreadyExists,
                format!("{} already holds a repository", store.describe()),
            )
            .with("repo", store.describe())
            .suggest(
                "Use the existing repository, or choose another --repo",
                None,
            ));
        }
        let (env, keys) = keys::new_envelope(source)?;
        let config = RepoConfig {
            format_version: FORMAT_VERSION,
            repo_id: hex::encode(&keys::random32()?[..16]),
            created_at: pg_hardstorage_engine::event::now_rfc3339(),
            chunker: opts.chunker,
            compression: CompressionParams {
                algorithm: if opts.zstd_level.is_some() {
                    "zstd"
                } else {
                    "none"
                }
                .into(),
                level: opts.zstd_level.unwrap_or(0),
            },
            encryption: if opts.encryption {
                "aes-256-gcm"
            } else {
                "none"
            }
            .into(),
            pack_target_bytes: opts.pack_target_bytes,
        };
        let env_json =
            serde_json::to_vec_pretty(&env).map_err(|e| Problem::internal(e.to_string()))?;
        store.put(&crate::kms::envelope_key(&env), Bytes::from(env_json))?;
        let body = serde_json::to_vec(&config).map_err(|e| Problem::internal(e.to_string()))?;
        let signed = SignedConfig {
            config: config.clone(),
            mac: hex::encode(mac(&keys.mac, &[b"config", &body])),
        };
        let bytes =
            serde_json::to_vec_pretty(&signed).map_err(|e| Problem::internal(e.to_string()))?;
        // The config is the commit point of `init`: written last, only once.
        if !store.put_if_absent(CONFIG_KEY, Bytes::from(bytes))? {
            return Err(Problem::new(
                Code::RepoAlreadyExists,
                "another init won the race",
            ));
        }
        Ok(Repository {
            store,
            config,
            keys,
        })
    }

    pub fn open(store: DynStore, source: &KeySource) -> Result<Self, Problem> {
        let raw = store.get(CONFIG_KEY)?.ok_or_else(|| {
            Problem::new(
                Code::RepoNotFound,
                format!("no repository at {}", store.describe()),
            )
            .with("repo", store.describe())
            .suggest("Initialise one", Some("pg_hardstorage repo init".into()))
        })?;
        let signed: SignedConfig = serde_json::from_slice(&raw).map_err(|e| {
            Problem::new(Code::RepoConfigInvalid, format!("repository config: {e}"))
        })?;
        if signed.config.format_version != FORMAT_VERSION {
            return Err(Problem::new(
                Code::RepoFormatUnsupported,
                format!(
                    "repository format {} is not supported (this build reads {FORMAT_VERSION})",
                    signed.config.format_version
                ),
            ));
        }
        let keys = Self::unlock(&store, source)?;
        let body =
            serde_json::to_vec(&signed.config).map_err(|e| Problem::internal(e.to_string()))?;
        let expect = hex::encode(mac(&keys.mac, &[b"config", &body]));
        if !constant_eq(expect.as_bytes(), signed.mac.as_bytes()) {
            return Err(Problem::new(
                Code::VerifySignatureInvalid,
                "repository config signature does not verify: it was altered",
            ));
        }
        signed.config.chunker.validate()?;
        Ok(Repository {
            store,
            config: signed.config,
            keys,
        })
    }

    fn unlock(store: &DynStore, source: &KeySource) -> Result<Keys, Problem> {
        if let Some(m) = store.get(crate::kms::SHREDDED)? {
            return Err(crate::kms::destroyed(&m));
        }
        let envs = store.list("keys/")?;
        if envs.is_empty() {
            return Err(Problem::new(
                Code::RepoConfigInvalid,
                "repository has no key envelope",
            ));
        }
        let mut last = None;
        for o in envs {
            let Some(raw) = store.get(&o.key)? else {
                continue;
            };
            let env: KeyEnvelope = serde_json::from_slice(&raw)
                .map_err(|e| Problem::new(Code::RepoConfigInvalid, format!("{}: {e}", o.key)))?;
            match keys::unwrap(&env, source) {
                Ok(k) => return Ok(k),
                Err(p) => last = Some(p),
            }
        }
        Err(last.unwrap_or_else(|| Problem::new(Code::AuthBadKey, "no usable key envelope")))
    }

    pub fn encrypted(&self) -> bool {
        self.config.encryption == "aes-256-gcm"
    }

    pub fn aead(&self) -> Option<Aead> {
        self.encrypted().then(|| Aead::new(&self.keys.enc))
    }

    pub fn zstd_level(&self) -> Option<i32> {
        (self.config.compression.algorithm == "zstd").then_some(self.config.compression.level)
    }

    /// Seals a metadata payload: compressed, encrypted when the repository
    /// is, and signed with a MAC bound to the object's key.
    pub fn seal(&self, magic: &[u8; 8], key: &str, payload: &[u8]) -> Result<Vec<u8>, Problem> {
        self.seal_with(magic, key, payload, self.aead())
    }

    /// Seals a payload that holds secrets (a deployment's connection
    /// string): encrypted under the repository's encryption key even with
    /// `--encryption none`, which leaves backed-up data in clear but never
    /// the credentials to the database.
    pub fn seal_private(
        &self,
        magic: &[u8; 8],
        key: &str,
        payload: &[u8],
    ) -> Result<Vec<u8>, Problem> {
        self.seal_with(magic, key, payload, Some(Aead::new(&self.keys.enc)))
    }

    fn seal_with(
        &self,
        magic: &[u8; 8],
        key: &str,
        payload: &[u8],
        aead: Option<Aead>,
    ) -> Result<Vec<u8>, Problem> {
        let mut body = (payload.len() as u64).to_le_bytes().to_vec();
        body.extend_from_slice(&phs_compress::compress(payload, 3)?);
        let mut f = flags::COMPRESSED_ZSTD;
        let mut out = match aead {
            Some(data) => {
                // One fresh subkey per object (format.md §10): the data key
                // itself never encrypts.
                f |= flags::ENCRYPTED_AES256GCM | flags::SUBKEY_SALT;
                let sealing = Sealing {
                    salt: Some(random_salt()?),
                    nonce: random_nonce()?,
                };
                let mut out = sealed_header(magic, f, Some(&sealing));
                let start = out.len();
                out.extend_from_slice(&body);
                data.for_sealing(Domain::Sealed, &sealing)?.seal_in_place(
                    &sealing.nonce,
                    &sealed_aad(magic, key),
                    &mut out,
                    start,
                )?;
                out
            }
            None => {
                let mut out = sealed_header(magic, f, None);
                out.extend_from_slice(&body);
                out
            }
        };
        let m = mac(&self.keys.mac, &[&out, key.as_bytes()]);
        out.extend_from_slice(&m);
        Ok(out)
    }

    /// Verifies and opens a sealed object.
    pub fn open_sealed(
        &self,
        magic: &[u8; 8],
        key: &str,
        bytes: &[u8],
    ) -> Result<Vec<u8>, Problem> {
        let v = parse_sealed(magic, bytes).map_err(|p| p.with("object", key))?;
        let m = mac(&self.keys.mac, &[v.signed, key.as_bytes()]);
        if !constant_eq(&m, &v.mac) {
            return Err(Problem::new(
                Code::VerifySignatureInvalid,
                format!("{key}: signature does not verify (altered, truncated or foreign)"),
            )
            .with("object", key));
        }
        // An encrypted object opens under the encryption key whatever the
        // repository's setting: `seal_private` encrypts in every repository.
        let body = match v.sealing {
            Some(s) => Aead::new(&self.keys.enc)
                .for_sealing(Domain::Sealed, &s)?
                .open(&s.nonce, &sealed_aad(magic, key), v.body)?,
            None => v.body.to_vec(),
        };
        if body.len() < 8 {
            return Err(Problem::new(
                Code::VerifyTruncated,
                format!("{key}: body truncated"),
            ));
        }
        let mut l = [0u8; 8];
        l.copy_from_slice(&body[..8]);
        let raw_len = u64::from_le_bytes(l) as usize;
        if raw_len > MAX_METADATA {
            return Err(Problem::new(
                Code::VerifyMalformed,
                format!("{key}: implausible size"),
            ));
        }
        phs_compress::decompress(&body[8..], raw_len).map_err(|p| p.context(key))
    }

    pub fn put_sealed(&self, magic: &[u8; 8], key: &str, payload: &[u8]) -> Result<(), Problem> {
        let bytes = self.seal(magic, key, payload)?;
        self.store.put(key, Bytes::from(bytes))
    }

    pub fn get_sealed(&self, magic: &[u8; 8], key: &str) -> Result<Option<Vec<u8>>, Problem> {
        match self.store.get(key)? {
            Some(b) => self.open_sealed(magic, key, &b).map(Some),
            None => Ok(None),
        }
    }
}

fn sealed_aad(magic: &[u8; 8], key: &str) -> Vec<u8> {
    let mut a = magic.to_vec();
    a.extend_from_slice(key.as_bytes());
    a
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
