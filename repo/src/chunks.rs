//! The verifying read path: every chunk read is decrypted (AEAD bound to its
//! id), decompressed and re-hashed before a single byte is used.

use crate::Repository;
use pg_hardstorage_engine::stage::{flags, ChunkId};
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use phs_encrypt::{open_chunk, Aead};

/// Reads and checks `chunks` in order (each located in `index`) and joins
/// them; `what` names the object in errors.
pub fn read_chunks(
    repo: &Repository,
    index: &crate::index::RepoIndex,
    chunks: &[(ChunkId, u32)],
    what: &str,
) -> Result<Vec<u8>, Problem> {
    let aead = repo.aead();
    let mut out = Vec::new();
    for (id, len) in chunks {
        let (pack, loc) = index.locate(id)?;
        let env = repo
            .store
            .get_range(pack, loc.offset..loc.offset + loc.len as u64)?;
        let plain = decode_chunk(repo, aead.as_ref(), id, &env)?;
        if plain.len() != *len as usize {
            return Err(Problem::new(
                Code::VerifyChecksumMismatch,
                format!("{what}: chunk length differs"),
            ));
        }
        out.extend_from_slice(&plain);
    }
    Ok(out)
}

/// Opens and checks one chunk envelope; returns its plaintext.
pub fn decode_chunk(
    repo: &Repository,
    aead: Option<&Aead>,
    id: &ChunkId,
    envelope: &[u8],
) -> Result<Vec<u8>, Problem> {
    let plain = decode_chunk_unhashed(aead, id, envelope)?;
    if phs_hash::chunk_id(&repo.keys.id, &plain) != *id {
        return Err(mismatch(id, "content hash differs from its id".into()));
    }
    Ok(plain)
}

/// Decrypts (the AEAD binds `id`), decompresses and length-checks one
/// envelope, without re-hashing the plaintext against `id`. Only for a
/// caller that checks every byte it uses against another keyed hash before
/// using it: restore's page-mapped places, each page against its page map
/// (so each restored page is hashed once, not twice).
pub fn decode_chunk_unhashed(
    aead: Option<&Aead>,
    id: &ChunkId,
    envelope: &[u8],
) -> Result<Vec<u8>, Problem> {
    let (f, raw_len, body) = open_chunk(aead, id, envelope).map_err(|p| match p.class() {
        pg_hardstorage_engine::Class::Verify => mismatch(id, p.message.clone()),
        _ => p,
    })?;
    let plain = if f & flags::COMPRESSED_ZSTD != 0 {
        phs_compress::decompress(&body, raw_len as usize)
            .map_err(|p| mismatch(id, p.message.clone()))?
    } else {
        body
    };
    if plain.len() != raw_len as usize {
        return Err(mismatch(id, "length differs from its envelope".into()));
    }
    Ok(plain)
}

fn mismatch(id: &ChunkId, why: String) -> Problem {
    Problem::new(
        Code::VerifyChecksumMismatch,
        format!("chunk {}: {why}", id.to_hex()),
    )
    .with("chunk", id.to_hex())
}
