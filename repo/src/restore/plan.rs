//! The restore plan: for every chunk the backup references, every place it
//! lands (file, offset, which bytes of it), grouped by pack and coalesced
//! into ranged reads. Each chunk appears in the plan once however many
//! files or pages use it, so it is fetched and decoded once.

use crate::index::RepoIndex;
use pg_hardstorage_engine::format::{Entry, PAGE_HASH};
use pg_hardstorage_engine::stage::ChunkId;
use pg_hardstorage_engine::Problem;
use std::collections::HashMap;
use std::ops::Range;

/// Chunks at most this far apart in a pack are read together (the gap is
/// read and dropped): one request instead of two.
pub const GAP: u64 = 1 << 20;

/// Where (some of) a decoded chunk goes.
#[derive(Clone, Debug)]
pub struct Place {
    /// Index into [`Plan::files`].
    pub file: u32,
    /// Offset in that file.
    pub offset: u64,
    /// The bytes of the decoded chunk written there.
    pub src: Range<u32>,
    /// For a page-mapped file: the first page record these bytes are
    /// checked against (one per page).
    pub first_page: Option<u32>,
}

/// One chunk to decode, and everywhere it goes.
#[derive(Debug)]
pub struct Job {
    pub id: ChunkId,
    /// Envelope offset in its pack, and length.
    pub offset: u64,
    pub len: u32,
    /// Its decoded length, as the manifest says.
    pub plain_len: u32,
    pub places: Vec<Place>,
}

/// One ranged GET of one pack and the chunks it serves.
#[derive(Debug)]
pub struct Read {
    pub pack: String,
    pub range: Range<u64>,
    pub jobs: Vec<Job>,
}

/// A file to write: which root, its path beneath it, its size, and for a
/// page-mapped file the page hashes to check against.
#[derive(Debug)]
pub struct PlannedFile<'m> {
    pub root: usize,
    pub rel: Vec<u8>,
    pub entry: &'m Entry,
    pub pages: Option<(u32, Vec<[u8; PAGE_HASH]>)>,
    /// Created afresh (all holes: zero blocks are skipped), or an existing
    /// file of a delta restore (only differing ranges written, zeros too).
    pub fresh: bool,
    /// Bytes the plan writes into it.
    pub write_bytes: u64,
}

#[derive(Debug)]
pub struct Plan<'m> {
    pub files: Vec<PlannedFile<'m>>,
    pub reads: Vec<Read>,
    /// Bytes the restore writes.
    pub bytes_total: u64,
    /// The packs it reads (index numbers, ascending, each once).
    pub packs: Vec<u32>,
}

/// Builds the plan for `files` (each `(root, rel, entry)`), reading no
/// pack larger than `max_read` in one request. With `have` (a delta
/// restore), chunks and pages already on disk are left out.
pub fn plan<'m>(
    index: &RepoIndex,
    files: &[(usize, Vec<u8>, &'m Entry)],
    max_read: u64,
    have: Option<&[Option<Vec<bool>>]>,
) -> Result<Plan<'m>, Problem> {
    let mut jobs: HashMap<ChunkId, Job> = HashMap::new();
    let mut planned = Vec::with_capacity(files.len());
    let mut bytes_total = 0u64;
    for (n, &(root, ref rel, e)) in files.iter().enumerate() {
        let file = u32::try_from(n).map_err(|_| Problem::internal("too many files"))?;
        let same = have.and_then(|h| h.get(n)).and_then(|s| s.as_deref());
        let mut places = Vec::new();
        let pages = places_of(e, file, same, &mut places)?;
        let mut write_bytes = 0u64;
        for (id, plain_len, place) in places {
            write_bytes += place.src.len() as u64;
            if let Some(j) = jobs.get_mut(&id) {
                j.places.push(place);
                continue;
            }
            let (_, loc) = index.locate(&id)?;
            let places = vec![place];
            let (offset, len) = (loc.offset, loc.len);
            jobs.insert(
                id,
                Job {
                    id,
                    offset,
                    len,
                    plain_len,
                    places,
                },
            );
        }
        bytes_total += write_bytes;
        planned.push(PlannedFile {
            root,
            rel: rel.clone(),
            entry: e,
            pages,
            fresh: same.is_none(),
            write_bytes,
        });
    }
    let (reads, packs) = coalesce(index, jobs, max_read)?;
    Ok(Plan {
        files: planned,
        reads,
        bytes_total,
        packs,
    })
}

