//! Which timeline each WAL segment is read from, following a server's
//! timeline history, and where streaming resumes after a promotion: the
//! first segment the archive lacks on the path to the server's timeline.
//! A segment holding a switch point is read from the new timeline (at a
//! switch PostgreSQL copies the old segment's bytes up to the switch point
//! into the new timeline's file), so the old timeline's partial segment is
//! never needed and never archived.

use crate::wal::{parse_segment_name, SEGMENT_SIZE};

/// A timeline's ancestors: `(timeline, switch point)`, oldest first, as
/// the lines `parent<TAB>switchpoint<TAB>reason` of its history file.
pub type History = Vec<(u32, u64)>;

/// Parses a history file; lines that are not `tli switchpoint …` (comments,
/// blank) are skipped, as PostgreSQL does.
pub fn parse_history(text: &str) -> History {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let tli = f.next()?.parse().ok()?;
            let lsn = phs_pg::conn::parse_lsn(f.next()?)?;
            Some((tli, lsn))
        })
        .collect()
}

/// The timeline segment `segno` is read from on the way to `tli`: the
/// oldest one whose WAL runs past the segment's last byte.
pub fn of_segment(segno: u64, history: &[(u32, u64)], tli: u32) -> u32 {
    let last_byte = (segno + 1) * SEGMENT_SIZE - 1;
    history
        .iter()
        .find(|(_, switch)| last_byte < *switch)
        .map_or(tli, |(t, _)| *t)
}

/// The start of the first segment after the newest one archived on the
/// path to `tli` (archived under the timeline it is read from there), or
/// `None` when the archive holds none of it. Segments of a timeline that
/// left the path (an old primary that kept writing after the promotion)
/// are not counted.
pub fn archive_end(names: &[String], history: &[(u32, u64)], tli: u32) -> Option<u64> {
    names
        .iter()
        .filter_map(|n| parse_segment_name(n))
        .filter(|&(t, s)| t == of_segment(s, history, tli))
        .map(|(_, s)| (s + 1) * SEGMENT_SIZE)
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::segment_name;

    const SEG: u64 = SEGMENT_SIZE;

    #[test]
    fn history_files_are_read_as_postgresql_writes_them() {
        let h = parse_history(
            "1\t0/5000060\tno recovery target specified\n\n2\t0/9A000000\tat restore point \"x\"\n",
        );
        assert_eq!(h, vec![(1, 0x5000060), (2, 0x9A00_0000)]);
        assert!(parse_history("# comment\n").is_empty());
    }

    #[test]
    fn a_segment_holding_a_switch_point_is_read_from_the_new_timeline() {
        // Timeline 1 ended inside segment 5; timeline 2 exactly at segment 9's start.
        let h = vec![(1, 5 * SEG + 0x60), (2, 9 * SEG)];
        assert_eq!(of_segment(4, &h, 3), 1);
        assert_eq!(of_segment(5, &h, 3), 2, "the switch segment");
        assert_eq!(of_segment(8, &h, 3), 2);
        assert_eq!(of_segment(9, &h, 3), 3);
        assert_eq!(of_segment(100, &[], 1), 1);
    }

    #[test]
    fn streaming_resumes_after_the_newest_segment_on_the_path() {
        let h = vec![(1, 5 * SEG + 0x60)];
        let names = |v: &[(u32, u64)]| -> Vec<String> {
            v.iter().map(|&(t, s)| segment_name(t, s)).collect()
        };
        // Timeline 1 archived up to segment 4: resume at 5 (on timeline 2).
        let a = names(&[(1, 3), (1, 4)]);
        assert_eq!(archive_end(&a, &h, 2), Some(5 * SEG));
        assert_eq!(of_segment(5, &h, 2), 2);
        // The old primary kept writing timeline 1 (segments 5, 6): off the path.
        let a = names(&[(1, 4), (1, 5), (1, 6)]);
        assert_eq!(archive_end(&a, &h, 2), Some(5 * SEG));
        // Timeline 2 under way.
        let a = names(&[(1, 4), (2, 5), (2, 6)]);
        assert_eq!(archive_end(&a, &h, 2), Some(7 * SEG));
        assert_eq!(archive_end(&[], &h, 2), None);
        assert_eq!(archive_end(&names(&[(1, 2)]), &[], 1), Some(3 * SEG));
    }
}
