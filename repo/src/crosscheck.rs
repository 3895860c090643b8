//! The cross-check of an incremental backup: the server did not send most
//! pages, trusting its WAL summaries that they did not change since the
//! previous backup. A sample of those pages is read back from the server
//! (`pg_read_binary_file` over an ordinary session) and hashed; each must
//! equal the previous backup's page-map hash, which the new backup now
//! points at. A page whose LSN is past the backup's start changed during
//! the backup (its WAL is in the backup) and is not compared; a mismatch is
//! read once more (a torn read of a page being written) before it counts.
//!
//! Without `data_checksums` or `wal_log_hints`, PostgreSQL sets hint bits
//! without WAL, so unchanged pages may differ from the stored ones harmlessly:
//! the sample is then not compared, and the backup says so.

use crate::Repository;
use pg_hardstorage_engine::event::{Event, EventBus, Severity};
use pg_hardstorage_engine::format::{Entry, PAGE_HASH};
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use phs_pg::incremental::Incremental;
use phs_pg::{Conn, ConnInfo};
use serde_json::json;

/// Pages read back per backup, spread over the incremental files (at least
/// one from each while the budget lasts).
pub const SAMPLE_PAGES: usize = 64;

/// One page to read back: the file, the page number, the hash it must have.
struct Probe<'a> {
    path: &'a str,
    page_size: u32,
    page: u32,
    hash: [u8; PAGE_HASH],
}

/// Checks a sample of the pages the server did not send; `files` pairs each
/// incremental file's new entry with its header. `Err` with
/// `backup.incremental_mismatch` when a sampled page differs.
pub fn check(
    repo: &Repository,
    ci: &ConnInfo,
    files: &[(&Entry, &Incremental)],
    start_lsn: u64,
    bus: &EventBus,
) -> Result<(), Problem> {
    let mut conn = Conn::connect(ci, false)?;
    if !(conn.show("data_checksums")? == "on" || conn.show("wal_log_hints")? == "on") {
        return unchecked(bus, "without data_checksums or wal_log_hints, hint bits change pages without WAL: the sample cannot be compared");
    }
    let probes = sample(files)?;
    let mut compared = 0;
    for p in &probes {
        match compare(repo, &mut conn, p, start_lsn) {
            Ok(true) => compared += 1,
            Ok(false) => {}
            // Not allowed to read server files (42501 reads as
            // pg.replication_denied), or the function refused.
            Err(e) if matches!(e.code.as_ref(), "pg.server_error" | "pg.replication_denied") => {
                return unchecked(
                    bus,
                    &format!("the pages cannot be read back: {}", e.message),
                );
            }
            Err(e) => return Err(e),
        }
    }
    bus.publish(
        Event::new(Severity::Info, "backup_incremental_checked").body(json!({
            "sampled": probes.len(), "compared": compared,
        })),
    );
    Ok(())
}

fn unchecked(bus: &EventBus, reason: &str) -> Result<(), Problem> {
    bus.publish(
        Event::new(Severity::Warning, "backup_incremental_unchecked")
            .body(json!({ "reason": reason })),
    );
    Ok(())
}

/// Up to [`SAMPLE_PAGES`] pages not sent, before each file's truncation
/// length: one per file in turn (the files with most such pages first), at
/// evenly spread page numbers.
fn sample<'a>(files: &[(&'a Entry, &Incremental)]) -> Result<Vec<Probe<'a>>, Problem> {
    let mut lists = Vec::new();
    for (e, inc) in files {
        let Some(map) = &e.pages else { continue };
        let records = map.decode(&e.chunks)?;
        let end = (inc.truncation_blocks as usize).min(records.len());
        let unsent: Vec<u32> = (0..end as u32)
            .filter(|n| inc.blocks.binary_search(n).is_err())
            .collect();
        lists.push((e.path.as_str(), map.page_size, records, unsent));
    }
    // The files with the most pages not sent first: where the data is.
    lists.sort_by(|a, b| b.3.len().cmp(&a.3.len()).then(a.0.cmp(b.0)));
    let mut out = Vec::new();
    for round in 0.. {
        let before = out.len();
        for (path, ps, records, unsent) in &lists {
            if out.len() == SAMPLE_PAGES {
                return Ok(out);
            }
            // Rounds 0, 1, 2 … take pages at 1/2, 1/4, 3/4 … of the file.
            let Some(&page) = spread(unsent, round) else {
                continue;
            };
            out.push(Probe {
                path,
                page_size: *ps,
                page,
                hash: records[page as usize].hash,
            });
        }
        if out.len() == before {
            break;
        }
    }
    Ok(out)
}

