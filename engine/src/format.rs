//! Repository format v1: the byte layouts every stage and reader share.
//! Normative description: `docs/specs/format.md`. Every parser here takes
//! untrusted bytes, returns `verify.*` problems instead of panicking, and has
//! a fuzz target.

use crate::stage::ChunkId;
use crate::Code;
use crate::Problem;
use serde::{Deserialize, Serialize};

pub const FORMAT_VERSION: u32 = 1;

// ---------------------------------------------------------------- config

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkerParams {
    pub algorithm: String,
    pub min_size: u32,
    pub avg_size: u32,
    pub max_size: u32,
    pub normalization: u8,
}

impl Default for ChunkerParams {
    fn default() -> Self {
        ChunkerParams {
            algorithm: "fastcdc-v2020".into(),
            min_size: 256 << 10,
            avg_size: 1 << 20,
            max_size: 4 << 20,
            normalization: 1,
        }
    }
}

impl ChunkerParams {
    pub fn validate(&self) -> Result<(), Problem> {
        let ok = self.algorithm == "fastcdc-v2020"
            && self.min_size >= 64
            && self.avg_size >= 256
            && self.max_size <= 16 << 20
            && self.min_size < self.avg_size
            && self.avg_size < self.max_size
            && self.min_size.is_multiple_of(2)
            && self.avg_size.is_multiple_of(2)
            && self.max_size.is_multiple_of(2)
            && self.normalization <= 3;
        if ok {
            Ok(())
        } else {
            Err(Problem::new(
                Code::UsageInvalidArgument,
                format!(
                    "chunker parameters {}/{}/{} are invalid: need even sizes with \
                     64 <= min < avg < max <= 16 MiB and avg >= 256",
                    self.min_size, self.avg_size, self.max_size
                ),
            )
            .suggest(
                "Pass --chunk-size MIN,AVG,MAX, e.g. 262144,1048576,4194304",
                None,
            ))
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressionParams {
    /// `zstd` or `none`.
    pub algorithm: String,
    pub level: i32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoConfig {
    pub format_version: u32,
    pub repo_id: String,
    pub created_at: String,
    pub chunker: ChunkerParams,
    pub compression: CompressionParams,
    /// `aes-256-gcm` or `none`.
    pub encryption: String,
    pub pack_target_bytes: u64,
}

// ---------------------------------------------------------------- keys

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "alg", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Kdf {
    Argon2id {
        m_kib: u32,
        t: u32,
        p: u32,
        salt: String,
    },
    /// The KEK is the 32 bytes of a key file (hex).
    KeyFile,
    /// An external program wraps and unwraps the master key (a cloud KMS
    /// CLI, Vault): `wrapped` is whatever it printed.
    Command,
}

/// A random master key wrapped (AES-256-GCM) by a key-encryption key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEnvelope {
    pub version: u32,
    pub key_id: String,
    pub created_at: String,
    pub kdf: Kdf,
    /// hex(nonce[12] | ciphertext | tag[16]) of the 32-byte master key
    /// (for `Command`: the program's output).
    pub wrapped: String,
    /// Names the KEK this envelope is wrapped with (several envelopes may
    /// wrap the same master key during a rotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kek_id: Option<String>,
}

// ---------------------------------------------------------------- chunk envelope

/// First byte of every chunk envelope of format v1.
pub const ENVELOPE_V1: u8 = 0xC1;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// Largest plaintext a chunk may claim (the chunker's hard maximum).
pub const MAX_CHUNK: u32 = 16 << 20;

/// Length of the subkey salt that precedes the nonce under `SUBKEY_SALT`.
pub const SALT_LEN: usize = 16;

/// How an encrypted body is keyed: the subkey salt (absent in envelopes
/// written before subkeys, which use the data key itself) and the nonce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sealing {
    pub salt: Option<[u8; SALT_LEN]>,
    pub nonce: [u8; NONCE_LEN],
}

impl Sealing {
    fn write(&self, out: &mut Vec<u8>) {
        if let Some(s) = &self.salt {
            out.extend_from_slice(s);
        }
        out.extend_from_slice(&self.nonce);
    }

    /// Reads `salt? | nonce` as `flags` say, leaving at least a tag's bytes.
    fn read<'a>(
        flags: u8,
        what: &str,
        rest: &'a [u8],
    ) -> Result<(Option<Sealing>, &'a [u8]), Problem> {
        use crate::stage::flags::*;
        let salted = flags & SUBKEY_SALT != 0;
        if flags & ENCRYPTED_AES256GCM == 0 {
            if salted {
                return Err(Problem::new(
                    Code::VerifyMalformed,
                    format!("{what}: a subkey salt without encryption"),
                ));
            }
            return Ok((None, rest));
        }
        let salt_len = if salted { SALT_LEN } else { 0 };
        if rest.len() < salt_len + NONCE_LEN + TAG_LEN {
            return Err(Problem::new(
                Code::VerifyTruncated,
                format!("{what}: truncated salt, nonce or tag"),
            ));
        }
        let (salt_bytes, rest) = rest.split_at(salt_len);
        let (nonce_bytes, rest) = rest.split_at(NONCE_LEN);
        let salt = salted.then(|| {
            let mut s = [0u8; SALT_LEN];
            s.copy_from_slice(salt_bytes);
            s
        });
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(nonce_bytes);
        Ok((Some(Sealing { salt, nonce }), rest))
    }
}

/// A parsed chunk envelope:
/// `ENVELOPE_V1 | flags | raw_len u32le | [salt[16]] | [nonce[12]] | body`.
#[derive(Debug, PartialEq, Eq)]
pub struct EnvelopeView<'a> {
    pub flags: u8,
    pub raw_len: u32,
    pub sealing: Option<Sealing>,
    /// Ciphertext + tag when encrypted, else the (compressed) plaintext.
    pub body: &'a [u8],
}

