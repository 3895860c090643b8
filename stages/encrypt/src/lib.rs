//! AES-256-GCM encryption, and the chunk envelope framing.
//!
//! The data key never encrypts directly: each encrypt worker of each backup
//! draws a random 128-bit salt and encrypts under the subkey
//! HKDF-SHA256(salt, data key, "chunk"), with counter nonces that never
//! repeat under that subkey, and moves to a new salt after
//! [`MESSAGES_PER_SUBKEY`] messages (docs/specs/format.md §4, "Nonce
//! budget"). The associated data binds the ciphertext to its chunk id and the
//! envelope's version and flags, so a chunk can be neither swapped for
//! another nor replayed under another format. Envelopes written before
//! subkeys (a random nonce under the data key itself) still open. With
//! encryption off the stage still frames the envelope.
#![deny(clippy::unwrap_used)]

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use aws_lc_rs::hkdf;
use pg_hardstorage_engine::format::{
    chunk_aad, envelope_header, parse_envelope, Sealing, NONCE_LEN, SALT_LEN, TAG_LEN,
};
use pg_hardstorage_engine::stage::{flags, Chunk, ChunkId, ChunkStage, StageFactory};
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use std::sync::{Arc, Mutex};

/// Messages one subkey encrypts before the stage draws a new salt: far
/// below AES-GCM's 2^32 bound for one key, and the counter nonce is unique
/// within it.
pub const MESSAGES_PER_SUBKEY: u64 = 1 << 24;

/// What a subkey encrypts; each domain derives its own key from one salt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Domain {
    Chunk,
    Sealed,
}

impl Domain {
    fn info(self) -> &'static [u8] {
        match self {
            Domain::Chunk => b"pg_hardstorage v1 chunk subkey",
            Domain::Sealed => b"pg_hardstorage v1 sealed-object subkey",
        }
    }
}

/// Subkeys this key has derived lately, newest last (a restore reads the
/// chunks of a few workers' salts, over and over).
type SubkeyCache = Vec<(Domain, [u8; SALT_LEN], Aead)>;
const SUBKEY_CACHE: usize = 16;

/// HKDF-SHA256 (RFC 5869): extract with `salt` from `root`, expand with
/// the domain's info to one AES-256 key.
fn derive(root: &[u8; 32], domain: Domain, salt: &[u8; SALT_LEN]) -> Result<[u8; 32], Problem> {
    let refused = |_| Problem::internal("HKDF refused to derive a subkey");
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(root);
    let info = [domain.info()];
    let okm = prk.expand(&info, &AES_256_GCM).map_err(refused)?;
    let mut key = [0u8; 32];
    okm.fill(&mut key).map_err(refused)?;
    Ok(key)
}

/// An AES-256-GCM key with the two operations the repository needs.
/// Backed by aws-lc-rs (AES-NI/VAES + PCLMUL assembly): 5x the RustCrypto
/// `aes-gcm` rate on this hardware (ARCHITECTURE.md, "Encryption").
#[derive(Clone)]
pub struct Aead {
    key: Arc<LessSafeKey>,
    /// The key's bytes, kept to derive subkeys from (a data key only).
    root: Arc<[u8; 32]>,
    subkeys: Arc<Mutex<SubkeyCache>>,
}

impl Aead {
    pub fn new(key: &[u8; 32]) -> Self {
        // A 32-byte key is always a valid AES-256 key.
        #[allow(clippy::expect_used)]
        let unbound = UnboundKey::new(&AES_256_GCM, key).expect("32-byte AES-256 key");
        Aead {
            key: Arc::new(LessSafeKey::new(unbound)),
            root: Arc::new(*key),
            subkeys: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// The key HKDF-SHA256(salt, this key, domain) derives.
    pub fn subkey(&self, domain: Domain, salt: &[u8; SALT_LEN]) -> Result<Aead, Problem> {
        let mut cache = self.subkeys.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, _, k)) = cache.iter().find(|(d, s, _)| *d == domain && s == salt) {
            return Ok(k.clone());
        }
        let k = Aead::new(&derive(&self.root, domain, salt)?);
        if cache.len() == SUBKEY_CACHE {
            cache.remove(0);
        }
        cache.push((domain, *salt, k.clone()));
        Ok(k)
    }

    /// The key a body sealed as `sealing` says was encrypted under.
    pub fn for_sealing(&self, domain: Domain, sealing: &Sealing) -> Result<Aead, Problem> {
        match &sealing.salt {
            Some(salt) => self.subkey(domain, salt),
            None => Ok(self.clone()),
        }
    }