/// The `round`-th page of a van der Corput spread over `v` (each once).
fn spread(v: &[u32], round: usize) -> Option<&u32> {
    if round >= v.len() {
        return None;
    }
    let mut seen = std::collections::HashSet::new();
    let mut k = 0usize;
    loop {
        let (mut x, mut f, mut n) = (0.0f64, 0.5f64, k + 1);
        while n > 0 {
            x += f * (n & 1) as f64;
            n >>= 1;
            f /= 2.0;
        }
        let i = ((x * v.len() as f64) as usize).min(v.len() - 1);
        k += 1;
        if seen.insert(i) && seen.len() == round + 1 {
            return v.get(i);
        }
        if k > 64 * v.len() {
            return v.get(round);
        }
    }
}

/// Reads one page back: `Ok(true)` compared equal, `Ok(false)` not
/// comparable (gone, cut short, or written since the backup started).
fn compare(repo: &Repository, conn: &mut Conn, p: &Probe, start_lsn: u64) -> Result<bool, Problem> {
    for attempt in 0..2 {
        let Some(page) = read_page(conn, p.path, p.page_size, p.page)? else {
            return Ok(false);
        };
        if page_lsn(&page) > start_lsn {
            return Ok(false);
        }
        let h = blake3::keyed_hash(&repo.keys.id, &page);
        if h.as_bytes()[..PAGE_HASH] == p.hash {
            return Ok(true);
        }
        if attempt == 0 {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    Err(Problem::new(
        Code::BackupIncrementalMismatch,
        format!(
            "page {} of {} on the server differs from the previous backup's, although the server's WAL summaries say it did not change",
            p.page, p.path
        ),
    )
    .with("path", p.path)
    .with("page", p.page as u64)
    .suggest(
        "The backup is taken again in full; check the server (storage, or a change made outside PostgreSQL)",
        None,
    ))
}

/// Page `n` of `path` (relative to the data directory), or `None` when
/// the file is gone or shorter now.
fn read_page(conn: &mut Conn, path: &str, ps: u32, n: u32) -> Result<Option<Vec<u8>>, Problem> {
    let ps = ps as u64;
    let quoted = path.replace('\'', "''");
    let sql = format!(
        "SELECT encode(pg_read_binary_file('{quoted}', {}, {ps}, true), 'hex')",
        n as u64 * ps
    );
    let rows = conn.simple_query(&sql)?;
    let hex = rows
        .first()
        .and_then(|s| s.first())
        .and_then(|r| r.first().cloned().flatten());
    let Some(hex) = hex else { return Ok(None) };
    let bytes = hex::decode(hex.trim())
        .map_err(|e| Problem::new(Code::PgProtocol, format!("page read back: {e}")))?;
    Ok((bytes.len() as u64 == ps).then_some(bytes))
}

/// `pd_lsn`: the page header's first 8 bytes (high word, then low word).
fn page_lsn(page: &[u8]) -> u64 {
    let w = |i: usize| u32::from_le_bytes([page[i], page[i + 1], page[i + 2], page[i + 3]]) as u64;
    (w(0) << 32) | w(4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_spreads_over_every_page_once() {
        let v: Vec<u32> = (0..10).collect();
        let got: Vec<u32> = (0..10).filter_map(|r| spread(&v, r).copied()).collect();
        let mut sorted = got.clone();
        sorted.sort();
        assert_eq!(sorted, v, "{got:?}");
        assert_eq!(got[0], 5, "the middle first");
        assert_eq!(spread(&v, 10), None);
        assert_eq!(spread(&[], 0), None);
    }

    #[test]
    fn a_page_lsn_is_read_from_its_header() {
        let mut p = vec![0u8; 8192];
        p[..4].copy_from_slice(&1u32.to_le_bytes());
        p[4..8].copy_from_slice(&0x2000_0028u32.to_le_bytes());
        assert_eq!(page_lsn(&p), 0x1_2000_0028);
    }
}