/// The header of a chunk envelope; `sealing` is written as `flags` must
/// describe it (`ENCRYPTED_AES256GCM`, and `SUBKEY_SALT` with a salt).
pub fn envelope_header(flags: u8, raw_len: u32, sealing: Option<&Sealing>) -> Vec<u8> {
    let mut h = Vec::with_capacity(6 + SALT_LEN + NONCE_LEN);
    h.push(ENVELOPE_V1);
    h.push(flags);
    h.extend_from_slice(&raw_len.to_le_bytes());
    if let Some(s) = sealing {
        s.write(&mut h);
    }
    h
}

/// The associated data that binds a chunk's ciphertext to its id and to the
/// envelope header (version, flags, plaintext length).
pub fn chunk_aad(id: &ChunkId, flags: u8, raw_len: u32) -> [u8; 38] {
    let mut aad = [0u8; 38];
    aad[0] = ENVELOPE_V1;
    aad[1] = flags;
    aad[2..6].copy_from_slice(&raw_len.to_le_bytes());
    aad[6..].copy_from_slice(&id.0);
    aad
}

pub fn parse_envelope(bytes: &[u8]) -> Result<EnvelopeView<'_>, Problem> {
    use crate::stage::flags::*;
    let bad = |m: &str| Problem::new(Code::VerifyMalformed, format!("chunk envelope: {m}"));
    if bytes.len() < 6 {
        return Err(Problem::new(
            Code::VerifyTruncated,
            "chunk envelope shorter than its header",
        ));
    }
    if bytes[0] != ENVELOPE_V1 {
        return Err(bad("unknown envelope version"));
    }
    let flags = bytes[1];
    if flags & !KNOWN != 0 {
        return Err(bad("unknown flags"));
    }
    let raw_len = u32::from_le_bytes([bytes[2], bytes[3], bytes[4], bytes[5]]);
    if raw_len > MAX_CHUNK {
        return Err(bad("plaintext length over the 16 MiB maximum"));
    }
    let (sealing, rest) = Sealing::read(flags, "chunk envelope", &bytes[6..])?;
    if flags & COMPRESSED_ZSTD == 0 && sealing.is_none() && rest.len() != raw_len as usize {
        return Err(Problem::new(
            Code::VerifyTruncated,
            "chunk envelope: raw body length mismatch",
        ));
    }
    Ok(EnvelopeView {
        flags,
        raw_len,
        sealing,
        body: rest,
    })
}