    /// Encrypts `buf[start..]` in place and appends the tag.
    pub fn seal_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut Vec<u8>,
        start: usize,
    ) -> Result<(), Problem> {
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(*nonce),
                Aad::from(aad),
                &mut buf[start..],
            )
            .map_err(|_| Problem::internal("AES-GCM refused to encrypt"))?;
        buf.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Decrypts `ciphertext | tag`; a failure means tampering or a wrong key.
    pub fn open(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        body: &[u8],
    ) -> Result<Vec<u8>, Problem> {
        if body.len() < TAG_LEN {
            return Err(Problem::new(
                Code::VerifyTruncated,
                "ciphertext shorter than its tag",
            ));
        }
        let mut out = body.to_vec();
        let n = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(*nonce),
                Aad::from(aad),
                &mut out,
            )
            .map_err(|_| {
                Problem::new(
                    Code::VerifyDecryptFailed,
                    "authentication failed: the data was altered or the key is wrong",
                )
            })?
            .len();
        out.truncate(n);
        Ok(out)
    }
}

pub fn random_nonce() -> Result<[u8; NONCE_LEN], Problem> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| Problem::internal(format!("getrandom: {e}")))?;
    Ok(n)
}

pub fn random_salt() -> Result<[u8; SALT_LEN], Problem> {
    let mut s = [0u8; SALT_LEN];
    getrandom::fill(&mut s).map_err(|e| Problem::internal(format!("getrandom: {e}")))?;
    Ok(s)
}

/// A subkey in use: its salt, and how many nonces it has given out.
struct Subkey {
    salt: [u8; SALT_LEN],
    aead: Aead,
    used: u64,
}

impl Subkey {
    fn fresh(data: &Aead) -> Result<Self, Problem> {
        let salt = random_salt()?;
        Ok(Subkey {
            aead: data.subkey(Domain::Chunk, &salt)?,
            salt,
            used: 0,
        })
    }

    /// The next `(salt, nonce)`: a counter nonce, never repeated under
    /// this salt.
    fn next(&mut self) -> Sealing {
        let mut nonce = [0u8; NONCE_LEN];
        nonce[NONCE_LEN - 8..].copy_from_slice(&self.used.to_be_bytes());
        self.used += 1;
        Sealing {
            salt: Some(self.salt),
            nonce,
        }
    }
}

/// Frames (and, with a key, encrypts) a chunk's current bytes as an envelope.
pub struct Encrypt {
    data: Option<Aead>,
    current: Option<Subkey>,
}

/// The subkey for the next message, drawing a new salt when the one in use
/// has given out its budget.
fn next_subkey<'a>(
    current: &'a mut Option<Subkey>,
    data: &Aead,
) -> Result<&'a mut Subkey, Problem> {
    if current
        .as_ref()
        .is_none_or(|k| k.used >= MESSAGES_PER_SUBKEY)
    {
        *current = Some(Subkey::fresh(data)?);
    }
    current
        .as_mut()
        .ok_or_else(|| Problem::internal("no subkey"))
}

impl ChunkStage for Encrypt {
    fn name(&self) -> &'static str {
        "encrypt"
    }
    fn process(&mut self, chunk: &mut Chunk) -> Result<(), Problem> {
        let raw_len = chunk.data.len() as u32;
        let env = match &self.data {
            Some(data) => {
                let key = next_subkey(&mut self.current, data)?;
                let sealing = key.next();
                let f = chunk.flags | flags::ENCRYPTED_AES256GCM | flags::SUBKEY_SALT;
                let body = chunk.current();
                let mut env = envelope_header(f, raw_len, Some(&sealing));
                let start = env.len();
                env.reserve(body.len() + TAG_LEN);
                env.extend_from_slice(body);
                let aad = chunk_aad(&chunk.id, f, raw_len);
                key.aead
                    .seal_in_place(&sealing.nonce, &aad, &mut env, start)?;
                chunk.flags = f;
                env
            }
            None => {
                let mut env = envelope_header(chunk.flags, raw_len, None);
                env.extend_from_slice(chunk.current());
                env
            }
        };
        chunk.payload = Some(env);
        Ok(())
    }
}

pub struct EncryptFactory {
    pub key: Option<[u8; 32]>,
}

impl StageFactory for EncryptFactory {
    fn name(&self) -> &'static str {
        "encrypt"
    }
    fn build(&self, _worker: usize) -> Result<Box<dyn ChunkStage>, Problem> {
        Ok(Box::new(Encrypt {
            data: self.key.as_ref().map(Aead::new),
            current: None,
        }))
    }
}

