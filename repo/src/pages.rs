//! Page-aware dedup for PostgreSQL relation files: which members are paged,
//! their baseline in the previous backup, and the maps the splitter returns.
//! Format: `docs/specs/format.md`, "Paged files".

use crate::Repository;
use pg_hardstorage_engine::format::{BackupStats, Entry, Manifest};
use pg_hardstorage_engine::stage::ChunkRef;
use phs_chunk::{Baseline, PagePlan, PagePlanner, PagedFile, SparsePages};
use phs_pg::incremental::Incremental;
use phs_pg::source::TarEntry;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Pages per stored run: 32 × 8 KiB = 256 KiB, the content-defined
/// chunker's minimum, so the global index holds no more entries per byte
/// than with content-defined chunks.
pub const RUN_PAGES: usize = 32;

/// Whether `path` (relative to the data directory) names a relation
/// segment: `base/<db>/<node>`, `global/<node>` or
/// `pg_tblspc/<ts>/<version>/<db>/<node>`, where `<node>` is digits with an
/// optional `_fsm`/`_vm`/`_init` fork and `.<segment>` suffix.
pub fn is_relation_path(path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    let name = match parts.as_slice() {
        ["base", db, name] if digits(db) => name,
        ["global", name] => name,
        ["pg_tblspc", ts, _version, db, name] if digits(ts) && digits(db) => name,
        _ => return false,
    };
    let (node, seg) = match name.split_once('.') {
        Some((n, s)) => (n, Some(s)),
        None => (*name, None),
    };
    let node = ["_fsm", "_vm", "_init"]
        .iter()
        .find_map(|f| node.strip_suffix(f))
        .unwrap_or(node);
    digits(node) && seg.is_none_or(digits)
}

fn digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// The planner of one PostgreSQL backup.
pub struct RelationPlanner {
    members: Arc<Mutex<Vec<TarEntry>>>,
    baseline: HashMap<String, Arc<Baseline>>,
    page_size: u32,
    done: Mutex<HashMap<u64, PagedFile>>,
    /// An incremental backup's `INCREMENTAL.*` headers, by member.
    increments: Arc<Mutex<HashMap<u64, Incremental>>>,
}

impl RelationPlanner {
    /// `previous` is the deployment's newest committed backup, if any.
    /// `indexed`: the repository's chunks now. A baseline file whose runs
    /// are not all there (a quarantined pack) is stored afresh.
    pub fn new(
        members: Arc<Mutex<Vec<TarEntry>>>,
        increments: Arc<Mutex<HashMap<u64, Incremental>>>,
        page_size: u32,
        previous: Option<&Manifest>,
        indexed: &phs_dedup::DedupIndex,
    ) -> Self {
        let baseline = previous
            .map(|m| {
                m.entries
                    .iter()
                    .filter_map(|e| {
                        if !e.chunks.iter().all(|(id, _)| indexed.contains(id)) {
                            return None;
                        }
                        let map = e.pages.clone()?;
                        Some((
                            e.path.clone(),
                            Arc::new(Baseline {
                                runs: e.chunks.clone(),
                                map,
                            }),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        RelationPlanner {
            members,
            baseline,
            page_size,
            done: Mutex::new(HashMap::new()),
            increments,
        }
    }

    /// Gives each paged entry its runs and map, and adds the page counts
    /// and the bytes the paged files added to `stats`.
    pub fn apply(
        &self,
        entries: &mut [Entry],
        first_member: usize,
        added: &HashMap<u64, u64>,
        stats: &mut BackupStats,
    ) {
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        for (file, f) in done.drain() {
            let Some(e) = entries.get_mut(first_member + file as usize) else {
                continue;
            };
            e.size = f.pages * f.map.page_size as u64;
            e.chunks = f.runs;
            e.pages = Some(f.map);
            stats.paged_bytes += e.size;
            stats.pages += f.pages;
            stats.pages_stored += f.pages_stored;
            stats.paged_bytes_added += added.get(&file).copied().unwrap_or(0);
        }
    }
}

impl PagePlanner for RelationPlanner {
    fn plan(&self, file: u64) -> Option<PagePlan> {
        let members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        let m = members.get(file as usize)?;
        // Only some pages of an incremental member come: it must be paged.
        let sparse = self
            .increments
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&file)
            .map(|i| {
                Arc::new(SparsePages {
                    pages: i.blocks.clone(),
                    length: i.length_blocks(),
                    truncation: i.truncation_blocks,
                })
            });
        let paged = m.size > 0
            && (sparse.is_some()
                || (m.size.is_multiple_of(self.page_size as u64) && is_relation_path(&m.path)));
        paged.then(|| PagePlan {
            page_size: self.page_size,
            baseline: self.baseline.get(&m.path).cloned(),
            sparse,
        })
    }

    fn done(&self, file: u64, result: PagedFile) {
        self.done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(file, result);
    }
}

/// Sums, per file, the bytes the sink stored for it.
#[derive(Default)]
pub struct Added {
    pub by_file: HashMap<u64, u64>,
}

impl Added {
    pub fn record(&mut self, c: &ChunkRef) {
        if c.stored > 0 {
            *self.by_file.entry(c.file).or_default() += c.stored as u64;
        }
    }
}

/// The deployment's newest committed backup, as the baseline of the next.
pub fn previous_backup(repo: &Repository, deployment: &str) -> Option<Manifest> {
    let all = crate::catalog::list(repo, Some(deployment)).ok()?;
    let newest = all.last()?;
    crate::catalog::load_manifest(repo, deployment, &newest.backup_id).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relation_paths() {
        for p in [
            "base/5/16384",
            "base/5/16384.1",
            "base/5/16384_fsm",
            "base/5/16384_vm",
            "base/5/16384_init",
            "base/5/16384_vm.2",
            "global/1262",
            "pg_tblspc/16390/PG_15_202209061/5/16391",
        ] {
            assert!(is_relation_path(p), "{p}");
        }
        for p in [
            "base/5/PG_VERSION",
            "base/5/pg_filenode.map",
            "base/5/pg_internal.init",
            "global/pg_control",
            "pg_wal/000000010000000000000001",
            "base/5/16384.",
            "base/5/16384_xx",
            "base/x/16384",
            "pg_xact/0000",
            "base/5/t3_16384",
            "16384",
        ] {
            assert!(!is_relation_path(p), "{p}");
        }
    }
}