// ---------------------------------------------------------------- packs

pub const PACK_MAGIC: &[u8; 8] = b"PHSPACK\x01";
pub const PACK_END: &[u8; 8] = b"PHSPEND\x01";
const INDEX_ENTRY: usize = 32 + 8 + 4;

/// Where one chunk's envelope lies inside a pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackEntry {
    pub id: ChunkId,
    pub offset: u64,
    pub len: u32,
}

/// Encodes a pack index: `count u32le | (id | offset u64le | len u32le)* | blake3[32]`.
pub fn encode_pack_index(entries: &[PackEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + entries.len() * INDEX_ENTRY + 32);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        out.extend_from_slice(&e.id.0);
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.len.to_le_bytes());
    }
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

pub fn decode_pack_index(bytes: &[u8]) -> Result<Vec<PackEntry>, Problem> {
    let trunc = || Problem::new(Code::VerifyTruncated, "pack index truncated");
    if bytes.len() < 4 + 32 {
        return Err(trunc());
    }
    let (body, sum) = bytes.split_at(bytes.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err(Problem::new(
            Code::VerifyChecksumMismatch,
            "pack index checksum mismatch",
        ));
    }
    let count = u32::from_le_bytes([body[0], body[1], body[2], body[3]]) as usize;
    let rest = &body[4..];
    if rest.len() != count.checked_mul(INDEX_ENTRY).ok_or_else(trunc)? {
        return Err(Problem::new(
            Code::VerifyMalformed,
            "pack index length does not match its count",
        ));
    }
    let mut out = Vec::with_capacity(count);
    for rec in rest.chunks_exact(INDEX_ENTRY) {
        let mut id = [0u8; 32];
        id.copy_from_slice(&rec[..32]);
        let mut off = [0u8; 8];
        off.copy_from_slice(&rec[32..40]);
        let mut len = [0u8; 4];
        len.copy_from_slice(&rec[40..44]);
        out.push(PackEntry {
            id: ChunkId(id),
            offset: u64::from_le_bytes(off),
            len: u32::from_le_bytes(len),
        });
    }
    Ok(out)
}

/// Builds a pack: `PACK_MAGIC | envelopes | index | index_len u32le | PACK_END`.
/// The envelopes are kept as the buffers the stages made (no copy); the
/// pack is written as a list of parts.
pub struct PackBuilder {
    parts: Vec<bytes::Bytes>,
    len: usize,
    entries: Vec<PackEntry>,
}