/// Opens a chunk envelope: returns `(flags, raw_len, body)` where body is
/// the plaintext or its zstd form. Checks the AEAD tag when encrypted.
pub fn open_chunk(
    aead: Option<&Aead>,
    id: &ChunkId,
    envelope: &[u8],
) -> Result<(u8, u32, Vec<u8>), Problem> {
    let v = parse_envelope(envelope)?;
    match (v.sealing, aead) {
        (Some(sealing), Some(aead)) => {
            let key = aead.for_sealing(Domain::Chunk, &sealing)?;
            let aad = chunk_aad(id, v.flags, v.raw_len);
            let plain = key.open(&sealing.nonce, &aad, v.body)?;
            Ok((v.flags, v.raw_len, plain))
        }
        (Some(_), None) => Err(Problem::new(
            Code::AuthKeyRequired,
            "chunk is encrypted but no key is loaded",
        )),
        (None, Some(_)) => Err(Problem::new(
            Code::VerifyMalformed,
            "chunk is not encrypted in an encrypted repository",
        )),
        (None, None) => Ok((v.flags, v.raw_len, v.body.to_vec())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn sealed(key: Option<[u8; 32]>, data: &'static [u8]) -> Chunk {
        let mut e = EncryptFactory { key }.build(0).expect("build");
        let mut c = Chunk::new(0, 0, Bytes::from_static(data));
        c.id = ChunkId([3; 32]);
        e.process(&mut c).expect("encrypt");
        c
    }

    #[test]
    fn roundtrip_and_tamper_detection() {
        let key = [5u8; 32];
        let c = sealed(Some(key), b"secret page bytes");
        let env = c.payload.clone().expect("payload");
        let aead = Aead::new(&key);
        let (_, len, body) = open_chunk(Some(&aead), &c.id, &env).expect("open");
        assert_eq!(len, 17);
        assert_eq!(body, b"secret page bytes");
        for i in 0..env.len() {
            let mut bad = env.clone();
            bad[i] ^= 1;
            assert!(open_chunk(Some(&aead), &c.id, &bad).is_err(), "flip at {i}");
        }
        // Bound to its id: the same envelope under another id fails.
        assert!(open_chunk(Some(&aead), &ChunkId([4; 32]), &env).is_err());
        // Wrong key fails.
        assert!(open_chunk(Some(&Aead::new(&[6; 32])), &c.id, &env).is_err());
    }

    /// What we write is standard AES-256-GCM: RustCrypto's independent
    /// implementation opens it.
    #[test]
    fn interoperates_with_rustcrypto_aes_gcm() {
        use aes_gcm::aead::{Aead as _, KeyInit, Payload};
        let key = [9u8; 32];
        let nonce = [4u8; NONCE_LEN];
        let mut buf = b"hdr".to_vec();
        buf.extend_from_slice(b"interop plaintext");
        Aead::new(&key)
            .seal_in_place(&nonce, b"aad", &mut buf, 3)
            .expect("seal");
        let rc = aes_gcm::Aes256Gcm::new(&key.into());
        let plain = rc
            .decrypt(
                &nonce.into(),
                Payload {
                    msg: &buf[3..],
                    aad: b"aad",
                },
            )
            .expect("RustCrypto opens it");
        assert_eq!(plain, b"interop plaintext");
    }

    #[test]
    fn nonces_differ() {
        let a = sealed(Some([1; 32]), b"x").payload.expect("a");
        let b = sealed(Some([1; 32]), b"x").payload.expect("b");
        assert_ne!(a, b);
    }

    fn sealing_of(env: &[u8]) -> Sealing {
        parse_envelope(env).expect("parse").sealing.expect("sealed")
    }

    fn encrypt_all(stage: &mut dyn ChunkStage, n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|_| {
                let mut c = Chunk::new(0, 0, Bytes::from_static(b"same bytes"));
                c.id = ChunkId([3; 32]);
                stage.process(&mut c).expect("encrypt");
                c.payload.expect("payload")
            })
            .collect()
    }

    /// Each worker draws its own salt; under it the nonces count up from
    /// zero, so no (subkey, nonce) pair ever repeats.
    #[test]
    fn each_worker_has_its_own_subkey_and_counts_its_nonces() {
        let f = EncryptFactory { key: Some([1; 32]) };
        let a = encrypt_all(&mut *f.build(0).expect("a"), 3);
        let b = encrypt_all(&mut *f.build(1).expect("b"), 3);
        let (sa, sb) = (sealing_of(&a[0]), sealing_of(&b[0]));
        assert!(sa.salt.is_some());
        assert_ne!(sa.salt, sb.salt, "two workers drew one salt");
        for (i, env) in a.iter().enumerate() {
            let s = sealing_of(env);
            assert_eq!(s.salt, sa.salt, "the salt changed within the budget");
            let mut want = [0u8; NONCE_LEN];
            want[NONCE_LEN - 1] = i as u8;
            assert_eq!(s.nonce, want);
        }
    }

    #[test]
    fn a_spent_subkey_gives_way_to_a_new_salt() {
        let data = Aead::new(&[2; 32]);
        let mut stage = Encrypt {
            current: Some(Subkey::fresh(&data).expect("subkey")),
            data: Some(data.clone()),
        };
        if let Some(k) = stage.current.as_mut() {
            k.used = MESSAGES_PER_SUBKEY - 1;
        }
        let envs = encrypt_all(&mut stage, 2);
        let (last, next) = (sealing_of(&envs[0]), sealing_of(&envs[1]));
        assert_eq!(&last.nonce[4..], &(MESSAGES_PER_SUBKEY - 1).to_be_bytes());
        assert_ne!(last.salt, next.salt);
        assert_eq!(next.nonce, [0; NONCE_LEN]);
        for env in &envs {
            open_chunk(Some(&data), &ChunkId([3; 32]), env).expect("opens");
        }
    }

    /// A salted envelope is encrypted under its chunk subkey: not under the
    /// data key, nor under the sealed-object subkey of the same salt.
    #[test]
    fn the_data_key_itself_never_encrypts_a_chunk() {
        let key = [8u8; 32];
        let c = sealed(Some(key), b"subkeyed");
        let env = c.payload.expect("payload");
        let v = parse_envelope(&env).expect("parse");
        let s = v.sealing.expect("sealed");
        let salt = s.salt.expect("salted");
        let aad = chunk_aad(&c.id, v.flags, v.raw_len);
        let data = Aead::new(&key);
        assert!(data.open(&s.nonce, &aad, v.body).is_err());
        let other = data.subkey(Domain::Sealed, &salt).expect("sealed subkey");
        assert!(other.open(&s.nonce, &aad, v.body).is_err());
        let chunk = data.subkey(Domain::Chunk, &salt).expect("chunk subkey");
        assert_eq!(
            chunk.open(&s.nonce, &aad, v.body).expect("opens"),
            b"subkeyed"
        );
    }

    /// The derivation is part of the format: these values come from an
    /// independent HKDF-SHA256 (Python's hmac, RFC 5869 step by step), and a
    /// change here makes every subkeyed repository unreadable.
    #[test]
    fn subkey_derivation_is_rfc5869_hkdf_sha256() {
        let hex = |k: [u8; 32]| k.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let chunk = derive(&[1; 32], Domain::Chunk, &[2; SALT_LEN]).expect("chunk");
        let sealed = derive(&[1; 32], Domain::Sealed, &[2; SALT_LEN]).expect("sealed");
        assert_eq!(
            hex(chunk),
            "6dde687a239ec4ea8a5ac90b70990465799c07bcaa59748ceea4a7f8b7f81d6c"
        );
        assert_eq!(
            hex(sealed),
            "6752c140edfef5ee2ebe84d7217a84ef5c0a2d580219f251dd797cd5e0c7f488"
        );
    }

    /// Envelopes written before subkeys (a random nonce under the data key,
    /// no salt) still open.
    #[test]
    fn an_envelope_from_before_subkeys_still_opens() {
        let key = [6u8; 32];
        let id = ChunkId([5; 32]);
        let f = flags::ENCRYPTED_AES256GCM;
        let sealing = Sealing {
            salt: None,
            nonce: random_nonce().expect("nonce"),
        };
        let mut env = envelope_header(f, 3, Some(&sealing));
        let start = env.len();
        env.extend_from_slice(b"old");
        Aead::new(&key)
            .seal_in_place(&sealing.nonce, &chunk_aad(&id, f, 3), &mut env, start)
            .expect("seal");
        let (_, _, body) = open_chunk(Some(&Aead::new(&key)), &id, &env).expect("open");
        assert_eq!(body, b"old");
    }

    #[test]
    fn plain_envelope_roundtrip() {
        let c = sealed(None, b"plain");
        let (_, _, body) = open_chunk(None, &c.id, &c.payload.expect("p")).expect("open");
        assert_eq!(body, b"plain");
    }
}
