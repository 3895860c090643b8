//! AES-256-GCM encryption, and the chunk envelope framing.
//!
//! Each chunk gets a fresh random 96-bit nonce; the associated data binds the
//! ciphertext to its chunk id and the envelope version, so a chunk can be
//! neither swapped for another nor replayed under another format. With
//! encryption off the stage still frames the envelope.
#![deny(clippy::unwrap_used)]

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use pg_hardstorage_engine::format::{
    chunk_aad, envelope_header, parse_envelope, NONCE_LEN, TAG_LEN,
};
use pg_hardstorage_engine::stage::{flags, Chunk, ChunkId, ChunkStage, StageFactory};
use pg_hardstorage_engine::Problem;

/// An AES-256-GCM key with the two operations the repository needs.
/// Backed by aws-lc-rs (AES-NI/VAES + PCLMUL assembly): 5x the RustCrypto
/// `aes-gcm` rate on this hardware (ARCHITECTURE.md, "Encryption").
#[derive(Clone)]
pub struct Aead {
    key: std::sync::Arc<LessSafeKey>,
}

impl Aead {
    pub fn new(key: &[u8; 32]) -> Self {
        // A 32-byte key is always a valid AES-256 key.
        #[allow(clippy::expect_used)]
        let unbound = UnboundKey::new(&AES_256_GCM, key).expect("32-byte AES-256 key");
        Aead {
            key: std::sync::Arc::new(LessSafeKey::new(unbound)),
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
                "verify.truncated",
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
                    "verify.decrypt_failed",
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

/// Frames (and, with a key, encrypts) a chunk's current bytes as an envelope.
pub struct Encrypt {
    aead: Option<Aead>,
}

impl ChunkStage for Encrypt {
    fn name(&self) -> &'static str {
        "encrypt"
    }
    fn process(&mut self, chunk: &mut Chunk) -> Result<(), Problem> {
        let raw_len = chunk.data.len() as u32;
        let body = chunk.current();
        let env = match &self.aead {
            Some(aead) => {
                let nonce = random_nonce()?;
                let f = chunk.flags | flags::ENCRYPTED_AES256GCM;
                let mut env = envelope_header(f, raw_len, Some(&nonce));
                let start = env.len();
                env.reserve(body.len() + TAG_LEN);
                env.extend_from_slice(body);
                aead.seal_in_place(&nonce, &chunk_aad(&chunk.id, f, raw_len), &mut env, start)?;
                chunk.flags = f;
                env
            }
            None => {
                let mut env = envelope_header(chunk.flags, raw_len, None);
                env.extend_from_slice(body);
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
            aead: self.key.as_ref().map(Aead::new),
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
    match (v.nonce, aead) {
        (Some(nonce), Some(aead)) => {
            let plain = aead.open(&nonce, &chunk_aad(id, v.flags, v.raw_len), v.body)?;
            Ok((v.flags, v.raw_len, plain))
        }
        (Some(_), None) => Err(Problem::new(
            "auth.key_required",
            "chunk is encrypted but no key is loaded",
        )),
        (None, Some(_)) => Err(Problem::new(
            "verify.malformed",
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

    #[test]
    fn plain_envelope_roundtrip() {
        let c = sealed(None, b"plain");
        let (_, _, body) = open_chunk(None, &c.id, &c.payload.expect("p")).expect("open");
        assert_eq!(body, b"plain");
    }
}