impl Default for PackBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl PackBuilder {
    pub fn new() -> Self {
        PackBuilder {
            parts: vec![bytes::Bytes::from_static(PACK_MAGIC)],
            len: PACK_MAGIC.len(),
            entries: Vec::new(),
        }
    }
    pub fn add(&mut self, id: ChunkId, envelope: bytes::Bytes) {
        self.entries.push(PackEntry {
            id,
            offset: self.len as u64,
            len: envelope.len() as u32,
        });
        self.len += envelope.len();
        self.parts.push(envelope);
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// Seals the pack; returns its parts and entries.
    pub fn finish(mut self) -> (Vec<bytes::Bytes>, Vec<PackEntry>) {
        let mut tail = encode_pack_index(&self.entries);
        let index_len = tail.len() as u32;
        tail.extend_from_slice(&index_len.to_le_bytes());
        tail.extend_from_slice(PACK_END);
        self.parts.push(bytes::Bytes::from(tail));
        (self.parts, self.entries)
    }
}

/// Reads a whole pack: checks framing and returns its entries.
pub fn parse_pack(bytes: &[u8]) -> Result<Vec<PackEntry>, Problem> {
    let trunc = |m: &str| Problem::new(Code::VerifyTruncated, format!("pack: {m}"));
    if bytes.len() < PACK_MAGIC.len() + 12 {
        return Err(trunc("shorter than header and footer"));
    }
    if &bytes[..8] != PACK_MAGIC {
        return Err(Problem::new(Code::VerifyMalformed, "pack: bad magic"));
    }
    let end = bytes.len();
    if &bytes[end - 8..] != PACK_END {
        return Err(trunc("footer missing"));
    }
    let mut l = [0u8; 4];
    l.copy_from_slice(&bytes[end - 12..end - 8]);
    let index_len = u32::from_le_bytes(l) as usize;
    let index_start = (end - 12)
        .checked_sub(index_len)
        .filter(|s| *s >= 8)
        .ok_or_else(|| trunc("index length exceeds pack"))?;
    let entries = decode_pack_index(&bytes[index_start..end - 12])?;
    for e in &entries {
        let stop = e.offset.checked_add(e.len as u64);
        if e.offset < 8 || stop.is_none_or(|s| s > index_start as u64) {
            return Err(Problem::new(
                Code::VerifyMalformed,
                "pack: entry outside the data area",
            ));
        }
    }
    Ok(entries)
}

// ---------------------------------------------------------------- sealed objects

/// Manifests, index objects and other metadata are "sealed":
/// `magic[8] | flags u8 | salt[16]? | nonce[12]? | body | mac[32]` where `mac` is keyed
/// BLAKE3 over everything before it plus the object's key, and `body` is the
/// (zstd-compressed, maybe encrypted) JSON or binary payload.
pub const MANIFEST_MAGIC: &[u8; 8] = b"PHSMANI\x01";
pub const INDEX_MAGIC: &[u8; 8] = b"PHSINDX\x01";
pub const DEPLOYMENT_MAGIC: &[u8; 8] = b"PHSDEPL\x01";
pub const TOKEN_MAGIC: &[u8; 8] = b"PHSTOKN\x01";
pub const REVOCATION_MAGIC: &[u8; 8] = b"PHSREVK\x01";
pub const RESTORE_MAGIC: &[u8; 8] = b"PHSREST\x01";
pub const HOLD_MAGIC: &[u8; 8] = b"PHSHOLD\x01";
pub const TOMBSTONE_MAGIC: &[u8; 8] = b"PHSTOMB\x01";
pub const AUDIT_MAGIC: &[u8; 8] = b"PHSAUDT\x01";
pub const AGENT_MAGIC: &[u8; 8] = b"PHSAGNT\x01";
pub const MAC_LEN: usize = 32;

#[derive(Debug, PartialEq, Eq)]
pub struct SealedView<'a> {
    pub flags: u8,
    pub sealing: Option<Sealing>,
    pub body: &'a [u8],
    /// Bytes the MAC covers (everything before it).
    pub signed: &'a [u8],
    pub mac: [u8; MAC_LEN],
}

/// The header of a sealed object: `magic | flags | [salt] | [nonce]`.
pub fn sealed_header(magic: &[u8; 8], flags: u8, sealing: Option<&Sealing>) -> Vec<u8> {
    let mut h = magic.to_vec();
    h.push(flags);
    if let Some(s) = sealing {
        s.write(&mut h);
    }
    h
}

pub fn parse_sealed<'a>(magic: &[u8; 8], bytes: &'a [u8]) -> Result<SealedView<'a>, Problem> {
    use crate::stage::flags::*;
    if bytes.len() < 8 + 1 + MAC_LEN {
        return Err(Problem::new(
            Code::VerifyTruncated,
            "sealed object truncated",
        ));
    }
    if &bytes[..8] != magic {
        return Err(Problem::new(
            Code::VerifyMalformed,
            "sealed object: wrong magic",
        ));
    }
    let (signed, mac_bytes) = bytes.split_at(bytes.len() - MAC_LEN);
    let mut mac = [0u8; MAC_LEN];
    mac.copy_from_slice(mac_bytes);
    let flags = signed[8];
    if flags & !KNOWN != 0 {
        return Err(Problem::new(
            Code::VerifyMalformed,
            "sealed object: unknown flags",
        ));
    }
    let (sealing, body) = Sealing::read(flags, "sealed object", &signed[9..])?;
    Ok(SealedView {
        flags,
        sealing,
        body,
        signed,
        mac,
    })
}

