//! PostgreSQL 17+ incremental base backups (`UPLOAD_MANIFEST`, then
//! `BASE_BACKUP (INCREMENTAL)`): the header of the `INCREMENTAL.<relfile>`
//! members the server sends for relation files, and the two rewrites that
//! make the result a whole data directory, as pg_combinebackup's output is:
//! `backup_label` without its `INCREMENTAL FROM` lines (PostgreSQL refuses
//! to start from one that has them) and a `backup_manifest` that names the
//! whole files at their whole sizes.

use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use std::collections::HashMap;

/// `INCREMENTAL_MAGIC` of `basebackup_incremental.h`.
pub const MAGIC: u32 = 0xd3ae_1f0d;
/// The name prefix of an incremental member.
pub const PREFIX: &str = "INCREMENTAL.";

/// What an incremental member's header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Incremental {
    /// The blocks the server sent, ascending; their pages follow the header.
    pub blocks: Vec<u32>,
    /// The relation segment's length in blocks: blocks before it that were
    /// not sent are the previous backup's, blocks at or past it are zeros.
    pub truncation_blocks: u32,
}

impl Incremental {
    /// Blocks of the whole file: the truncation length, or further to hold
    /// every block sent (pg_combinebackup's `find_reconstructed_block_length`).
    pub fn length_blocks(&self) -> u32 {
        self.blocks.last().map_or(self.truncation_blocks, |b| {
            (b + 1).max(self.truncation_blocks)
        })
    }
}

