//! `restore --delta`: into an existing directory (of the same cluster, as
//! pre-flight checked), write only what differs. Entries the backup does not
//! have, or has as another kind, are removed first; each existing regular
//! file is then compared with its entry — chunk by chunk (the keyed id of
//! the bytes at the chunk's place) or page by page (the page map's hash) —
//! and only the ranges that differ are planned, fetched and written.

use super::dest::Root;
use super::IN_PROGRESS_MARKER;
use crate::Repository;
use pg_hardstorage_engine::format::{Entry, EntryKind, PAGE_HASH};
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};

/// For each planned file: `None` when it must be created afresh, else per
/// chunk (or per page of a page-mapped file) whether the bytes already on
/// disk are the backup's.
pub type Have = Vec<Option<Vec<bool>>>;

/// Removes from every root what the backup does not hold there (or holds
/// as another kind). `expected[root]` maps paths to kinds. Returns how many
/// entries went.
pub fn prune(roots: &[Root], expected: &[HashMap<Vec<u8>, EntryKind>]) -> Result<u64, Problem> {
    let mut removed = 0;
    for (root, want) in roots.iter().zip(expected) {
        removed += prune_dir(root, want, b"")?;
    }
    Ok(removed)
}

fn kind_of(m: &std::fs::Metadata) -> Option<EntryKind> {
    let t = m.file_type();
    if t.is_symlink() {
        Some(EntryKind::Symlink)
    } else if t.is_dir() {
        Some(EntryKind::Dir)
    } else if t.is_file() {
        Some(EntryKind::File)
    } else {
        None
    }
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    if dir.is_empty() {
        name.to_vec()
    } else {
        [dir, b"/", name].concat()
    }
}

fn prune_dir(root: &Root, want: &HashMap<Vec<u8>, EntryKind>, dir: &[u8]) -> Result<u64, Problem> {
    use std::os::unix::ffi::OsStrExt;
    let path = root.path().join(std::ffi::OsStr::from_bytes(dir));
    let rd = std::fs::read_dir(&path)
        .map_err(|e| Problem::io(Code::RestoreTargetInvalid, path.display(), &e))?;
    let mut removed = 0;
    for e in rd {
        let e = e.map_err(|er| Problem::io(Code::RestoreTargetInvalid, path.display(), &er))?;
        let rel = join(dir, e.file_name().as_bytes());
        if dir.is_empty() && rel == IN_PROGRESS_MARKER.as_bytes() {
            continue;
        }
        let meta = std::fs::symlink_metadata(e.path())
            .map_err(|er| Problem::io(Code::RestoreTargetInvalid, e.path().display(), &er))?;
        let have = kind_of(&meta);
        match want.get(&rel) {
            Some(k) if Some(*k) == have && *k == EntryKind::Dir => {
                removed += prune_dir(root, want, &rel)?;
            }
            Some(k) if Some(*k) == have => {}
            _ => removed += remove_tree(root, &rel, have == Some(EntryKind::Dir))?,
        }
    }
    Ok(removed)
}

/// Removes `rel` beneath `root` (a directory with everything in it),
/// never following a link.
fn remove_tree(root: &Root, rel: &[u8], dir: bool) -> Result<u64, Problem> {
    let mut n = 0;
    if dir {
        n += prune_dir(root, &HashMap::new(), rel)?;
    }
    root.remove_file(rel)?;
    Ok(n + 1)
}

/// Compares every planned file that exists with its entry, on `threads`.
pub fn compare(
    repo: &Repository,
    roots: &[Root],
    files: &[(usize, Vec<u8>, &Entry)],
    threads: usize,
) -> Result<Have, Problem> {
    let have: Vec<std::sync::Mutex<Option<Vec<bool>>>> =
        files.iter().map(|_| Default::default()).collect();
    let idx: Vec<usize> = (0..files.len()).collect();
    crate::parallel::for_each(
        &idx,
        threads,
        8,
        || (),
        |_, &i| {
            let (root, rel, e) = &files[i];
            let Some(f) = roots[*root].open_read(rel)? else {
                return Ok(());
            };
            // A file with other names (pg_upgrade --link makes them) may be
            // seen from outside the target: replace it, never write into it.
            if f.metadata().map_or(true, |m| m.nlink() != 1) {
                return Ok(());
            }
            let same = match &e.pages {
                Some(map) => same_pages(repo, &f, e, map)?,
                None => same_chunks(repo, &f, e),
            };
            *have[i].lock().unwrap_or_else(|x| x.into_inner()) = Some(same);
            Ok(())
        },
    )?;
    Ok(have
        .into_iter()
        .map(|m| m.into_inner().unwrap_or_else(|x| x.into_inner()))
        .collect())
}

fn same_chunks(repo: &Repository, f: &File, e: &Entry) -> Vec<bool> {
    let mut offset = 0u64;
    let mut buf = Vec::new();
    e.chunks
        .iter()
        .map(|(id, len)| {
            buf.resize(*len as usize, 0);
            let same = f.read_exact_at(&mut buf, offset).is_ok()
                && phs_hash::chunk_id(&repo.keys.id, &buf) == *id;
            offset += *len as u64;
            same
        })
        .collect()
}

/// Pages read at a time while comparing.
const PAGES_AT_ONCE: usize = 512;

fn same_pages(
    repo: &Repository,
    f: &File,
    e: &Entry,
    map: &pg_hardstorage_engine::format::PageMap,
) -> Result<Vec<bool>, Problem> {
    let records = map.decode(&e.chunks)?;
    let ps = map.page_size as usize;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut same = Vec::with_capacity(records.len());
    let mut buf = vec![0u8; ps * PAGES_AT_ONCE];
    for (n, group) in records.chunks(PAGES_AT_ONCE).enumerate() {
        let at = (n * PAGES_AT_ONCE * ps) as u64;
        let avail = len.saturating_sub(at).min(buf.len() as u64) as usize;
        let got = f.read_at(&mut buf[..avail], at).unwrap_or(0) / ps * ps;
        for (k, r) in group.iter().enumerate() {
            let page = buf
                .get(k * ps..(k + 1) * ps)
                .filter(|_| (k + 1) * ps <= got);
            same.push(page.is_some_and(|p| {
                blake3::keyed_hash(&repo.keys.id, p).as_bytes()[..PAGE_HASH] == r.hash
            }));
        }
    }
    Ok(same)
}

/// Where each entry belongs, per root: what [`prune`] keeps.
pub fn expected(
    roots: usize,
    placed: impl Iterator<Item = (usize, Vec<u8>, EntryKind)>,
) -> Vec<HashMap<Vec<u8>, EntryKind>> {
    let mut out = vec![HashMap::new(); roots];
    for (root, rel, kind) in placed {
        if !rel.is_empty() {
            out[root].insert(rel, kind);
        }
    }
    out
}