// ---------------------------------------------------------------- manifests

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
}

/// One path of a backed-up tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Relative, `/`-separated; hex of the raw bytes when `path_hex` is set.
    pub path: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub path_hex: bool,
    pub kind: EntryKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_s: i64,
    pub mtime_ns: u32,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<(ChunkId, u32)>,
    /// Set for a file stored page by page (a PostgreSQL relation file):
    /// `chunks` then lists the page runs its pages live in, in no
    /// particular order, and the map says which run and slot holds each page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages: Option<PageMap>,
}

impl Entry {
    /// The raw path bytes.
    pub fn path_bytes(&self) -> Result<Vec<u8>, Problem> {
        if self.path_hex {
            hex::decode(&self.path)
                .map_err(|_| Problem::new(Code::VerifyMalformed, "manifest: bad hex path"))
        } else {
            Ok(self.path.as_bytes().to_vec())
        }
    }

    pub fn set_path_bytes(&mut self, raw: &[u8]) {
        match std::str::from_utf8(raw) {
            Ok(s) => {
                self.path = s.to_string();
                self.path_hex = false;
            }
            Err(_) => {
                self.path = hex::encode(raw);
                self.path_hex = true;
            }
        }
    }
}

// ---------------------------------------------------------------- page maps

/// Bytes of one page record: keyed-hash prefix | run u32le | slot u16le.
pub const PAGE_RECORD: usize = PAGE_HASH + 4 + 2;
/// Bytes of the page hash kept in a record: a prefix of the keyed BLAKE3
/// of the page. It is only ever compared with the record of the same page
/// in the previous backup, never looked up in a set, so 128 bits leave no
/// room for a collision.
pub const PAGE_HASH: usize = 16;

/// Where each page of a paged file lives: `records` is base64 of one
/// [`PAGE_RECORD`] per page, in page order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageMap {
    pub page_size: u32,
    pub records: String,
}

/// One page's record, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRecord {
    pub hash: [u8; PAGE_HASH],
    /// Index into the entry's `chunks` (the run holding the page).
    pub run: u32,
    /// Which page of the run it is.
    pub slot: u16,
}

impl PageRecord {
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.hash);
        out.extend_from_slice(&self.run.to_le_bytes());
        out.extend_from_slice(&self.slot.to_le_bytes());
    }
}

impl PageMap {
    pub fn from_records(page_size: u32, raw: &[u8]) -> Self {
        use base64::Engine;
        PageMap {
            page_size,
            records: base64::engine::general_purpose::STANDARD_NO_PAD.encode(raw),
        }
    }