/// Where `e`'s chunks land in it (those `same` does not say are on disk
/// already); for a page-mapped file, its page size and hashes.
#[allow(clippy::type_complexity)]
fn places_of(
    e: &Entry,
    file: u32,
    same: Option<&[bool]>,
    out: &mut Vec<(ChunkId, u32, Place)>,
) -> Result<Option<(u32, Vec<[u8; PAGE_HASH]>)>, Problem> {
    let kept = |k: usize| same.is_some_and(|s| s.get(k) == Some(&true));
    let Some(map) = &e.pages else {
        let mut offset = 0u64;
        for (k, (id, len)) in e.chunks.iter().enumerate() {
            if !kept(k) {
                let (src, first_page) = (0..*len, None);
                out.push((
                    *id,
                    *len,
                    Place {
                        file,
                        offset,
                        src,
                        first_page,
                    },
                ));
            }
            offset += *len as u64;
        }
        return Ok(None);
    };
    let records = map.decode(&e.chunks)?;
    let ps = map.page_size;
    let mut i = 0;
    while i < records.len() {
        if kept(i) {
            i += 1;
            continue;
        }
        // Pages stored next to each other in one run: one place.
        let r = records[i];
        let mut j = i + 1;
        while j < records.len()
            && !kept(j)
            && records[j].run == r.run
            && records[j].slot as usize == r.slot as usize + (j - i)
        {
            j += 1;
        }
        let (id, len) = &e.chunks[r.run as usize];
        let from = r.slot as u32 * ps;
        let place = Place {
            file,
            offset: i as u64 * ps as u64,
            src: from..from + (j - i) as u32 * ps,
            first_page: Some(i as u32),
        };
        out.push((*id, *len, place));
        i = j;
    }
    Ok(Some((ps, records.iter().map(|r| r.hash).collect())))
}

/// Groups jobs by pack, in pack order, into reads of at most `max_read`
/// bytes whose chunks are at most [`GAP`] apart.
fn coalesce(
    index: &RepoIndex,
    jobs: HashMap<ChunkId, Job>,
    max_read: u64,
) -> Result<(Vec<Read>, Vec<u32>), Problem> {
    let mut by_pack: HashMap<u32, Vec<Job>> = HashMap::new();
    for (id, j) in jobs {
        let (_, loc) = index.locate(&id)?;
        by_pack.entry(loc.pack).or_default().push(j);
    }
    let mut packs: Vec<_> = by_pack.into_iter().collect();
    packs.sort_by_key(|(p, _)| *p);
    let touched = packs.iter().map(|(p, _)| *p).collect();
    let mut reads = Vec::new();
    for (p, mut jobs) in packs {
        let pack = index
            .packs
            .get(p as usize)
            .ok_or_else(|| Problem::internal("index pack out of range"))?
            .clone();
        jobs.sort_by_key(|j| j.offset);
        let mut cur: Option<Read> = None;
        for j in jobs {
            let end = j.offset + j.len as u64;
            if let Some(r) = cur.as_mut() {
                if j.offset <= r.range.end + GAP && end - r.range.start <= max_read {
                    r.range.end = r.range.end.max(end);
                    r.jobs.push(j);
                    continue;
                }
                reads.extend(cur.take());
            }
            cur = Some(Read {
                pack: pack.clone(),
                range: j.offset..end,
                jobs: vec![j],
            });
        }
        reads.extend(cur);
    }
    Ok((reads, touched))
}