fn bad(m: String) -> Problem {
    Problem::new(Code::PgProtocol, format!("incremental file: {m}"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parses the header at the start of `buf`: `None` while more bytes are
/// needed, else the header and its length (12 bytes and 4 per block, padded
/// to a multiple of `block_size` when any block follows).
pub fn parse_header(buf: &[u8], block_size: u32) -> Result<Option<(Incremental, usize)>, Problem> {
    if buf.len() < 12 {
        return Ok(None);
    }
    let magic = u32_at(buf, 0);
    if magic != MAGIC {
        return Err(bad(format!("magic {magic:#x}, not {MAGIC:#x}")));
    }
    let (n, truncation_blocks) = (u32_at(buf, 4), u32_at(buf, 8));
    let segment_blocks = (1u32 << 30) / block_size.max(1);
    if n > segment_blocks || truncation_blocks > segment_blocks {
        return Err(bad(format!(
            "{n} blocks, truncation at {truncation_blocks}: past a segment's {segment_blocks}"
        )));
    }
    let mut len = 12 + 4 * n as usize;
    if buf.len() < len {
        return Ok(None);
    }
    let blocks: Vec<u32> = (0..n as usize).map(|i| u32_at(buf, 12 + 4 * i)).collect();
    if blocks.windows(2).any(|w| w[0] >= w[1]) || blocks.iter().any(|b| *b >= segment_blocks) {
        return Err(bad("block numbers not ascending within a segment".into()));
    }
    let bs = block_size as usize;
    if n > 0 && !len.is_multiple_of(bs) {
        len += bs - len % bs;
    }
    Ok(Some((
        Incremental {
            blocks,
            truncation_blocks,
        },
        len,
    )))
}

/// `dir/name` for a member `dir/INCREMENTAL.name`.
pub fn bare_path(path: &str) -> Option<String> {
    let (dir, name) = match path.rsplit_once('/') {
        Some((d, n)) => (Some(d), n),
        None => (None, path),
    };
    let bare = name.strip_prefix(PREFIX).filter(|b| !b.is_empty())?;
    Some(match dir {
        Some(d) => format!("{d}/{bare}"),
        None => bare.to_string(),
    })
}

/// `backup_label` without its `INCREMENTAL FROM LSN`/`TLI` lines.
pub fn rewrite_label(text: &[u8]) -> Vec<u8> {
    text.split_inclusive(|b| *b == b'\n')
        .filter(|l| !l.starts_with(b"INCREMENTAL FROM "))
        .flatten()
        .copied()
        .collect()
}

/// The server's `backup_manifest` with each file entry whose path is a key
/// of `changes` renamed and resized to the value (its checksum dropped: the
/// whole file's was never computed, so pg_verifybackup checks its size),
/// and the manifest checksum computed again.
pub fn rewrite_manifest(
    text: &[u8],
    changes: &HashMap<String, (String, u64)>,
) -> Result<Vec<u8>, Problem> {
    let text = std::str::from_utf8(text).map_err(|_| bad("manifest is not UTF-8".into()))?;
    let mut out = String::with_capacity(text.len());
    let mut done = 0;
    for line in text.split_inclusive('\n') {
        out.push_str(&rewrite_line(line, changes, &mut done)?);
    }
    if done != changes.len() {
        return Err(bad(format!(
            "the manifest names {done} of the {} rewritten files",
            changes.len()
        )));
    }
    const KEY: &str = "\"Manifest-Checksum\": \"";
    let at = out
        .rfind(KEY)
        .ok_or_else(|| bad("manifest has no Manifest-Checksum".into()))?;
    let sum = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &out.as_bytes()[..at]);
    let hex: String = sum.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let from = at + KEY.len();
    if out.len() < from + hex.len() {
        return Err(bad("manifest checksum cut short".into()));
    }
    out.replace_range(from..from + hex.len(), &hex);
    Ok(out.into_bytes())
}

/// One line of the manifest, rewritten if it is a file entry to change.
fn rewrite_line(
    line: &str,
    changes: &HashMap<String, (String, u64)>,
    done: &mut usize,
) -> Result<String, Problem> {
    if !line.starts_with("{ \"Path\": ") {
        return Ok(line.to_string());
    }
    let body = line.trim_end_matches('\n');
    let (obj, tail) = match body.strip_suffix(',') {
        Some(o) => (o, ","),
        None => (body, ""),
    };
    let v: serde_json::Value =
        serde_json::from_str(obj).map_err(|e| bad(format!("manifest file entry: {e}")))?;
    let Some((path, size)) = v["Path"].as_str().and_then(|p| changes.get(p)) else {
        return Ok(line.to_string());
    };
    *done += 1;
    let json = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let modified = v["Last-Modified"].as_str().unwrap_or_default();
    let nl = if line.ends_with('\n') { "\n" } else { "" };
    Ok(format!(
        "{{ \"Path\": {}, \"Size\": {size}, \"Last-Modified\": {} }}{tail}{nl}",
        json(path),
        json(modified)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(blocks: &[u32], trunc: u32) -> Vec<u8> {
        let mut h = MAGIC.to_le_bytes().to_vec();
        h.extend_from_slice(&(blocks.len() as u32).to_le_bytes());
        h.extend_from_slice(&trunc.to_le_bytes());
        for b in blocks {
            h.extend_from_slice(&b.to_le_bytes());
        }
        h
    }

    #[test]
    fn a_header_is_read_as_pg_combinebackup_reads_it() {
        let h = header(&[1, 5, 9], 7);
        for cut in 0..h.len() {
            assert_eq!(
                parse_header(&h[..cut], 8192).expect("partial"),
                None,
                "{cut}"
            );
        }
        let (inc, len) = parse_header(&h, 8192).expect("ok").expect("whole");
        assert_eq!(
            (inc.blocks.as_slice(), inc.truncation_blocks),
            (&[1, 5, 9][..], 7)
        );
        assert_eq!(len, 8192, "padded to a block");
        assert_eq!(
            inc.length_blocks(),
            10,
            "the last block sent lies past the truncation"
        );
        // No blocks: no padding; the file is the truncation length.
        let (inc, len) = parse_header(&header(&[], 3), 8192)
            .expect("ok")
            .expect("whole");
        assert_eq!((len, inc.length_blocks()), (12, 3));
        // Bad magic, unsorted, past a segment.
        let mut m = header(&[1], 1);
        m[0] ^= 1;
        for bad in [
            m,
            header(&[5, 3], 9),
            header(&[1], 1 << 20),
            header(&[1 << 17], 0),
        ] {
            let e = parse_header(&bad, 8192).expect_err("refused");
            assert_eq!(e.code, "pg.protocol", "{e}");
        }
    }

    #[test]
    fn incremental_names_and_labels() {
        assert_eq!(
            bare_path("base/5/INCREMENTAL.16384").as_deref(),
            Some("base/5/16384")
        );
        assert_eq!(bare_path("INCREMENTAL.x").as_deref(), Some("x"));
        assert_eq!(bare_path("base/5/16384"), None);
        assert_eq!(bare_path("base/5/INCREMENTAL."), None);
        let label = b"START WAL LOCATION: 0/4000028 (file 000000010000000000000004)\nINCREMENTAL FROM LSN: 0/2000028\nINCREMENTAL FROM TLI: 1\nSTART TIMELINE: 1\n";
        assert_eq!(
            rewrite_label(label),
            b"START WAL LOCATION: 0/4000028 (file 000000010000000000000004)\nSTART TIMELINE: 1\n"
                .to_vec()
        );
    }

    fn manifest(files: &[&str]) -> String {
        let mut m = String::from(
            "{ \"PostgreSQL-Backup-Manifest-Version\": 2,\n\"System-Identifier\": 7,\n\"Files\": [\n",
        );
        m.push_str(&files.join(",\n"));
        m.push_str("\n],\n\"WAL-Ranges\": [\n{ \"Timeline\": 1, \"Start-LSN\": \"0/4000028\", \"End-LSN\": \"0/4000100\" }\n],\n");
        let sum = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, m.as_bytes());
        let hex: String = sum.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        m.push_str(&format!("\"Manifest-Checksum\": \"{hex}\"}}\n"));
        m
    }

    #[test]
    fn the_manifest_names_whole_files_and_its_checksum_is_computed_again() {
        let f = |p: &str, size: u64| {
            format!("{{ \"Path\": \"{p}\", \"Size\": {size}, \"Last-Modified\": \"2026-12-08 01:00:00 GMT\", \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"0badf00d\" }}")
        };
        let before = manifest(&[
            &f("backup_label", 250),
            &f("base/5/INCREMENTAL.16384", 16396),
            &f("base/5/PG_VERSION", 3),
        ]);
        let changes: HashMap<String, (String, u64)> = [
            (
                "base/5/INCREMENTAL.16384".to_string(),
                ("base/5/16384".to_string(), 81920),
            ),
            (
                "backup_label".to_string(),
                ("backup_label".to_string(), 190),
            ),
        ]
        .into();
        let after = String::from_utf8(rewrite_manifest(before.as_bytes(), &changes).expect("ok"))
            .expect("utf8");
        let whole = "{ \"Path\": \"base/5/16384\", \"Size\": 81920, \"Last-Modified\": \"2026-12-08 01:00:00 GMT\" },";
        assert!(after.contains(whole), "{after}");
        assert!(after.contains(&f("base/5/PG_VERSION", 3)), "untouched");
        assert!(!after.contains("INCREMENTAL."));
        // The checksum is the one PostgreSQL would compute for the new text.
        let body = &after[..after.rfind("\"Manifest-Checksum\"").expect("key")];
        let expect = manifest(&[
            "{ \"Path\": \"backup_label\", \"Size\": 190, \"Last-Modified\": \"2026-12-08 01:00:00 GMT\" }",
            "{ \"Path\": \"base/5/16384\", \"Size\": 81920, \"Last-Modified\": \"2026-12-08 01:00:00 GMT\" }",
            &f("base/5/PG_VERSION", 3),
        ]);
        assert_eq!(after, expect, "{body}");
        // A change the manifest does not name is an error, not a silent skip.
        let mut more = changes.clone();
        more.insert("base/5/INCREMENTAL.1".into(), ("base/5/1".into(), 8192));
        assert!(rewrite_manifest(before.as_bytes(), &more).is_err());
    }
}