    /// Decodes and checks the records against the entry's runs: every run
    /// exists, is whole pages long, and holds the slot named.
    pub fn decode(&self, runs: &[(ChunkId, u32)]) -> Result<Vec<PageRecord>, Problem> {
        use base64::Engine;
        let bad = |m: String| Problem::new(Code::VerifyMalformed, format!("page map: {m}"));
        if !(512..=(1 << 16)).contains(&self.page_size) || !self.page_size.is_power_of_two() {
            return Err(bad(format!("page size {} is invalid", self.page_size)));
        }
        let raw = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(&self.records)
            .map_err(|e| bad(format!("records are not base64: {e}")))?;
        if !raw.len().is_multiple_of(PAGE_RECORD) {
            return Err(bad("records are not whole".into()));
        }
        let ps = self.page_size as u64;
        let mut out = Vec::with_capacity(raw.len() / PAGE_RECORD);
        for rec in raw.chunks_exact(PAGE_RECORD) {
            let mut hash = [0u8; PAGE_HASH];
            hash.copy_from_slice(&rec[..PAGE_HASH]);
            let run = u32::from_le_bytes([rec[16], rec[17], rec[18], rec[19]]);
            let slot = u16::from_le_bytes([rec[20], rec[21]]);
            let Some((_, len)) = runs.get(run as usize) else {
                return Err(bad(format!("page names run {run} of {}", runs.len())));
            };
            let len = *len as u64;
            if !len.is_multiple_of(ps) || (slot as u64 + 1) * ps > len {
                return Err(bad(format!("slot {slot} lies outside run {run}")));
            }
            out.push(PageRecord { hash, run, slot });
        }
        Ok(out)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes_logical: u64,
    pub bytes_added: u64,
    pub chunks: u64,
    pub chunks_new: u64,
    /// Paged (relation) files: their bytes, their pages, the pages the
    /// backup stored anew (all others were found unchanged in the
    /// previous backup), and the bytes those added to the repository.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub paged_bytes: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pages: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pages_stored: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub paged_bytes_added: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    pub backup_id: String,
    pub deployment: String,
    pub kind: String,
    pub source: serde_json::Value,
    pub started_at: String,
    pub finished_at: String,
    pub chunker: ChunkerParams,
    pub stats: BackupStats,
    pub entries: Vec<Entry>,
}

impl Manifest {
    /// Structural checks a reader runs after the MAC verified.
    pub fn validate(&self) -> Result<(), Problem> {
        if self.format_version != FORMAT_VERSION {
            return Err(Problem::new(
                Code::RepoFormatUnsupported,
                format!("manifest format {} is not supported", self.format_version),
            ));
        }
        for e in &self.entries {
            let raw = e.path_bytes()?;
            if raw == b"." && e.kind == EntryKind::Dir {
                continue; // the backed-up root itself
            }
            let bad = raw.is_empty()
                || raw.starts_with(b"/")
                || raw
                    .split(|b| *b == b'/')
                    .any(|c| c == b".." || c == b"." || c.is_empty())
                || raw.contains(&0);
            if bad {
                return Err(Problem::new(
                    Code::VerifyMalformed,
                    format!("manifest: unsafe path {:?}", e.path),
                ));
            }
            if let Some(map) = &e.pages {
                let pages = map.decode(&e.chunks)?;
                if e.kind != EntryKind::File || pages.len() as u64 * map.page_size as u64 != e.size
                {
                    return Err(Problem::new(
                        Code::VerifyMalformed,
                        format!("manifest: page map of {:?} does not match its size", e.path),
                    ));
                }
                continue;
            }
            let sum: u64 = e.chunks.iter().map(|(_, l)| *l as u64).sum();
            if e.kind == EntryKind::File && sum != e.size {
                return Err(Problem::new(
                    Code::VerifyMalformed,
                    format!("manifest: chunks of {:?} do not add up to its size", e.path),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_roundtrip_and_truncation() {
        let mut b = PackBuilder::new();
        b.add(ChunkId([1; 32]), bytes::Bytes::from_static(b"hello"));
        b.add(ChunkId([2; 32]), bytes::Bytes::from_static(b"world!"));
        let (parts, entries) = b.finish();
        let bytes: Vec<u8> = parts.concat();
        assert_eq!(parse_pack(&bytes).expect("parse"), entries);
        for cut in 0..bytes.len() {
            assert!(parse_pack(&bytes[..cut]).is_err(), "cut {cut}");
        }
    }

    #[test]
    fn envelope_rejects_garbage() {
        assert!(parse_envelope(&[]).is_err());
        assert!(parse_envelope(&[0xC1, 0x80, 0, 0, 0, 0]).is_err());
        let h = envelope_header(0, 3, None);
        let mut e = h.clone();
        e.extend_from_slice(b"abc");
        let v = parse_envelope(&e).expect("ok");
        assert_eq!(v.body, b"abc");
    }
}
